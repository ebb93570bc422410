"""Profile phased TTT's chunk steps (score_doc_batch: the compiled blocks, the LoRA AdamW step) for one batch of
TTT_DOC_BATCH synthetic documents of each given length: wall ms per chunk step, device ms per step by category
(attention, GEMM, elementwise/reductions, optimizer, other) and the top kernels. Wall time well above device
time means the step waits on the host (launches, Python). A random-weight model: times, not scores.
Usage (on the GPU machine): python3 scripts/profile_ttt.py [DOC_LEN ...]   (default: 2500 300; env knobs as for
train_gpt.py). Runs on CPU as well (device time then is CPU time), which the tests use with a tiny model."""
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train_gpt as tg  # noqa: E402
from profile_step import category  # noqa: E402


def doc_batch(length: int, docs: int, vocab: int, device) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A stream of `docs` random documents of `length` predictions each (BOS, then tokens), and their spans."""
    val = torch.randint(2, vocab, (docs * length + 1,), device=device, dtype=torch.int32)
    val[::length] = tg.BOS_ID
    return val, [(i * length, length) for i in range(docs)]


def profile_length(model, lora, opt, args, device, length: int):
    val, docs = doc_batch(length, args.ttt_doc_batch, args.vocab_size, device)
    steps = math.ceil(length / args.ttt_lora_chunk)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        with tg.compiled_blocks(model, args.compile):
            tg.score_doc_batch(model, lora, opt, val, docs, args, device)
        sync()

    run()  # compiles (shapes of this length) outside the timing
    t = time.perf_counter()
    run()
    wall = (time.perf_counter() - t) * 1000 / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    if device.type == "cuda":  # kernels; on CPU the innermost ops
        kernels = [(e.name, e.device_time) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        kernels = [(e.name, e.self_cpu_time_total) for e in prof.events() if not e.cpu_children]
    by_cat = {}
    for name, us in kernels:
        name = "optimizer" if "adam" in name.lower() else category(name)
        by_cat[name] = by_cat.get(name, 0.0) + us / 1000 / steps
    total = sum(by_cat.values())
    print(f"ttt_step doc_len:{length} docs:{len(docs)} steps:{steps} wall_ms:{wall:.2f} device_ms:{total:.2f}")
    for name, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"ttt_step_ms doc_len:{length} {name:<24} {ms:8.2f}  {ms / max(total, 1e-9):6.1%}")
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=90))


def main():
    args = tg.Hyperparameters()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tg.choose_attention_backend(args, device)
    model = tg.GPT(args).to(device)
    model.act_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for p in model.parameters():
        p.requires_grad_(False)
    lora, opt = tg.lora_with_optimizer(model, args, device)
    print(f"attention_backend {tg.ATTENTION_BACKEND} compile {int(args.compile)} chunk {args.ttt_lora_chunk} "
          f"window {args.eval_seq_len} lora_rank {args.ttt_lora_rank}")
    for length in [int(a) for a in sys.argv[1:]] or [2500, 300]:
        profile_length(model, lora, opt, args, device, length)


if __name__ == "__main__":
    main()
