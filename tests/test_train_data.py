"""Data side of train_gpt.py: shard validation, data/tokenizer/config errors, the rank-sliced train loader,
and the bits-per-byte accounting (SPEC §2.3-2.7)."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tg_helpers as H
import train_gpt as tg


# ----------------------------------------------------------------------------- shard header validation


def test_load_shard_reads_payload(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 1023, 7], dtype=np.int64)
    path = H.write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    got = tg.load_shard(str(path))
    assert got.dtype == np.dtype("<u2") and got.shape == (6,)
    np.testing.assert_array_equal(np.asarray(got), tokens)


@pytest.mark.parametrize("case, needle", [
    ("bad_magic", "bad magic 20240521"),
    ("bad_version", "unsupported version 2"),
    ("truncated", "header says 100 tokens"),
    ("trailing_bytes", "header says 10 tokens"),
    ("short_file", "shorter than the 1024-byte header"),
    ("empty_file", "file of 0 bytes"),
])
def test_load_shard_rejects_bad_files(tmp_path, case, needle):
    path = tmp_path / f"fineweb_train_{case}.bin"
    toks = np.arange(10)
    if case == "bad_magic":
        H.write_shard(path, toks, magic=20240521)
    elif case == "bad_version":
        H.write_shard(path, toks, version=2)
    elif case == "truncated":
        H.write_shard(path, toks, n_tokens=100)
    elif case == "trailing_bytes":
        H.write_shard(path, toks, extra=b"\0\0")
    elif case == "short_file":
        path.write_bytes(np.array([20240520, 1, 0], dtype="<i4").tobytes())
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError) as ei:
        tg.load_shard(str(path))
    msg = str(ei.value)
    assert str(path) in msg and needle in msg


def test_shard_files_errors_and_filtering(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="DATA_PATH") as ei:
        tg.shard_files(str(missing), "train")
    assert str(missing) in str(ei.value)
    d = tmp_path / "data"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no fineweb_train_\*\.bin shards") as ei:
        tg.shard_files(str(d), "train")
    assert str(d) in str(ei.value)
    for name in ("fineweb_train_000001.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin",
                 "fineweb_val_bytes_000000.bin", "other.bin"):
        H.write_shard(d / name, [1, 2, 3])
    assert [os.path.basename(f) for f in tg.shard_files(str(d), "train")] == \
        ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert [os.path.basename(f) for f in tg.shard_files(str(d), "val")] == ["fineweb_val_000000.bin"]


def test_load_val_tokens_truncates_to_whole_sequences(tmp_path):
    H.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100))
    H.write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(100, 150))
    v, split = tg.load_val_tokens(str(tmp_path), 16, 0)
    assert split == 149 and v.dtype == torch.int32 and v.numel() == (149 // 16) * 16 + 1  # 145 = 9 sequences + 1
    assert torch.equal(v, torch.arange(145, dtype=torch.int32))
    v, split = tg.load_val_tokens(str(tmp_path), 16, 40)  # VAL_TOKENS cap: 40 targets -> 2 whole sequences
    assert split == 149 and torch.equal(v, torch.arange(33, dtype=torch.int32)), "the split's count, not the cap's"
    with pytest.raises(SystemExit, match=f"the validation split in {tmp_path} has 149 targets, fewer than one "
                                         f"sequence of 256"):
        tg.load_val_tokens(str(tmp_path), 256, 0)


# ----------------------------------------------------------------------------- tokenizer errors


def _train_tokenizer(texts, vocab_size, path):
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.999, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        split_digits=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(SystemExit, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(tmp_path / "missing.model"), 1024)
    with pytest.raises(SystemExit) as ei:
        tg.load_tokenizer(str(H.TOKENIZER), 2048)
    assert str(H.TOKENIZER) in str(ei.value) and "VOCAB_SIZE=2048" in str(ei.value) and "1024" in str(ei.value)
    sp = tg.load_tokenizer(str(H.TOKENIZER), 1024)
    assert sp.vocab_size() == 1024
    pointer = tmp_path / "lfs.model"  # what a clone without Git LFS holds
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(SystemExit, match=f"tokenizer {pointer} is not a SentencePiece model .*TOKENIZER_PATH"):
        tg.load_tokenizer(str(pointer), 1024)
    # A model trained on text without spaces has no standalone U+2581 piece (SPEC §11.1 item 2).
    nospace = tmp_path / "nospace.model"
    sp2 = _train_tokenizer([d.replace(" ", "").replace("\n", "") for d in H.pydoc_docs()[:20]], 400, nospace)
    assert sp2.piece_to_id("\u2581") == sp2.unk_id()
    with pytest.raises(SystemExit, match="no standalone") as ei:
        tg.load_tokenizer(str(nospace), 400)
    assert str(nospace) in str(ei.value)


# ----------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("name, value", [
    ("NUM_LAYERS", "abc"), ("NUM_LAYERS", "1.5"), ("VE_ENABLED", "2"), ("VE_ENABLED", "yes"),
    ("MLP_MULT", "x"), ("VE_LAYERS", "1,a"), ("SEED", "1e3"), ("MAX_WALLCLOCK_SECONDS", "10m"),
])
def test_malformed_env_var_names_the_variable(make_args, name, value):
    with pytest.raises(SystemExit) as ei:
        make_args(**{name: value})
    assert name in str(ei.value) and repr(value) in str(ei.value)


def test_env_vars_are_typed_like_their_defaults(make_args):
    a = make_args(NUM_LAYERS="5", VE_ENABLED="0", MLP_MULT="2", VE_LAYERS="3, 4", MAX_WALLCLOCK_SECONDS="12.5",
                  TTT_MODE="sgd")
    assert a.num_layers == 5 and type(a.num_layers) is int
    assert a.ve_enabled is False
    assert a.mlp_mult == 2.0 and type(a.mlp_mult) is float
    assert a.ve_layers == [3, 4]
    assert a.max_wallclock_seconds == 12.5 and a.ttt_mode == "sgd"
    assert tg.CONFIG["NUM_LAYERS"] == 5 and tg.CONFIG["VE_ENABLED"] is False
    b = make_args(VE_ENABLED="")  # empty = default
    assert b.ve_enabled is True


@pytest.mark.parametrize("knobs, needle", [
    (dict(MODEL_DIM="65"), "MODEL_DIM"),
    (dict(NUM_HEADS="4", NUM_KV_HEADS="3"), "NUM_KV_HEADS"),
    (dict(ROPE_DIMS="15"), "ROPE_DIMS"),
    (dict(ROPE_DIMS="64"), "ROPE_DIMS"),
    (dict(VE_LAYERS="1,3"), "VE_LAYERS"),
    (dict(EVAL_STRIDE="0"), "EVAL_STRIDE"),
    (dict(EVAL_STRIDE="4096", TTT_ENABLED="1", TTT_MODE="sgd"), "EVAL_STRIDE must be <= EVAL_SEQ_LEN"),
    (dict(EVAL_STRIDE="65"), "EVAL_STRIDE"),
    (dict(COMPRESSOR="gzip"), "COMPRESSOR"),
    (dict(BIGRAM_VOCAB_SIZE="1"), "BIGRAM_VOCAB_SIZE"),
    (dict(GPTQ_CLIP_FRACS="1.0,1.5"), "GPTQ_CLIP_FRACS"),
    (dict(ATTENTION_BACKEND="flash"), "ATTENTION_BACKEND"),
    (dict(TTT_EPOCHS="0"), "TTT_EPOCHS"),
    (dict(EVAL_BATCH_SEQS="0"), "EVAL_BATCH_SEQS"),
    (dict(NUM_KV_HEADS="0"), "NUM_KV_HEADS"),
    (dict(TTT_BATCH_SEQS="0"), "TTT_BATCH_SEQS"),
    (dict(TTT_ENABLED="1", TTT_CHUNK_TOKENS="32", EVAL_SEQ_LEN="64"), "TTT_CHUNK_TOKENS"),
    (dict(VE_LAYERS="1,1"), "VE_LAYERS"),
    (dict(GRAD_ACCUM_STEPS="-1"), "GRAD_ACCUM_STEPS"),
    (dict(TTT_PREFIX_DOCS="-1"), "TTT_PREFIX_DOCS must be >= 0"),
    (dict(VAL_TOKENS="32"), "VAL_TOKENS must be 0 (the full split) or >= max(TRAIN_SEQ_LEN, EVAL_SEQ_LEN)"),
])
def test_invalid_config_is_rejected(make_args, knobs, needle):
    with pytest.raises(SystemExit) as ei:
        make_args(**knobs)
    assert needle in str(ei.value)


def test_malformed_clip_fracs_names_the_variable(make_args):
    with pytest.raises(SystemExit, match="GPTQ_CLIP_FRACS"):
        make_args(GPTQ_CLIP_FRACS="abc")


def test_odd_head_dim_with_full_rope_is_rejected(make_args):
    with pytest.raises(SystemExit):
        make_args(MODEL_DIM="66", NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="0")


def _main_env(make_args, monkeypatch, tmp_path, tiny_data, **knobs):
    monkeypatch.chdir(tmp_path)
    make_args(DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(H.TOKENIZER), TRAIN_BATCH_TOKENS="1024",
              VAL_TOKENS="4096", **knobs)


def test_world_size_that_does_not_divide_8(make_args, monkeypatch, tmp_path, tiny_data):
    _main_env(make_args, monkeypatch, tmp_path, tiny_data)
    monkeypatch.setattr(tg, "Dist", lambda: H.DistStub(rank=0, world_size=3))
    with pytest.raises(SystemExit, match="WORLD_SIZE=3 does not divide 8; set GRAD_ACCUM_STEPS"):
        tg.main()


def test_batch_not_divisible_by_world_and_accum(make_args, monkeypatch, tmp_path, tiny_data):
    _main_env(make_args, monkeypatch, tmp_path, tiny_data, GRAD_ACCUM_STEPS="3")
    with pytest.raises(SystemExit, match=r"TRAIN_BATCH_TOKENS=1024 is not divisible .* = 1\*3\*64"):
        tg.main()


def test_bad_batch_exits_nonzero_as_subprocess(tmp_path, tiny_data):
    env = H.clean_env()
    env.update(H.TINY_RUN)
    env.update(DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(H.TOKENIZER), TRAIN_BATCH_TOKENS="1000",
               RUN_ID="badbatch", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(H.TRAIN_GPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert "error: TRAIN_BATCH_TOKENS=1000 is not divisible by WORLD_SIZE*grad_accum*TRAIN_SEQ_LEN = 1*8*64" \
        in p.stderr
    assert "step:" not in p.stdout


# ----------------------------------------------------------------------------- rank slices of the train loader


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_slices_cover_each_global_batch_once(tmp_path, world):
    # token value = position in the concatenated stream (two shards of odd sizes, so batches straddle shards
    # and the stream wraps around)
    sizes = (1000, 777)
    total = sum(sizes)
    H.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(sizes[0]))
    H.write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(sizes[0], total))
    files = tg.shard_files(str(tmp_path), "train")
    seq_len, global_tokens, grad_accum = 16, 256, 8 // world
    local = global_tokens // (world * grad_accum)
    loaders = [tg.TrainLoader(files, r, world, local, seq_len, torch.device("cpu")) for r in range(world)]
    consumed = 8 * (local + 1)  # W * grad_accum segments of (local_tokens + 1)
    for step in range(12):  # 12 * 264 > 1777: wraps around
        seen = []
        for m in range(grad_accum):
            for r, loader in enumerate(loaders):
                x, y = loader.next_batch()
                assert x.shape == y.shape == (local // seq_len, seq_len) and x.dtype == torch.int64
                seg = torch.cat((x.reshape(-1), y.reshape(-1)[-1:]))
                assert torch.equal(y.reshape(-1), seg[1:]), "targets are the inputs shifted by one"
                # micro-step m, rank r reads segment m*W + r of this step's contiguous span
                k = m * world + r
                expect = (step * consumed + k * (local + 1) + torch.arange(local + 1)) % total
                assert torch.equal(seg, expect), (step, m, r)
                seen.append(seg)
        span = torch.cat(seen)
        assert torch.equal(span, (step * consumed + torch.arange(consumed)) % total)
        assert span.unique().numel() == consumed  # no token read twice


def test_train_stream_refuses_val_shards(tmp_path):
    train = H.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(50))
    val = H.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(50))
    tg.TokenStream([str(train)])
    with pytest.raises(ValueError, match="validation shard"):
        tg.TokenStream([str(train), str(val)])
    with pytest.raises(ValueError, match="validation shard"):
        tg.TrainLoader([str(val)], 0, 1, 16, 16, torch.device("cpu"))


# ----------------------------------------------------------------------------- bits-per-byte accounting


def _strip_unknown_chars(sp, text):
    """The sp1024 model has no byte fallback: characters it maps to <unk> (e.g. '{', '#') are dropped so that
    decode(encode(text)) is the normalized text itself."""
    bad = {c for c in set(text) if sp.unk_id() in sp.encode(c)}
    return "".join(c for c in text if c not in bad)


def _check_bytes(sp, docs):
    luts = tg.byte_luts(sp, sp.vocab_size())
    stream, expected = [], 0
    for d in docs:
        ids = sp.encode(d)
        assert sp.unk_id() not in ids
        stream += [H.BOS] + ids
        expected += len(sp.decode(ids).encode("utf-8"))
    t = torch.tensor(stream)
    per_target = tg.target_bytes(t[:-1], t[1:], luts)
    assert per_target.dtype == torch.float64
    assert per_target.sum().item() == expected
    # BOS targets (predicting "end of document") carry no bytes
    assert per_target[t[1:] == H.BOS].sum().item() == 0
    return len(stream)


def test_bytes_match_utf8_of_decoded_text_sp1024(sp1024):
    docs = [_strip_unknown_chars(sp1024, d) for d in H.pydoc_docs()[:30]]
    n = _check_bytes(sp1024, docs)
    assert n > 20000


def test_bytes_match_utf8_with_byte_fallback(tmp_path):
    docs = H.pydoc_docs()
    sp = _train_tokenizer(docs[:40], 512, tmp_path / "bf.model")
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    rare = ["Emoji \U0001F600 and CJK \u6f22\u5b57 in one line, caf\u00e9 na\u00efve \u00df \u2014 done.",
            "\u4e2d\u6587\u6bb5\u843d \U0001F680\U0001F30D r\u00e9sum\u00e9 {braces} #hash <tag>",
            "Zw\u00f6lf Boxk\u00e4mpfer jagen Viktor quer \u00fcber den gro\u00dfen Sylter Deich."]
    sample = rare + docs[40:50] + rare
    ids = sp.encode(rare[0])
    assert any(sp.is_byte(i) for i in ids), "the sample must contain byte-fallback pieces"
    _check_bytes(sp, sample)


def test_leading_space_rule_at_document_start(sp1024):
    luts = tg.byte_luts(sp1024, 1024)
    the = sp1024.piece_to_id("\u2581the")
    assert sp1024.id_to_piece(the) == "\u2581the"
    word = sp1024.piece_to_id("in")
    prev = torch.tensor([H.BOS, word, 2, 0])
    tgt = torch.tensor([the, the, the, the])
    # after BOS/EOS/PAD the leading space is not counted; after a normal piece it is (SPEC §2.7)
    assert tg.target_bytes(prev, tgt, luts).tolist() == [3.0, 4.0, 3.0, 3.0]
    base, space, boundary = luts
    for special in (0, 1, 2, 3):
        assert base[special] == 0 and not space[special] and boundary[special]
    assert base[sp1024.piece_to_id("\u2581")] == 0 and space[sp1024.piece_to_id("\u2581")]


# ----------------------------------------------------------------------------- Parallel Muon (MUON_SHARDED)


@pytest.mark.tg_runs("acc_1p", "acc_2p_sharded")
def test_parallel_muon_trains_like_one_process(tg_runs):
    """MUON_SHARDED=1 on 2 gloo ranks: the same training as 1 process with 8 micro-batches (val curve, export
    weights), with each rank running Newton-Schulz on its half of every bank."""
    one, two = tg_runs("acc_1p"), tg_runs("acc_2p_sharded")
    assert one.rc == 0 and two.rc == 0, two.describe()
    assert "config MUON_SHARDED=True" in two.log.splitlines()
    assert "muon:parallel each rank orthogonalizes 1/2 of every bank's matrices" in two.log.splitlines()
    assert "muon:parallel" not in one.log, "one process has nothing to shard"
    H.assert_same_training(one.log, two.log)


def test_parallel_muon_overlaps_its_collectives_with_compute(monkeypatch):
    """Every bank's reduce-scatter starts before any is waited for; each bank's all-gather starts before the next
    bank's Newton-Schulz and is waited for only after the last one; the gathered update is applied. Collectives
    are faked for 2 ranks that hold the same gradients."""
    events = []

    class Work:
        def __init__(self, name):
            self.name = name

        def wait(self):
            events.append("wait " + self.name)

    def reduce_scatter(shard, grad, async_op=False):
        assert async_op
        shard.copy_(2 * grad[:shard.size(0)])  # the sum over 2 identical ranks of this rank's half
        events.append(f"scatter {grad.shape[1]}")
        return Work(f"scatter {grad.shape[1]}")

    def all_gather(full, update, async_op=False):
        assert async_op
        full.copy_(torch.cat([update, update]))
        events.append(f"gather {update.shape[1]}")
        return Work(f"gather {update.shape[1]}")

    def newton_schulz(G, steps, polar=False):
        events.append(f"ns {G.shape[1]}")
        return G / G.norm()

    monkeypatch.setattr(tg.dist, "reduce_scatter_tensor", reduce_scatter)
    monkeypatch.setattr(tg.dist, "all_gather_into_tensor", all_gather)
    monkeypatch.setattr(tg, "newton_schulz", newton_schulz)
    banks = [torch.nn.Parameter(torch.ones(4, rows, 3)) for rows in (5, 6)]  # rows tell the banks apart
    for p in banks:
        p.grad = torch.full_like(p, 0.5)
    stub = H.DistStub(world_size=2)
    muon = tg.Muon(banks, lr=0.1, momentum=0.0, backend_steps=5, weight_decay=0.0, dctx=stub)
    muon.scatter_grads()
    assert events == ["scatter 5", "scatter 6"]
    muon.finish_scatter()
    muon.step()
    assert events[2:] == ["wait scatter 5", "wait scatter 6", "ns 5", "gather 5", "ns 6", "gather 6",
                          "wait gather 5", "wait gather 6"]
    for p in banks:  # each rank's shard (2 of 4 matrices) is orthogonalized and the gathered update applied
        torch.testing.assert_close(p.data, torch.ones_like(p) - 0.1 * max(1.0, p.size(1) / 3) ** 0.5 / (2 * p[0].numel()) ** 0.5)


def test_clip_sharded_is_clip_grad_norm_over_the_union():
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    shards = [torch.randn(2, 4, 4, generator=g)]
    ref = [t.clone().requires_grad_() for t in full + shards]
    for r, t in zip(ref, full + shards):
        r.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(ref, 0.5)
    tg.clip_sharded(full, shards, 0.5, H.DistStub())
    for r, t in zip(ref, full + shards):
        torch.testing.assert_close(t, r.grad)


@pytest.mark.parametrize("backend", ["fa3", "fa4"])
def test_unavailable_attention_backend_stops_the_run_with_the_reason(make_args, backend):
    a = make_args(ATTENTION_BACKEND=backend)
    logs = []
    with pytest.raises(SystemExit, match=f"ATTENTION_BACKEND={backend} but"):
        tg.start_run(a, H.DistStub(), logs.append)  # CPU: neither FlashAttention build can run
    assert tg.ATTENTION_BACKEND == "sdpa"
