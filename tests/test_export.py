"""Quantization and artifact export of train_gpt.py (SPEC §6-7, §10.3, §10.8): fake-quant/STE on the export grid,
the per-row clip search and SDClip, full-Hessian GPTQ and its calibration, LQER, the size fit,
byte planes, the banks' rANS coder and the three compressors, artifact round trips and corrupted-artifact errors. The end-to-end export
checks (the EMA export, size accounting, over-the-cap runs) are in test_runs.py."""
from __future__ import annotations

import hashlib
import os
import struct

import pytest
import torch

import train_gpt as tg

CPU = torch.device("cpu")
FRACS = [1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.8]


def heavy_tailed(rows, cols, seed=0):
    """Gaussian rows with a few large outliers: the case where clipping below the row max pays off."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    idx = torch.randint(0, cols, (rows,), generator=g)
    w[torch.arange(rows), idx] += torch.randn(rows, generator=g).sign() * 0.6
    return w


def row_err(w, q, s):
    return (q.float() * s.float()[:, None] - w).square().sum(-1)


# ----------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("method", ["search", "gptq"])
def test_fake_quant_forward_is_quant_dequant_and_backward_is_identity(make_args, method):
    a = make_args(QUANT_METHOD=method, GPTQ_RESERVE_SECONDS="12")
    w = heavy_tailed(2 * 24, 32).view(2, 24, 32).requires_grad_(True)
    out = tg.fake_quant(w, a, "mlp_up_bank", "mlp")
    if method == "search":
        q, s = tg.quantize_rows(w.detach(), 31, FRACS)
    else:  # SDClip: step = k * std(row) / 31, k of the MLP family
        s = tg.log_grid(tg.log_code(a.sdclip_k_mlp * w.detach().std(-1) / 31))
        q = torch.clamp(torch.round(w.detach() / s.float().unsqueeze(-1)), -31, 31)
    assert torch.equal(out.detach(), q.float() * s.float().unsqueeze(-1))
    assert not torch.equal(out.detach(), w.detach())
    g = torch.randn_like(w)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g), "straight-through estimator: d fake_quant(w) / dw = identity"


@pytest.mark.parametrize("qmax", [31, 127])
def test_codes_in_range_and_within_half_step(qmax):
    w = heavy_tailed(64, 48, seed=qmax)
    q, s = tg.quantize_rows(w, qmax, [1.0])
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (64,)
    assert torch.equal(tg.log_grid(tg.log_code(s)), s), "steps lie on the stored grid"
    assert q.abs().max() == qmax  # the row max lands on the last code
    err = (q.float() * s[:, None] - w).abs()
    # frac 1.0: every value within half a step, but the row max, which the grid (2^(1/32) off at most) may clip
    inside = (w / s[:, None]).abs() <= qmax + 0.5
    assert (err[inside] <= (s[:, None] * 0.5 + 1e-6).expand_as(w)[inside]).all()
    assert (err <= s[:, None] * (0.5 + qmax * (2 ** (1 / 32) - 1)) + 1e-6).all()
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(qmax))  # wide Gaussian rows: clips pay
    q2, s2 = tg.quantize_rows(w, qmax, FRACS)
    assert q2.abs().max() <= qmax
    inside = (w / s2.float()[:, None]).abs() <= qmax  # not clipped
    err2 = (q2.float() * s2.float()[:, None] - w).abs()
    assert (err2[inside] <= (s2.float()[:, None].expand_as(w) * 0.5 + 1e-6)[inside]).all()
    assert (~inside).any(), "the search should clip some values of these rows"


def test_clip_search_never_worse_per_row_than_max_abs():
    g = torch.Generator().manual_seed(1)
    w = torch.cat([torch.randn(64, 512, generator=g), heavy_tailed(16, 512, seed=2), torch.zeros(1, 512)])
    q1, s1 = tg.quantize_rows(w, 31, [1.0])
    q2, s2 = tg.quantize_rows(w, 31, FRACS)
    e1, e2 = row_err(w, q1, s1), row_err(w, q2, s2)
    assert (e2 <= e1).all()
    assert (e2[:64] < e1[:64]).sum() >= 32, "a clip below the max must win on most Gaussian rows"
    assert torch.equal(q2[-1], torch.zeros(512, dtype=torch.int8))  # an all-zero row stays zero
    # per-row choice: every row's scale is one of the candidate clips of that row
    row_max = w.abs().amax(-1)
    cands = torch.stack([tg.log_grid(tg.log_code(row_max * f / 31)) for f in FRACS], -1)
    assert (cands == s2[:, None]).any(-1).all()


def test_quantize_state_routing_and_ranges(make_args):
    torch.manual_seed(0)
    m = tg.GPT(make_args())
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 3.0)  # large values: clamping must hold
    state = {k: v.detach() for k, v in m.state_dict().items()}
    packed = tg.quantize_state(state, make_args())
    for name, t in state.items():
        if name.endswith("_bank"):
            q = packed[name + ".q"]
            assert q.dtype == torch.int8 and q.shape == t.shape
            assert q.abs().max() == 31 and q.min() >= -31
            assert packed[name + ".qscale"].shape == (t.numel() // t.size(-1),)
            assert packed[name + ".qscale"].dtype == torch.int16
        elif name in tg.TABLE_NAMES:
            q = packed[name + ".q"]
            assert q.dtype == torch.int8 and q.abs().max() == 127 and q.min() >= -127
        else:
            assert packed[name].dtype == torch.float16 and name + ".qscale" not in packed
    deq = tg.dequantize_state(packed)
    assert deq.keys() == state.keys()
    for name, t in state.items():
        assert deq[name].dtype == torch.float32 and deq[name].shape == t.shape
        if not name.endswith("_bank") and name not in tg.TABLE_NAMES:
            torch.testing.assert_close(deq[name], t.half().float(), rtol=0, atol=0)


def test_row_steps_are_stored_as_log_grid_codes():
    """A row step is stored as the int16 code c of 2^(c/16): SDClip's step is within 2^(1/32) of k std / qmax,
    the step the codes were rounded on comes back exactly, and a bank's worth of steps costs under half the
    bytes of fp16."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 64, generator=g) * torch.exp(torch.randn(512, 1, generator=g) * 0.3) * 0.02
    steps = tg.sdclip_steps(w, 12.0, 31).squeeze(-1)
    assert ((steps / (12.0 * w.std(-1) / 31)).log2().abs() <= 1 / 32 + 1e-6).all()
    for s in (steps, tg.quantize_rows(w, 31, FRACS)[1]):
        codes = tg.log_code(s)
        assert codes.dtype == torch.int16 and torch.equal(tg.log_grid(codes), s)
    q = torch.clamp(torch.round(w / steps[:, None]), -31, 31).to(torch.int8)
    deq = tg.dequantize_state({"a.q": q, "a.qscale": tg.log_code(steps)})["a"]
    assert torch.equal(deq, q.float() * steps[:, None])
    steps = torch.exp(torch.randn(45_000, generator=g) * 0.3) * 0.01
    packed_bytes = lambda t: len(tg._compress(tg.tensor_bytes(t), "lzma"))
    assert packed_bytes(tg.log_code(steps)) < 0.5 * packed_bytes(steps.half())


