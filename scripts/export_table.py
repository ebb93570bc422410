#!/usr/bin/env python3
"""Compare export methods on one saved checkpoint (the `final_model.pt` a run writes beside its artifact).

    RECIPE=frontier DATA_PATH=... TOKENIZER_PATH=... python3 scripts/export_table.py final_model.pt [--out table.md]

Collects the GPTQ Hessians once (as many calibration batches as the run used), then exports the checkpoint
with each method, reloads every artifact from its bytes and measures its round-trip val_bpb (non-overlapping
windows of EVAL_SEQ_LEN, the `final_int6_roundtrip` number), against the unquantized checkpoint. Every
artifact is fitted to SIZE_LIMIT minus the compact code size, exactly as a run would. Prints a Markdown table.
"""
import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

# (label, knob overrides on top of the environment's recipe)
VARIANTS = [
    ("clip search + step fit (previous export)", dict(quant_method="search", compressor="zstd")),
    ("GPTQ + SDClip, k x1, no fit", dict(quant_method="gptq", size_fit=False)),
    ("GPTQ + SDClip fit", dict(quant_method="gptq")),
    ("GPTQ + SDClip fit + LQER r4 top3", dict(quant_method="gptq", lqer_rank=4, lqer_top=3)),
    ("GPTQ + SDClip fit, int7 embedding k=14", dict(quant_method="gptq", embed_bits=7, sdclip_k_embed=14.0)),
    ("GPTQ + SDClip fit, k 12.85 attention and MLP", dict(quant_method="gptq", sdclip_k_attn=12.85,
                                                          sdclip_k_mlp=12.85)),
    ("GPTQ + SDClip fit + LQER r8 top8", dict(quant_method="gptq", lqer_rank=8, lqer_top=8)),
    ("GPTQ + SDClip fit, int8 embedding k=15", dict(quant_method="gptq", sdclip_k_embed=15.0)),
    ("GPTQ + SDClip fit, int8 embedding k=12", dict(quant_method="gptq", sdclip_k_embed=12.0)),
    ("GPTQ + SDClip fit, k attention 11.5, MLP 13", dict(quant_method="gptq", sdclip_k_attn=11.5, sdclip_k_mlp=13.0)),
    ("GPTQ + SDClip fit, roles balanced on 4 training batches", dict(quant_method="gptq", sdclip_balance_batches=4)),
]

FP16_PART = "fp16-stored tensors (norms, gains, gates)"


def attribution(state: dict, original: dict, model, measure, quantized_bpb: float, pre: float):
    """Rows of how much of the round-trip gap each part's quantization causes: the artifact's weights with one
    role's matrices restored to the checkpoint's values (and, last, every tensor the artifact keeps in fp16).
    Also returns each part's gap (val_bpb drop when restored)."""
    rows = ["| part restored to the checkpoint | round-trip val_bpb | gap left | share of the gap |", "|---|---|---|---|"]
    fp16 = {n: original[n].to(state[n].dtype) for n in state if not n.endswith(tg.BANK_NAMES + tg.TABLE_NAMES)}
    gaps = {}
    for label, trial in [(r, tg.swap_role(state, original, r)[0]) for r in tg.ROLES] + [(FP16_PART, state | fp16)]:
        model.load_state_dict(trial)
        bpb = measure()
        gaps[label] = quantized_bpb - bpb
        rows.append(f"| {label} | {bpb:.5f} | {bpb - pre:+.5f} | {gaps[label] / max(quantized_bpb - pre, 1e-12):.0%} |")
        print(rows[-1], flush=True)
    return rows, gaps


