"""Profile one compiled training step of the default model on a GPU: its time, the top kernels, and the CUDA
time by category (attention, GEMM, elementwise/reductions, optimizer, communication).
Usage (on the GPU machine): python3 scripts/profile_step.py   (env knobs as for train_gpt.py, e.g. DOC_MASK=1;
FUSED_CE=0 FUSED_MLP=0 for the step without the fused kernels)"""
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import train_gpt as tg  # noqa: E402

CATEGORIES = (("communication", r"nccl"),
              ("attention", r"flash|fmha|attention|sdpa|flex|_attn"),
              ("GEMM", r"gemm|xmma|cutlass|nvjet|cublas|matmul|_mm_|splitk|leaky_mlp_kernel"),
              ("elementwise/reductions", r"triton|elementwise|reduce|vectorized|copy|fill|cat|index|softmax|norm|softcap_ce"))


def category(kernel: str) -> str:
    """The category of a CUDA kernel, by its name."""
    for name, pattern in CATEGORIES:
        if re.search(pattern, kernel, re.IGNORECASE):
            return name
    return "other"


def main():
    args = tg.Hyperparameters()
    dev = torch.device("cuda")
    tg.choose_attention_backend(args, dev)
    model = tg.GPT(args).to(dev)
    model.act_dtype = torch.bfloat16
    fn = torch.compile(model, dynamic=False, fullgraph=True)
    opts = tg.build_optimizers(model, args, fused=True)
    B, T = int(os.environ.get("MICRO_SEQS", 16)), args.train_seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=dev)
    x[:, ::700] = tg.BOS_ID  # documents of 700 tokens, for DOC_MASK=1
    y = torch.randint(0, args.vocab_size, (B, T), device=dev)
    accum = max(1, args.train_batch_tokens // (B * T))

    def step():
        with record_function("forward_backward"):
            for _ in range(accum):
                with tg.autocast(dev):
                    loss = fn(x, y, False)
                (loss / accum).backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.3)
            for o in opts:
                o.step()
            for o in opts:
                o.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    print(f"step_ms {(time.perf_counter() - t) / 5 * 1000:.1f} ({accum} x {B} x {T} tokens, "
          f"attention_backend {tg.ATTENTION_BACKEND}, DOC_MASK={int(args.doc_mask)}, FUSED_CE={int(args.fused_ce)}, "
          f"FUSED_MLP={int(args.fused_mlp)})")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
    ranges = {e.key: e.device_time_total / 1000 for e in events if e.key in ("forward_backward", "optimizer")}
    # the GPU spans of the named ranges (ours and Optimizer.step#...) are not kernels
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and e.name not in ("forward_backward", "optimizer") and not e.name.startswith("Optimizer.")]
    total = sum(e.device_time for e in kernels) / 1000
    by_cat = {}
    for e in kernels:
        by_cat[category(e.name)] = by_cat.get(category(e.name), 0.0) + e.device_time / 1000
    print(f"cuda_ms kernels {total:.1f}  (ranges: " + ", ".join(f"{k} {v:.1f}" for k, v in ranges.items()) + ")")
    for name, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"cuda_ms {name:<24} {ms:8.1f}  {ms / max(total, 1e-9):6.1%}")


if __name__ == "__main__":
    main()