# ----------------------------------------------------------------------------- artifact round trip


def _trained_like_model(make_args, seed=0, **knobs):
    a = make_args(**knobs)
    torch.manual_seed(seed)
    m = tg.GPT(a)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m, a


def _artifact(m, a, path, compressor):
    arch = {k: getattr(a, k) for k in tg.ARCH_KEYS}
    packed = tg.quantize_state(m.state_dict(), a)
    blob = tg.pack_artifact(packed, arch, compressor)
    tg.write_atomic(str(path), blob)
    return blob, sum(t.numel() * t.element_size() for t in packed.values())


@pytest.mark.parametrize("compressor", ["brotli", "zstd", "lzma"])
def test_artifact_round_trip_matches_in_memory_dequantization(make_args, tmp_path, compressor, monkeypatch):
    m, a = _trained_like_model(make_args)
    path = tmp_path / f"model.{compressor}.ptz"
    blob, raw = _artifact(m, a, path, compressor)
    assert path.read_bytes() == blob and blob[:6] == tg.ARTIFACT_MAGIC
    assert tg.COMPRESSOR_NAMES[blob[6:10]] == compressor
    assert len(blob) < raw
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "write_atomic leaves no temporary file"
    ref = tg.GPT(a)
    ref.load_state_dict(tg.dequantize_state(tg.quantize_state(m.state_dict(), a)))
    # rebuild from the file with a deliberately different architecture in args: the artifact's arch wins
    b = make_args(NUM_LAYERS="5", MODEL_DIM="32", VE_LAYERS="4")
    monkeypatch.setattr(tg.GPT, "_init_weights", lambda self: pytest.fail("loaded weights need no random init"))
    loaded = tg.model_from_artifact(str(path), b, CPU)
    assert b.num_layers == a.num_layers and b.model_dim == a.model_dim and b.ve_layers == a.ve_layers
    ids = torch.randint(0, a.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, orig = ref.forward_logits(ids), loaded.forward_logits(ids), m.forward_logits(ids)
    assert torch.equal(got, want)
    assert not torch.equal(got, orig), "the artifact holds quantized weights"
    torch.testing.assert_close(got, orig, atol=0.2, rtol=0)


def test_write_atomic_replaces_existing_file(tmp_path):
    path = tmp_path / "a.ptz"
    path.write_bytes(b"old contents that are longer")
    tg.write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.ptz"]


@pytest.fixture
def good_blob(make_args, tmp_path):
    m, a = _trained_like_model(make_args)
    blobs = {c: _artifact(m, a, tmp_path / f"good.{c}", c)[0] for c in ("brotli", "zstd", "lzma")}
    return blobs, a


def _resign(body: bytes) -> bytes:
    """A PGOLF6 file of `body` (everything before the checksum) with a matching trailing SHA-256: a corruption
    that the checksum cannot see, so the parser behind it is exercised."""
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("case", ["truncated_half", "truncated_tail", "wrong_magic", "unknown_compressor",
                                  "empty", "garbage_payload", "signed_unknown_compressor", "signed_garbage_payload",
                                  "signed_truncated_stream", "signed_truncated_chunks", "signed_bad_header_json"])
@pytest.mark.parametrize("compressor", ["brotli", "zstd", "lzma"])
def test_corrupted_artifact_fails_with_clear_error(good_blob, tmp_path, case, compressor):
    blob = good_blob[0][compressor]
    body = blob[:-32]
    hlen = struct.unpack("<I", body[10:14])[0]
    bad = {
        "truncated_half": blob[: len(blob) // 2],
        "truncated_tail": blob[:-16],
        "wrong_magic": b"NOTPG3" + blob[6:],
        "unknown_compressor": blob[:6] + b"gzip" + blob[10:],
        "empty": b"",
        "garbage_payload": blob[:10] + bytes(range(256)) * 8,
        "signed_unknown_compressor": _resign(body[:6] + b"gzip" + body[10:]),
        "signed_garbage_payload": _resign(body[:14 + hlen] + bytes(range(256)) * 8),
        "signed_truncated_stream": _resign(body[:-100]),
        "signed_truncated_chunks": _resign(body[:14 + hlen + 10] + body[14 + hlen + 30:]),
        "signed_bad_header_json": _resign(body[:14] + b"{" * hlen + body[14 + hlen:]),
    }[case]
    path = tmp_path / f"bad_{case}.ptz"
    path.write_bytes(bad)
    with pytest.raises(ValueError) as ei:
        tg.load_artifact(str(path))
    assert str(path) in str(ei.value)
    if case in ("wrong_magic", "empty"):
        assert "bad magic" in str(ei.value)
    elif case.startswith("signed_"):  # past the checksum: the parser names the damage
        assert "corrupted and cannot be loaded" in str(ei.value)
    else:  # a truncated file or a changed byte: the trailing SHA-256 no longer matches
        assert "checksum does not match" in str(ei.value)
    with pytest.raises(ValueError):
        tg.model_from_artifact(str(path), good_blob[1], CPU)


def test_missing_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        tg.load_artifact(str(tmp_path / "nope.ptz"))


def _flip_positions(blob):
    n = len(blob)
    return [10 + (n - 10) * k // 9 for k in range(1, 9)]  # 8 bytes spread over the compressed payload


def _assert_flips_detected(blob, tmp_path):
    for i in _flip_positions(blob):
        b = bytearray(blob)
        b[i] ^= 0x10
        path = tmp_path / f"flip{i}.ptz"
        path.write_bytes(bytes(b))
        with pytest.raises(ValueError) as ei:
            tg.load_artifact(str(path))
        assert str(path) in str(ei.value)


def test_flipped_bytes_detected_lzma(good_blob, tmp_path):
    _assert_flips_detected(good_blob[0]["lzma"], tmp_path)


def test_flipped_bytes_detected_zstd(good_blob, tmp_path):
    _assert_flips_detected(good_blob[0]["zstd"], tmp_path)


def test_flipped_bytes_detected_brotli(good_blob, tmp_path):
    _assert_flips_detected(good_blob[0]["brotli"], tmp_path)


def _codes(shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.clamp(torch.round(torch.randn(shape, generator=g) * scale), -31, 31).to(torch.int8).numpy()


def _order0_bytes(m):
    import numpy as np
    p = np.bincount(m.reshape(-1).astype(np.int64) + 128) / m.size
    return -(p[p > 0] * np.log2(p[p > 0])).sum() * m.size / 8


def test_rans_round_trips_any_codes_at_every_lane_count():
    """Every int8 value, one-code matrices, a code seen once in 2^20 (frequency 1, which the most frequent code
    pays for), one-element matrices, and sizes from one lane to many (the last step padded) decode exactly; a
    stream one word short or long, or cut inside, and tables that do not fit the tensors are refused."""
    import numpy as np
    full = np.arange(-128, 128, dtype=np.int8).repeat(3).reshape(3, 256)
    rare = np.zeros((1, 1 << 20), np.int8)
    rare[0, 7] = -127
    for mats in ([full], [np.zeros((5, 7), np.int8)], [rare], [rare[:, :1], full[:1, :1]],
                 [_codes((64, 3001), 2.5, 0), _codes((7, 64), 9.0, 1)], [_codes((400, 1000), 3.0, 2)]):
        freq = tg.ans_tables(mats)
        present = np.stack([np.bincount(m.reshape(-1).astype(np.int64) + 128, minlength=256) > 0 for m in mats])
        assert (freq.sum(1) == 1 << tg.ANS_PREC).all() and ((freq > 0) == present).all()
        stream = tg.ans_encode(mats, freq)
        sizes = [m.size for m in mats]
        got = tg.ans_decode(freq.astype(np.int32), stream, sizes)
        assert np.array_equal(got, np.concatenate([m.reshape(-1) for m in mats]))
        lanes = tg.ans_matrix_ids(sizes).shape[1]
        for bad in (stream[:-2], stream + b"\0\0", stream[:4 * lanes + 2] + stream[4 * lanes + 4:]):
            if bad != stream:
                with pytest.raises(ValueError):
                    tg.ans_decode(freq, bad, sizes)
    assert tg.ans_tables([rare])[0, 1] == 1
    assert [tg.ans_matrix_ids([n]).shape for n in (5, 3 << 14, 1 << 24)] == [(5, 1), (1 << 14, 3), (1 << 14, 1024)]
    freq = tg.ans_tables([full])
    for bad in (np.concatenate([freq, freq]), freq - (np.arange(256) == 0), np.where(np.arange(256) == 5, -1, freq + 0)):
        with pytest.raises(ValueError, match="tables do not match"):
            tg.ans_decode(bad, tg.ans_encode([full], freq), [full.size])


def test_rans_codes_within_a_few_bytes_of_the_entropy_and_below_brotli():
    """Two matrices of int6-like codes at different widths (as a bank's q and o): the stream is each matrix's
    order-0 entropy plus its states and the tables' rounding, about 1 % under brotli of the same bytes."""
    import brotli
    mats = [_codes((512, 1024), 2.2, 3), _codes((512, 1024), 6.0, 4)]
    stream = tg.ans_encode(mats, tg.ans_tables(mats))
    entropy = sum(_order0_bytes(m) for m in mats)
    lanes = tg.ans_matrix_ids([m.size for m in mats]).shape[1]
    assert entropy < len(stream) < entropy * 1.0005 + 4 * lanes + 16, (len(stream), entropy)
    assert len(stream) < 0.993 * len(brotli.compress(b"".join(m.tobytes() for m in mats), quality=11, lgwin=24))


def test_packed_banks_go_to_the_rans_stream(make_args):
    """pack_artifact codes 3-D int8 tensors (the banks) by rANS, listed in the header, and everything else through
    the compressor's chunks; the size model counts each bank matrix as the stream does."""
    import json
    m, a = _trained_like_model(make_args)
    packed = tg.quantize_state(m.state_dict(), a)
    banks = sorted(k for k, t in packed.items() if t.dim() == 3 and t.dtype == torch.int8)
    blob = tg.pack_artifact(packed, {"num_layers": a.num_layers}, "lzma")
    hlen = struct.unpack("<I", blob[10:14])[0]
    header = json.loads(blob[14:14 + hlen])
    assert banks and [k for k, _ in header["ans"]] == banks and not set(banks) & {k for k, *_ in header["tensors"]}
    mats = [x for k in banks for x in packed[k].numpy()]
    stream = tg.ans_encode(mats, tg.ans_tables(mats))
    assert blob[14 + hlen + sum(header["chunks"]):-32] == stream
    assert tg.size_model({k: packed[k] for k in banks}) == pytest.approx(sum(_order0_bytes(x) for x in mats))


# ----------------------------------------------------------------------------- size fitting (SIZE_FIT)


def test_step_mult_coarsens_int6_steps():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    q1, s1 = tg.quantize_rows(w, 31, [1.0])
    q2, s2 = tg.quantize_rows(w, 31, [1.0], step_mult=2.0)
    torch.testing.assert_close(s2.float(), (s1.float() * 2), rtol=2e-3, atol=0)  # steps twice as big
    assert q2.abs().max() == round(31 / 2) and q1.abs().max() == 31
    assert row_err(w, q2, s2).sum() > row_err(w, q1, s1).sum()


def test_fit_artifact_shrinks_to_budget(make_args, tmp_path):
    """QUANT_METHOD=search (the 2026-03-23 export): a fitting model is left alone; over budget, one step
    multiplier for every quantized tensor, found on the real compressed size."""
    m, a = _trained_like_model(make_args, COMPRESSOR="lzma")
    state = {k: v.detach() for k, v in m.state_dict().items()}
    arch = {k: getattr(a, k) for k in tg.ARCH_KEYS}
    natural = tg.pack_artifact(tg.quantize_state(state, a), arch, "lzma")
    logs = []
    blob, _ = tg.fit_artifact(state, None, arch, a, len(natural), logs.append)
    assert blob == natural and logs == [f"compressors: lzma:{len(natural)} chosen:lzma"]
    budget = int(0.9 * len(natural))
    blob, _ = tg.fit_artifact(state, None, arch, a, budget, logs.append)
    assert len(blob) <= budget
    fit = [ln for ln in logs if ln.startswith("size_fit: k x")]
    assert len(fit) == 1 and f"model_bytes:{len(blob)} budget:{budget} unfitted:{len(natural)}" in fit[0]
    mult = float(fit[0].split("k x")[1].split()[0])
    assert 1.0 < mult < 8.0
    path = tmp_path / "fit.ptz"
    tg.write_atomic(str(path), blob)
    _, fitted = tg.load_artifact(str(path))
    plain = tg.dequantize_state(tg.quantize_state(state, a))
    assert fitted.keys() == plain.keys()
    for name in plain:
        if name.endswith("_bank") or name in tg.TABLE_NAMES:
            assert not torch.equal(fitted[name], plain[name])
            assert (fitted[name] - state[name]).norm() / state[name].norm() < 0.3
        else:
            assert torch.equal(fitted[name], plain[name]), f"{name} is not quantized and must not change"
    # SIZE_FIT=0: the plain artifact even when it is over budget
    blob, _ = tg.fit_artifact(state, None, arch, make_args(SIZE_FIT="0", COMPRESSOR="lzma"), budget, logs.append)
    assert blob == natural
