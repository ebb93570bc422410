"""Time the optimizer half of a training step (gradient averaging over ranks, clipping, every optimizer's
step) with Parallel Muon (MUON_SHARDED=1) and without, at the model's real shapes, on the same gradients.
Usage: torchrun --standalone --nproc_per_node=2 scripts/muon_bench.py   (env knobs as for train_gpt.py;
BENCH_REPS timed repetitions, default 20; on CPU the ranks talk over gloo)"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402


def apply_grads_ms(args, dctx, sharded: bool, reps: int, warm: int = 3) -> tuple[float, torch.Tensor]:
    """Median ms of Trainer.apply_grads over `reps` steps after `warm` untimed ones, and the final weights."""
    args.muon_sharded = sharded
    torch.manual_seed(0)
    model = tg.GPT(args).to(dctx.device)
    trainer = tg.Trainer(args, dctx, print, model, [], 1)
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p) * 1e-2
             for i, p in enumerate(trainer.params)]
    times = []
    for _ in range(warm + reps):
        for p, g in zip(trainer.params, grads):
            p.grad = g.clone()
        tg.sync(dctx.device)
        dctx.all_reduce(torch.zeros(1, device=dctx.device))  # every rank starts together
        tg.sync(dctx.device)  # NCCL's all-reduce returns when queued
        t = time.perf_counter()
        trainer.apply_grads()
        tg.sync(dctx.device)
        times.append(1000 * (time.perf_counter() - t))
    weights = torch.cat([p.detach().float().flatten() for p in trainer.params])
    return statistics.median(times[warm:]), weights


def main():
    args, dctx = tg.Hyperparameters(), tg.Dist()
    reps = int(os.environ.get("BENCH_REPS", 20))
    plain, w_plain = apply_grads_ms(args, dctx, False, reps)
    sharded, w_sharded = apply_grads_ms(args, dctx, True, reps)
    diff = (w_plain - w_sharded).abs().max().item()
    if dctx.master:
        print(f"muon_bench world_size:{dctx.world_size} reps:{reps} apply_grads_ms plain:{plain:.2f} "
              f"sharded:{sharded:.2f} speedup_sharded:{plain / sharded:.3f} max_weight_diff:{diff:.2e}", flush=True)
    dctx.close()


if __name__ == "__main__":
    main()