def knob_run(pairs: str) -> tg.Hyperparameters:
    """The run's settings with KNOB=VALUE[,KNOB=VALUE] set in the environment (checked as a run checks them); a
    comma starts a new knob only before NAME=, so SDCLIP_COLUMN_ROLES=o,embed stays one value."""
    knobs = dict(p.strip().split("=", 1) for p in re.split(r",(?=\s*[A-Z][A-Z0-9_]*=)", pairs) if p.strip())
    unknown = sorted(set(knobs) - set(tg.CONFIG))
    if unknown:
        raise SystemExit(f"--env {pairs}: {', '.join(unknown)} is not a train_gpt.py knob")
    saved = {k: os.environ.get(k) for k in knobs}
    os.environ.update(knobs)
    try:
        return tg.Hyperparameters()
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="final_model.pt written by a train_gpt.py run")
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--only", type=int, nargs="*", help="variant numbers to run (default: all)")
    ap.add_argument("--attribute", type=int, help="variant number whose gap is split over the model's parts")
    ap.add_argument("--balance", type=int, nargs="*", default=[],
                    help="also export with the in-run role balance on each of these numbers of training batches")
    ap.add_argument("--freq-power", type=float, nargs="*", default=[],
                    help="also export balanced on 4 batches with each of these EMBED_FREQ_POWER values")
    ap.add_argument("--column-roles", nargs="*", default=[],
                    help="also export balanced on 4 batches with each of these SDCLIP_COLUMN_ROLES values "
                         "(e.g. none o,embed)")
    ap.add_argument("--env", nargs="*", default=[], metavar="KNOB=VALUE[,KNOB=VALUE]",
                    help="also export as a run of the recipe would (its role balance included) with these knobs "
                         "set, one variant per argument (e.g. GPTQ_SWEEPS=0 GPTQ_SWEEPS=1)")
    opts = ap.parse_args(argv)
    args, dctx, log = tg.Hyperparameters(), tg.Dist(), print
    saved = torch.load(opts.checkpoint, map_location="cpu")
    model = tg.model_from_state(saved["arch"], saved["state"], args, dctx.device, log, "checkpoint")
    model.act_dtype = torch.bfloat16 if dctx.device.type == "cuda" else torch.float32
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    val, luts = tg.load_eval_data(args, dctx, log)
    logits_fn = tg.compiled_logits(model, args)
    L = args.eval_seq_len
    measure = lambda: tg.evaluate(logits_fn, val, luts, L, L, args.eval_batch_seqs, dctx)[1]
    pre = measure()
    t = time.perf_counter()
    calib = saved.get("calib_batches")  # None: the run did not use GPTQ
    hessians, batches = tg.collect_hessians(model, args, dctx, log, args.gptq_calib_batches if calib is None else calib)
    calib_s = time.perf_counter() - t
    budget, attributed = args.size_limit - len(tg.code_info()[1]), []
    rows = [f"| export | model bytes | round-trip val_bpb | gap | export s | compressors at k x1 / fit |",
            "|---|---|---|---|---|---|",
            f"| unquantized checkpoint | — | {pre:.5f} | — | — | calibration: {batches} batches, {calib_s:.1f} s |"]
    variants = list(VARIANTS) + [(f"GPTQ + SDClip fit, roles balanced on {n} training batches",
                                  dict(quant_method="gptq", sdclip_balance_batches=n))
                                 for n in opts.balance] + [
                    (f"GPTQ + SDClip fit, roles balanced on 4 training batches, EMBED_FREQ_POWER={p:g}",
                     dict(quant_method="gptq", sdclip_balance_batches=4, embed_freq_power=p))
                    for p in opts.freq_power] + [
                    (f"GPTQ + SDClip fit, roles balanced on 4 training batches, SDCLIP_COLUMN_ROLES={r}",
                     dict(quant_method="gptq", sdclip_balance_batches=4,
                          column_roles=tuple(c for c in r.split(",") if c != "none")))
                    for r in opts.column_roles] + [
                    (f"as a run, {e}", dict(env=e)) for e in opts.env]  # these, and --attribute's, always run
    for i, (label, knobs) in enumerate(variants):
        if opts.only and i < len(VARIANTS) and i not in opts.only + [opts.attribute]:
            continue
        knobs = dict(knobs)
        as_run = knobs.pop("env", None)
        run = tg.Hyperparameters() if as_run is None else knob_run(as_run)
        if as_run is None:
            run.sdclip_balance_batches = 0  # unless the variant balances (the frontier recipe does by default)
        for k, v in knobs.items():
            setattr(run, k, v)
        lines = []
        if run.sdclip_balance_batches:  # as a run would, on the checkpoint's weights
            model.load_state_dict(original)
            tg.balance_roles(model, run, dctx, lines.append, hessians, batches)
            print(lines[-1], flush=True)
        t = time.perf_counter()
        blob, _ = tg.fit_artifact(original, hessians if run.quant_method == "gptq" else None, saved["arch"], run,
                                  budget, lines.append)
        secs = time.perf_counter() - t
        with tempfile.NamedTemporaryFile(suffix=".ptz") as f:
            f.write(blob)
            f.flush()
            _, state = tg.load_artifact(f.name)
        model.load_state_dict(state)
        bpb = measure()
        notes = "; ".join(ln.removeprefix("compressors: ") for ln in lines if ln.startswith(("compressors", "size_fit: k")))
        rows.append(f"| {label} | {len(blob)}{' (over)' if len(blob) > budget else ''} | {bpb:.5f} | "
                    f"{bpb - pre:+.5f} | {secs:.1f} | {notes} |")
        log(rows[-1])
        if opts.attribute == i:
            attributed, gaps = attribution(state, original, model, measure, bpb, pre)
            gaps.pop(FP16_PART)
            sizes = {r: tg.swap_role(original, original, r)[1] for r in tg.ROLES}  # weights of each role
            mults = tg.balanced_mults(gaps, sizes)
            attributed.append(f"\nbalanced from this attribution: {tg.role_knob(mults)}")
            variants.append((f"{label}, {tg.role_knob(mults)}", dict(variants[i][1], role_mult=mults)))
    table = "\n".join([f"budget (SIZE_LIMIT - counted code): {budget} bytes", ""] + rows + [""] + attributed)
    print(table)
    if opts.out:
        Path(opts.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
