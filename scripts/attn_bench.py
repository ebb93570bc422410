"""Forward+backward time of every attention path of train_gpt.py at the training shape (B 48 x T 2048, 8 query
and 4 KV heads of 64), compiled as in training; run on a GPU: python3 scripts/attn_bench.py"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

B, T, H, KV, D = 48, 2048, 8, 4, 64
dev = torch.device("cuda")
q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(B, T, KV, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
ids = torch.randint(2, 1000, (B, T), device=dev)
ids[:, ::700] = tg.BOS_ID  # 700-token documents for the document-masked paths


def bench(backend: str, mask=None) -> float:
    tg.ATTENTION_BACKEND = backend
    fn = torch.compile(tg.attention, fullgraph=True)
    for _ in range(3):
        fn(q, k, v, mask).float().sum().backward()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        fn(q, k, v, mask).float().sum().backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


tg._fa4_func = tg.load_fa4()
paths = [("sdpa causal", "sdpa", lambda: None),
         ("fa3 causal", "fa3", lambda: None) if tg._fa3_func else None,
         ("fa4 causal", "fa4", lambda: None) if tg._fa4_func else None,
         ("flex document mask", "sdpa", lambda: tg.document_mask(ids)),
         ("dense-mask sdpa document mask", "sdpa", lambda: tg.document_mask(ids, flex=False))]
for name, backend, mask in filter(None, paths):
    try:
        print(f"{name}: {bench(backend, mask()):.2f} ms fwd+bwd per layer call", flush=True)
    except Exception as ex:
        print(f"{name}: failed {type(ex).__name__}: {str(ex)[:160]}", flush=True)
