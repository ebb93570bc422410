"""Profile one compiled training step of the default model on a GPU: top kernels by CUDA time.
Usage (on the GPU machine): python3 scripts/profile_step.py"""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import train_gpt as tg
from torch.profiler import profile, ProfilerActivity

args = tg.Hyperparameters()
dev = torch.device("cuda")
model = tg.GPT(args).to(dev)
model.act_dtype = torch.bfloat16
fn = torch.compile(model, dynamic=False, fullgraph=True)
opts = tg.build_optimizers(model, args, fused=True)
B, T = int(os.environ.get("MICRO_SEQS", 48)), args.train_seq_len
x = torch.randint(0, args.vocab_size, (B, T), device=dev)
y = torch.randint(0, args.vocab_size, (B, T), device=dev)
def step():
    for _ in range(8):
        with tg.autocast(dev):
            loss = fn(x, y, False)
        (loss / 8).backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.3)
    for o in opts: o.step()
    for o in opts: o.zero_grad(set_to_none=True)
for _ in range(3): step()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(5): step()
torch.cuda.synchronize(); print(f"step_ms {(time.perf_counter() - t) / 5 * 1000:.1f}")
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    step(); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
