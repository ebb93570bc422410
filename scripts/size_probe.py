#!/usr/bin/env python3
"""Size analysis of an artifact written by train_gpt.py (ARTIFACT_PATH, e.g. final_model.int6.ptz).

    python3 scripts/size_probe.py final_model.int6.ptz [--no-recompress]

Prints, per quantized tensor, the order-0 entropy of its integer codes; the total entropy against the artifact
size; the codes-only size under zstd-19/22 and lzma-9e; and the entropy if every int6 step were coarser by a
factor. The artifact is read with train_gpt.load_artifact, so every format it can load works here.
"""
import argparse
import lzma
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

INT_DTYPES = (torch.int8, torch.uint8, torch.int16)


def load_codes(path: str) -> dict[str, torch.Tensor]:
    """The packed tensors as stored (integer codes, scales, fp16 rest). load_artifact's last step turns them
    into floats; skipping that one step keeps the artifact format parsed in a single place, train_gpt.py."""
    with mock.patch.object(tg, "dequantize_state", lambda packed: packed):
        _, packed = tg.load_artifact(path)
    return packed


def entropy_bits(a: np.ndarray) -> float:
    _, counts = np.unique(a, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def compressors():
    import zstandard
    return [("zstd19", lambda b: zstandard.ZstdCompressor(level=19).compress(b)),
            ("zstd22", lambda b: zstandard.ZstdCompressor(level=22).compress(b)),
            ("lzma9e", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))]


def probe(path: str, recompress: bool = True) -> dict:
    packed = load_codes(path)
    codes = {k: t.numpy().ravel() for k, t in packed.items() if t.dtype in INT_DTYPES}
    total_bits = 0.0
    for name, a in codes.items():
        h = entropy_bits(a)
        total_bits += h * a.size
        print(f"{name:32s} n={a.size:9d} H0={h:.3f} bits std={a.std():.2f} frac_zero={np.mean(a == 0):.3f}")
    size = Path(path).stat().st_size
    raw = sum(t.numel() * t.element_size() for t in packed.values())
    print(f"order-0 entropy of all codes: {total_bits / 8e6:.3f} MB; artifact {size / 1e6:.3f} MB; "
          f"uncompressed payload {raw / 1e6:.3f} MB")
    blob = b"".join(a.tobytes() for a in codes.values())
    for name, fn in compressors() if recompress else []:
        t = time.time()
        print(f"{name} codes only: {len(fn(blob)) / 1e6:.3f} MB in {time.time() - t:.1f}s")
    int6 = [a for k, a in codes.items() if k.endswith("_bank.q")]
    rest_bits = total_bits - sum(entropy_bits(a) * a.size for a in int6)
    for factor in (1.15, 1.3, 1.5):
        bits = rest_bits + sum(entropy_bits(np.round(a / factor)) * a.size for a in int6)
        print(f"matrix step x{factor}: order-0 entropy {bits / 8e6:.3f} MB")
    return {"artifact_bytes": size, "payload_bytes": raw, "entropy_bytes": total_bits / 8, "tensors": len(codes)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", help="artifact file written by train_gpt.py (ARTIFACT_PATH)")
    ap.add_argument("--no-recompress", action="store_true", help="skip the (slow) codes-only compressions")
    a = ap.parse_args(argv)
    try:
        probe(a.artifact, recompress=not a.no_recompress)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
