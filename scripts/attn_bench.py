"""Micro-benchmark of causal GQA attention paths (fwd+bwd) at the training shape; run on a GPU."""
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
B, T, H, KV, D = 48, 2048, 8, 4, 64
q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
def gqa(backend):
    def f():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return f
def expanded(backend):
    def f():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1), is_causal=True)
    return f
def bench(f):
    for _ in range(3): f().sum().backward()
    torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
    for _ in range(10): f().float().sum().backward()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / 10
for name, f in [("gqa default", gqa([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])),
                ("gqa flash", gqa([SDPBackend.FLASH_ATTENTION])), ("gqa cudnn", gqa([SDPBackend.CUDNN_ATTENTION])),
                ("expanded flash", expanded([SDPBackend.FLASH_ATTENTION])), ("expanded cudnn", expanded([SDPBackend.CUDNN_ATTENTION]))]:
    try:
        print(f"{name}: {bench(f):.2f} ms fwd+bwd per layer-call", flush=True)
    except Exception as ex:
        print(f"{name}: failed {type(ex).__name__}: {str(ex)[:120]}", flush=True)
