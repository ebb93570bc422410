"""Forward+backward time of the fused training kernels of train_gpt.py against the compiled eager ops they
replace, at the training shape (32,768 rows of 512 -> 2048 -> 512; 8192-way softcapped cross-entropy), and
their largest difference from them in bf16. Run on a GPU: python3 scripts/kernel_bench.py
MLP_TILES="BM,BN,BK,GROUP,warps,stages;..." times other GEMM tiles of the fused MLP too."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_gpt as tg  # noqa: E402

M, D, HID, V = 32768, 512, 2048, 8192
dev, bf = torch.device("cuda"), torch.bfloat16
x = torch.randn(M, D, device=dev, dtype=bf, requires_grad=True)
up = (torch.randn(HID, D, device=dev) / D ** 0.5).to(bf).requires_grad_()
down = (torch.randn(D, HID, device=dev) / HID ** 0.5).to(bf).requires_grad_()
logits = (torch.randn(M, V, device=dev) * 8).to(bf).requires_grad_()
targets = torch.randint(0, V, (M,), device=dev)


def timed(fn, *inputs) -> tuple[float, list[torch.Tensor]]:
    for _ in range(3):
        out = fn(*inputs)
        grads = torch.autograd.grad(out.float().square().mean() if out.dim() else out, inputs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        out = fn(*inputs)
        torch.autograd.grad(out.float().square().mean() if out.dim() else out, inputs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10, [out.detach(), *grads]


def report(name, fused, eager):
    (t_f, got), (t_e, want) = fused, eager
    err = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-9)).item() for a, b in zip(got, want))
    print(f"{name}: fused {t_f:.3f} ms, compiled eager {t_e:.3f} ms (x{t_e / t_f:.2f}), max relative diff {err:.2e}",
          flush=True)


eager_mlp = torch.compile(lambda a, u, d: F.linear(F.leaky_relu(F.linear(a, u), 0.5).square(), d))
fused_mlp = torch.compile(lambda a, u, d: tg.leaky_mlp(a, u, d)[0], fullgraph=True)
eager_ce = torch.compile(lambda z: F.cross_entropy(30 * torch.tanh(z.float() / 30), targets))
fused_ce = torch.compile(lambda z: tg.softcap_ce(z, targets, 30.0)[0].mean(), fullgraph=True)
report("softcapped CE", timed(fused_ce, logits), timed(eager_ce, logits))
reference = timed(eager_mlp, x, up, down)
tiles = [tuple(tg.MLP_TILE.values())] + [tuple(int(v) for v in t.split(",")) for t in
                                          os.environ.get("MLP_TILES", "").split(";") if t]
for tile in tiles:
    tg.MLP_TILE.update(zip(("BM", "BN", "BK", "GROUP", "num_warps", "num_stages"), tile))
    try:
        report(f"LeakyReLU^2 MLP {tile}", timed(fused_mlp, x, up, down), reference)
    except Exception as ex:
        print(f"LeakyReLU^2 MLP {tile}: failed {type(ex).__name__}: {str(ex)[:200]}", flush=True)
