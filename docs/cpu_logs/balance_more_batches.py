import sys
sys.path.insert(0, "/work/main/scripts"); sys.path.insert(0, "/work/main")
import export_table as et
for n in (16, 64):
    et.VARIANTS.append((f"roles balanced on {n} training batches", dict(quant_method="gptq", prune_ones=False, sdclip_balance_batches=n)))
et.main(["/tmp/bal/base.pt", "--only", "2", "12", "13"])
