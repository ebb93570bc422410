"""Size analysis of a saved artifact: per-group order-0 entropy of the integer codes and compressed sizes
under several compressors, plus the entropy if int6 steps were coarsened by a factor. Usage: size_probe.py ART"""
import io, lzma, sys, time, os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np, torch, zstandard
import train_gpt as tg
data = open(sys.argv[1], "rb").read()
raw = zstandard.ZstdDecompressor().decompress(data[10:])
obj = torch.load(io.BytesIO(raw), weights_only=True)
w = obj["weights"]
def H(a):
    _, c = np.unique(a, return_counts=True); p = c / c.sum(); return float(-(p * np.log2(p)).sum())
tot_bits = 0
for k, t in w.items():
    if k.endswith((".q6", ".q8")):
        a = t.numpy().ravel(); h = H(a); tot_bits += h * a.size
        print(f"{k:28s} n={a.size:9d} H0={h:.3f} bits  std={a.std():.2f}  frac_zero={np.mean(a == 0):.3f}")
print(f"order-0 entropy of all codes: {tot_bits / 8 / 1e6:.3f} MB; artifact {len(data) / 1e6:.3f} MB; raw {len(raw) / 1e6:.3f} MB")
codes = b"".join(t.numpy().tobytes() for k, t in w.items() if k.endswith((".q6", ".q8")))
for name, f in [("zstd22", lambda b: zstandard.ZstdCompressor(level=22).compress(b)),
                ("zstd19", lambda b: zstandard.ZstdCompressor(level=19).compress(b)),
                ("lzma9e", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))]:
    t = time.time(); n = len(f(codes)); print(f"{name} codes-only: {n / 1e6:.3f} MB in {time.time() - t:.1f}s")
for alpha in (1.15, 1.3, 1.5):
    bits = sum(H(np.round(t.numpy().ravel() / alpha)) * t.numel() for k, t in w.items() if k.endswith(".q6"))
    bits += sum(H(t.numpy().ravel()) * t.numel() for k, t in w.items() if k.endswith(".q8"))
    print(f"int6 step x{alpha}: order-0 entropy {bits / 8 / 1e6:.3f} MB")
