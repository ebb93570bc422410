"""Tests of the data tools: shard builder, train/val split, smoke dataset, Hub downloader.

CPU only, no network except a local HTTP server on 127.0.0.1 that plays the Hugging Face Hub for the
real `huggingface_hub` client (the downloader runs as a subprocess with HF_ENDPOINT pointing at it).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
sys.path.insert(0, str(DATA))

import build_shards as bs  # noqa: E402
import make_smoke_dataset as smoke  # noqa: E402
from shard_format import HEADER_BYTES, SHARD_MAGIC, ShardError, inspect_shard, read_shard, write_shard  # noqa: E402

DOWNLOADER = DATA / "cached_challenge_fineweb.py"


# --------------------------------------------------------------------------------------------------
# helpers / fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_a")
    t0 = time.time()
    paths = smoke.build_smoke_dataset(out, log=None)
    paths["seconds"] = time.time() - t0
    return paths


@pytest.fixture(scope="module")
def sp(smoke_build):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(smoke_build["tokenizer_path"]))


def split_docs(tokens: np.ndarray) -> list[list[int]]:
    """Split a BOS-separated stream into documents (BOS dropped); the stream must start with BOS."""
    assert tokens.size and tokens[0] == bs.BOS_ID, "stream must start with BOS"
    starts = np.flatnonzero(tokens == bs.BOS_ID)
    ends = list(starts[1:]) + [tokens.size]
    return [tokens[s + 1:e].tolist() for s, e in zip(starts, ends)]


def split_stream(shards: list[Path]) -> np.ndarray:
    return np.concatenate([read_shard(p) for p in shards]) if shards else np.zeros(0, np.uint16)


# Documents whose text survives nmt_nfkc normalization unchanged (single spaces, no newlines, NFKC).
STABLE_DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Python 3.11 added exception groups in 2022; the number 123456 is split into digits.",
    "A for loop iterates over the items of any sequence, in the order that they appear.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 accented text and an em dash.",
    "Rare characters \u4e2d\u6587 and \U0001f600 fall back to bytes.",
    "Short.",
    "If the class defines __eq__ but not __hash__, its instances are unhashable.",
    "The with statement wraps the execution of a block with methods defined by a context manager.",
    "Numbers like 3.14159 and 2.71828 appear here, with 42 and 1024 too.",
    "Lists are mutable sequences, typically used to store collections of homogeneous items.",
]


# --------------------------------------------------------------------------------------------------
# shard format
# --------------------------------------------------------------------------------------------------


def test_shard_format_roundtrip_and_rejections(tmp_path):
    toks = np.array([1, 5, 65535, 0, 7], dtype=np.uint16)
    p = tmp_path / "fineweb_val_000000.bin"
    assert write_shard(p, toks) == 5
    raw = p.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * 5
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[0] == SHARD_MAGIC and header[1] == 1 and header[2] == 5 and not header[3:].any()
    assert np.array_equal(read_shard(p), toks)
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")], "temp file left behind"

    bad = {
        "empty.bin": b"",
        "truncated.bin": raw[:-1],
        "short_header.bin": raw[:100],
        "bad_magic.bin": (12345).to_bytes(4, "little") + raw[4:],
        "bad_version.bin": raw[:4] + (2).to_bytes(4, "little") + raw[8:],
        "too_long.bin": raw + b"\0\0",
    }
    for name, data in bad.items():
        q = tmp_path / name
        q.write_bytes(data)
        with pytest.raises(ShardError) as ei:
            read_shard(q)
        assert name in str(ei.value)
    with pytest.raises(ValueError):
        write_shard(tmp_path / "x.bin", np.array([70000]))


# --------------------------------------------------------------------------------------------------
# builder
# --------------------------------------------------------------------------------------------------


def test_smoke_dataset_refuses_a_folder_with_other_shards(tmp_path, smoke_build, capsys):
    """--out data would put the smoke shards beside downloaded FineWeb shards, and a build deletes every shard in
    its folder: refused before anything is touched. Its own folder is reused as before."""
    data = tmp_path / "datasets" / smoke.DATASET_NAME
    data.mkdir(parents=True)
    for name in ("fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"):
        (data / name).write_bytes((smoke_build["train_shards"][0]).read_bytes())
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    assert smoke.main(["--out", str(tmp_path)]) == 1
    assert "holds 3 shards this tool did not build" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert smoke.foreign_shards(smoke.smoke_paths(smoke_build["out_dir"])) == []


def test_build_roundtrip_multi_shard(tmp_path, smoke_build, sp):
    tok = smoke_build["tokenizer_path"]
    # A document with newlines / repeated spaces is normalized by nmt_nfkc: compare to encode->decode.
    docs = STABLE_DOCS + ["Line one.\nLine  two,\twith a tab.\n\nAnd a paragraph."]
    shard_tokens = 37
    res = bs.build_shards(tmp_path / "ds", documents=docs, tokenizer=tok, val_docs=3, seed=7,
                          shard_tokens=shard_tokens, log=None)
    val_idx, train_idx = bs.split_documents(len(docs), val_docs=3, seed=7)

    for split, idx in (("val", val_idx), ("train", train_idx)):
        shards = res[split]["shards"]
        assert shards == sorted((tmp_path / "ds").glob(f"fineweb_{split}_*.bin"))
        assert [p.name for p in shards] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(shards))]
        counts = [inspect_shard(p) for p in shards]
        for p, n in zip(shards, counts):  # header count == payload size
            assert p.stat().st_size == HEADER_BYTES + 2 * n
            assert read_shard(p).size == n
        # size limit: all shards full except possibly the last, which is non-empty
        assert all(n == shard_tokens for n in counts[:-1]) and 0 < counts[-1] <= shard_tokens
        stream = split_stream(shards)
        assert stream.size == res[split]["tokens"] == sum(counts)
        assert -(-stream.size // shard_tokens) == len(shards)
        decoded = [sp.decode(ids) for ids in split_docs(stream)]
        expected = [docs[i] for i in idx]
        assert len(decoded) == len(expected) == res[split]["docs"]
        # each document is exactly [BOS] + sp.encode(text); no EOS
        assert split_docs(stream) == [sp.encode(d) for d in expected]
        assert sp.eos_id() not in stream.tolist()
        for got, want in zip(decoded, expected):
            if want in STABLE_DOCS:
                assert got == want
            else:
                assert got == sp.decode(sp.encode(want))
        assert res[split]["bytes"] == sum(len(d.encode()) for d in expected)
    assert len(res["train"]["shards"]) >= 3, "the shard size limit should split train across several shards"
    assert len(res["val"]["shards"]) >= 2
    # refuses to silently mix with an old build
    with pytest.raises(FileExistsError):
        bs.build_shards(tmp_path / "ds", documents=docs, tokenizer=tok, val_docs=3, log=None)


def test_empty_documents_are_dropped(tmp_path, smoke_build, sp):
    """A text that is empty or only whitespace adds nothing, not even a BOS: no empty document in a split; a
    split left with no document stops the build."""
    docs = ["Hello there.", "", "Another one.", "   \n", "A second document."]
    res = bs.build_shards(tmp_path / "ds", documents=docs, tokenizer=smoke_build["tokenizer_path"], val_docs=2,
                          shuffle=False, log=None)
    assert res["val"]["docs"] == 1 and split_docs(split_stream(res["val"]["shards"])) == [sp.encode(docs[0])]
    train = split_stream(res["train"]["shards"])
    assert res["train"]["docs"] == 2 and split_docs(train) == [sp.encode(d) for d in docs[2::2]]
    with pytest.raises(ValueError, match="the val split holds no document with text"):
        bs.build_shards(tmp_path / "ds2", documents=docs[1:], tokenizer=smoke_build["tokenizer_path"], val_docs=1,
                        shuffle=False, log=None)
    assert list((tmp_path / "ds2").glob("*.bin")) == []


def test_a_file_named_twice_is_read_once(tmp_path):
    """A directory and a file inside it both given: the file is one input, so its documents cannot land in
    both splits."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    (src / "b.txt").write_text("one whole document")
    files = bs.expand_inputs([src, src / "a.jsonl", str(src / ".." / "src" / "b.txt")])
    assert files == [src / "a.jsonl", src / "b.txt"]
    assert len(bs.FileDocuments(files)) == 6
    os.link(src / "a.jsonl", tmp_path / "hard.jsonl")  # a hard link is the same file under another name
    os.symlink(src / "b.txt", tmp_path / "soft.txt")
    files = bs.expand_inputs([tmp_path / "hard.jsonl", src, tmp_path / "soft.txt"])
    assert files == [tmp_path / "hard.jsonl", src / "b.txt"]


def test_a_failed_build_leaves_no_shards_and_names_the_bad_text(tmp_path, smoke_build):
    """A lone surrogate in a JSON text (not encodable as UTF-8) stops the build with the file and offset, after
    earlier shards were written: those are removed, as they would pass for a whole dataset."""
    src = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document number {i} with some words"}) for i in range(300)]
    lines[250] = '{"text": "bad \\ud83d"}'
    src.write_text("\n".join(lines) + "\n")
    offset = sum(len(ln) + 1 for ln in lines[:250])
    with pytest.raises(ValueError, match=f"docs.jsonl: the text at byte offset {offset} is not valid Unicode"):
        bs.build_shards(tmp_path / "ds", [src], tokenizer=smoke_build["tokenizer_path"], val_docs=10,
                        shuffle=False, shard_tokens=200, log=None)
    assert list((tmp_path / "ds").glob("*.bin")) == []
    with pytest.raises(ValueError, match=r"vocab_size must be in \[260, 65536\]"):
        bs.build_shards(tmp_path / "ds2", [src], vocab_size=70000, log=None)


def test_a_failed_rebuild_keeps_the_old_dataset_and_its_tokenizer(tmp_path):
    """--overwrite (and --retrain-tokenizer) replace the old shards and tokenizer only once the new build is
    complete: bad text found while encoding leaves both as they were, and no partial folder behind."""
    texts = smoke.topic_documents()[:60]
    out, tok = tmp_path / "datasets" / "mine", tmp_path / "tokenizers" / "custom_512_bpe.model"
    bs.build_shards(out, documents=texts, vocab_size=512, val_docs=5, shard_tokens=5000, log=None)
    before = {p: p.read_bytes() for p in [tok, *sorted(out.iterdir())]}
    src = tmp_path / "new.jsonl"
    lines = [json.dumps({"text": t}) for t in smoke.topic_documents()[60:120]]
    lines[3] = '{"text": "bad \\ud83d"}'  # a validation document (no shuffle): met after the tokenizer is trained
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="not valid Unicode"):
        bs.build_shards(out, [src], vocab_size=512, val_docs=5, shuffle=False, tokenizer_train_docs=None,
                        overwrite=True, retrain_tokenizer=True, log=None)
    assert {p: p.read_bytes() for p in [tok, *sorted(out.iterdir())]} == before
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["mine"]
    assert sorted(p.name for p in tok.parent.iterdir()) == ["custom_512_bpe.model", "custom_512_bpe.vocab"]
    # another dataset would retrain the shared tokenizer under the first one's shards: only when asked by name
    with pytest.raises(FileExistsError, match="--retrain-tokenizer"):
        bs.build_shards(tmp_path / "datasets" / "other", documents=texts[::-1], vocab_size=512, val_docs=5,
                        overwrite=True, log=None)
    assert tok.read_bytes() == before[tok]


def test_a_swap_that_fails_half_way_puts_the_old_shards_back(tmp_path, smoke_build, monkeypatch):
    texts = smoke.topic_documents()[:60]
    out, tok = tmp_path / "ds", smoke_build["tokenizer_path"]
    bs.build_shards(out, documents=texts, tokenizer=tok, val_docs=5, shard_tokens=5000, log=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, moved = os.replace, []

    def failing_replace(src, dst):  # the swap's second move of a new shard into the dataset fails
        if Path(src).parent.name == ".partial" and Path(dst).parent == out:
            moved.append(src)
            if len(moved) == 2:
                raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(bs.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        bs.build_shards(out, documents=texts[::-1], tokenizer=tok, val_docs=5, shard_tokens=5000, overwrite=True,
                        log=None)
    assert len(moved) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_split_disjoint_and_seeded(tmp_path, smoke_build, sp):
    v1, t1 = bs.split_documents(1000, val_docs=100, seed=1)
    v1b, t1b = bs.split_documents(1000, val_docs=100, seed=1)
    v2, _ = bs.split_documents(1000, val_docs=100, seed=2)
    assert np.array_equal(v1, v1b) and np.array_equal(t1, t1b)
    assert set(v1.tolist()) != set(v2.tolist())
    assert not set(v1.tolist()) & set(t1.tolist())
    assert sorted(v1.tolist() + t1.tolist()) == list(range(1000))
    vf, tf = bs.split_documents(1000, val_fraction=0.05, seed=1)
    assert vf.size == 50 and tf.size == 950
    with pytest.raises(ValueError):
        bs.split_documents(10, val_docs=10)

    # on real shards: no document on both sides; same seed -> identical bytes; other seed -> other split
    tok = smoke_build["tokenizer_path"]
    docs = [f"Document number {i} talks about topic {i * 7 % 13} and nothing else." for i in range(40)]

    def build(name, seed):
        res = bs.build_shards(tmp_path / name, documents=docs, tokenizer=tok, val_docs=8, seed=seed, log=None)
        out = {}
        for split in ("val", "train"):
            out[split] = [sp.decode(ids) for ids in split_docs(split_stream(res[split]["shards"]))]
        out["bytes"] = b"".join(p.read_bytes() for s in ("val", "train") for p in res[s]["shards"])
        return out

    a, b, c = build("a", 5), build("b", 5), build("c", 6)
    assert len(a["val"]) == 8 and len(a["train"]) == 32
    assert not set(a["val"]) & set(a["train"])
    assert sorted(a["val"] + a["train"]) == sorted(docs)
    assert a["bytes"] == b["bytes"]
    assert set(a["val"]) != set(c["val"])


def test_build_from_files_cli_and_workers(tmp_path, smoke_build, sp):
    """jsonl + txt inputs through the command line, 1 vs 2 encoding processes give identical shards."""
    src = tmp_path / "src"
    src.mkdir()
    jl = [{"text": d, "id": i} for i, d in enumerate(STABLE_DOCS)]
    (src / "a.jsonl").write_text("\n".join(json.dumps(o) for o in jl[:6]) + "\n\n" +
                                 "\n".join(json.dumps(o) for o in jl[6:]) + "\n", encoding="utf-8")
    (src / "b.txt").write_text("A whole file is one document here.", encoding="utf-8")
    (src / "empty.txt").write_text("", encoding="utf-8")
    tok = str(smoke_build["tokenizer_path"])
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        rc = bs.main([str(src), "--out", str(out), "--tokenizer", tok, "--val-docs", "2",
                      "--shard-tokens", "50", "--workers", str(workers), "--seed", "3"])
        assert rc == 0
        outs[workers] = {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}
    assert outs[1] == outs[2] and len(outs[1]) >= 3
    all_docs = []
    for split in ("val", "train"):
        stream = split_stream(sorted((tmp_path / "w1").glob(f"fineweb_{split}_*.bin")))
        all_docs += [sp.decode(ids) for ids in split_docs(stream)]
    assert sorted(all_docs) == sorted(STABLE_DOCS + ["A whole file is one document here."])

    # --txt-docs-per-line: one document per non-blank line
    (src2 := tmp_path / "src2").mkdir()
    (src2 / "lines.txt").write_text("first doc\n\nsecond doc\nthird doc\n", encoding="utf-8")
    res = bs.build_shards(tmp_path / "lines", [src2], tokenizer=tok, val_docs=1, txt_docs_per_line=True, log=None)
    assert res["val"]["docs"] + res["train"]["docs"] == 3

    # errors are one line + non-zero
    assert bs.main([str(src / "nope.jsonl"), "--out", str(tmp_path / "x"), "--tokenizer", tok]) == 1


def _proto_fields(b: bytes) -> dict[int, list]:
    """Minimal protobuf wire-format reader (protobuf itself is not a dependency)."""
    import struct

    def varint(i):
        r = sh = 0
        while True:
            x = b[i]
            i += 1
            r |= (x & 0x7F) << sh
            sh += 7
            if x < 0x80:
                return r, i

    out: dict[int, list] = {}
    i = 0
    while i < len(b):
        key, i = varint(i)
        f, w = key >> 3, key & 7
        if w == 0:
            v, i = varint(i)
        elif w == 1:
            v, i = b[i:i + 8], i + 8
        elif w == 2:
            n, i = varint(i)
            v, i = b[i:i + n], i + n
        elif w == 5:
            v, i = struct.unpack("<f", b[i:i + 4])[0], i + 4
        else:
            raise ValueError(f"wire type {w}")
        out.setdefault(f, []).append(v)
    return out


def test_train_tokenizer_settings(tmp_path):
    import sentencepiece as spm

    assert bs.TOKENIZER_SETTINGS == dict(
        model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        hard_vocab_limit=False)
    texts = smoke.topic_documents()[:40]
    path = bs.train_tokenizer(texts, 512, tmp_path / "t_512_bpe.model")
    assert path.name == "t_512_bpe.model" and (tmp_path / "t_512_bpe.vocab").is_file()
    model = _proto_fields(path.read_bytes())  # ModelProto: 2 = trainer_spec, 3 = normalizer_spec
    ts, ns = _proto_fields(model[2][0]), _proto_fields(model[3][0])
    assert ts[3] == [2] and ts[4] == [512]  # model_type BPE, vocab_size
    assert abs(ts[10][0] - 0.999) < 1e-6  # character_coverage
    assert ts[25] == [1] and ts[35] == [1] and ts[33] == [0]  # split_digits, byte_fallback, hard_vocab_limit
    assert (ts[43], ts[41], ts[42], ts[40]) == ([0], [1], [2], [3])  # pad, bos, eos, unk ids
    assert ns[1] == [b"nmt_nfkc"] and ns[3] == [0]  # normalizer name, add_dummy_prefix
    s = spm.SentencePieceProcessor(model_file=str(path))
    assert s.piece_to_id("\u2581") != s.unk_id()
    assert s.encode("12345", out_type=str) == ["1", "2", "3", "4", "5"]
    assert not s.encode("hello world", out_type=str)[0].startswith("\u2581")
    assert any(p.startswith("<0x") for p in s.encode("\U0001f600", out_type=str))
    assert s.vocab_size() == 512


def test_train_tokenizer_refuses_a_vocabulary_the_text_cannot_fill(tmp_path):
    """hard_vocab_limit=False lets SentencePiece stop short of vocab_size on little text; the model would then
    carry a name and a size that disagree, so nothing is written and the error says how many pieces it got."""
    with pytest.raises(ValueError, match=r"tokenizer of \d+ pieces, not 8000 .*at most \d+") as ei:
        bs.train_tokenizer(smoke.topic_documents()[:3], 8000, tmp_path / "t_8000_bpe.model")
    got = int(re.search(r"of (\d+) pieces", str(ei.value)).group(1))
    assert 260 <= got < 8000 and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# smoke dataset
# --------------------------------------------------------------------------------------------------


def test_smoke_dataset(smoke_build, tmp_path):
    p = smoke_build
    assert p["built"] and p["seconds"] < 30
    assert p["data_path"].name == "fineweb10B_sp1024" and p["data_path"].parent.name == "datasets"
    assert p["tokenizer_path"] == p["out_dir"] / "tokenizers" / "smoke_1024_bpe.model"
    names = sorted(q.name for q in p["data_path"].iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    val, train = read_shard(p["val_shards"][0]), read_shard(p["train_shards"][0])
    assert val.size == p["val_tokens"] >= 40_000
    assert train.size == p["train_tokens"] > val.size
    assert val[0] == 1 and train[0] == 1 and val.max() < 1024 and train.max() < 1024

    import sentencepiece as spm

    s = spm.SentencePieceProcessor(model_file=str(p["tokenizer_path"]))
    assert s.vocab_size() == 1024
    assert s.piece_to_id("\u2581") != s.unk_id()
    # val documents are prose from the language reference, not seen in train
    val_docs = {s.decode(ids) for ids in split_docs(val)}
    train_docs = {s.decode(ids) for ids in split_docs(train)}
    assert val_docs and not val_docs & train_docs

    # deterministic: a second build elsewhere is byte-identical
    other = smoke.build_smoke_dataset(tmp_path / "smoke_b", log=None)
    for a, b in [(p["tokenizer_path"], other["tokenizer_path"])] + list(
            zip(p["val_shards"] + p["train_shards"], other["val_shards"] + other["train_shards"])):
        assert a.read_bytes() == b.read_bytes(), a.name

    # existing outputs are reused; --force rebuilds; a damaged output triggers a rebuild
    mtime = other["train_shards"][0].stat().st_mtime_ns
    again = smoke.build_smoke_dataset(tmp_path / "smoke_b", log=None)
    assert again["built"] is False and other["train_shards"][0].stat().st_mtime_ns == mtime
    other["val_shards"][0].write_bytes(b"")
    fixed = smoke.build_smoke_dataset(tmp_path / "smoke_b", log=None)
    assert fixed["built"] is True and inspect_shard(fixed["val_shards"][0]) == p["val_tokens"]


# --------------------------------------------------------------------------------------------------
# downloader against a local fake Hub
# --------------------------------------------------------------------------------------------------

REPO_ID = "test-org/parameter-golf"


class FakeHub:
    """Enough of the Hub's `resolve` endpoint for hf_hub_download on a dataset repo."""

    def __init__(self, files: dict[str, bytes], repo_id: str = REPO_ID):
        self.files = dict(files)
        self.repo_id = repo_id
        self.log: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _serve(self, body: bool):
                path = unquote(self.path.split("?", 1)[0])
                hub.log.append((self.command, path))
                prefix = f"/datasets/{hub.repo_id}/resolve/"
                if not path.startswith(prefix):
                    return self._error(404, "RepoNotFound", "Repository not found")
                revision, _, filename = path[len(prefix):].partition("/")
                if revision not in ("main", hub.commit):
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                data = hub.files.get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", "Entry not found")
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, code, error_code, message):
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", message)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @property
    def commit(self) -> str:
        """Like git: any change of the repo's content is a new commit."""
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()

    def gets(self, suffix=".bin") -> list[str]:
        return [p for m, p in self.log if m == "GET" and p.endswith(suffix)]

    def hits(self, suffix=".bin") -> list[str]:
        return [p for m, p in self.log if p.endswith(suffix)]


def closed_port_endpoint() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def shard_bytes(tokens) -> bytes:
    arr = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = (SHARD_MAGIC, 1, arr.size)
    return header.tobytes() + arr.tobytes()


def fake_repo(tokenizer_path: Path, files_train=3, files_val=1) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {}
    d = "datasets/datasets/fineweb10B_sp1024"
    for i in range(files_val):
        files[f"{d}/fineweb_val_{i:06d}.bin"] = shard_bytes(np.r_[1, rng.integers(4, 1024, 300 + i)])
    for i in range(files_train):
        files[f"{d}/fineweb_train_{i:06d}.bin"] = shard_bytes(np.r_[1, rng.integers(4, 1024, 500 + 7 * i)])
    files["datasets/tokenizers/fineweb_1024_bpe.model"] = tokenizer_path.read_bytes()
    files["datasets/tokenizers/fineweb_1024_bpe.vocab"] = tokenizer_path.with_suffix(".vocab").read_bytes()
    manifest = {
        "version": 1,
        "datasets": [
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
             "stats": {"files_train": files_train, "files_val": files_val}},
            {"name": "fineweb10B_sp4096", "tokenizer_name": "sp_bpe_4096",
             "stats": {"files_train": 1, "files_val": 1}},
        ],
        "tokenizers": [
            {"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
             "model_path": "tokenizers/fineweb_1024_bpe.model", "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        ],
    }
    files["datasets/manifest.json"] = json.dumps(manifest, indent=1).encode()
    files["datasets/docs_selected.jsonl"] = b'{"text": "hello"}\n'
    files["datasets/docs_selected.source_manifest.json"] = b"{}"
    return files


def run_downloader(endpoint: str, hf_home: Path, out: Path, *args: str, repo_id: str | None = REPO_ID,
                   timeout: float = 60, **extra_env: str) -> subprocess.CompletedProcess:
    """The downloader against `endpoint`; repo_id=None leaves MATCHED_FINEWEB_REPO_ID unset."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE", "MATCHED_FINEWEB")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy")}
    env.update({
        "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **extra_env,
    })
    if repo_id is not None:
        env["MATCHED_FINEWEB_REPO_ID"] = repo_id
    return subprocess.run([sys.executable, str(DOWNLOADER), "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_downloader_fetch_layout_and_skip(tmp_path, smoke_build):
    files = fake_repo(smoke_build["tokenizer_path"])
    out, hf_home = tmp_path / "data", tmp_path / "hf"
    ds = out / "datasets" / "fineweb10B_sp1024"
    with FakeHub(files) as hub:
        r = run_downloader(hub.endpoint, hf_home, out, "--train-shards", "2")
        assert r.returncode == 0, r.stderr
        expected = {
            ds / "fineweb_val_000000.bin", ds / "fineweb_train_000000.bin", ds / "fineweb_train_000001.bin",
            out / "tokenizers" / "fineweb_1024_bpe.model", out / "tokenizers" / "fineweb_1024_bpe.vocab",
            out / "manifest.json",
        }
        got = {p for p in out.rglob("*") if p.is_file()}
        assert got == expected, "unexpected files (temp leftovers or extra shards)"
        for p in expected:
            assert p.read_bytes() == files["datasets/" + str(p.relative_to(out))], p
        assert "[1/5] fineweb_val_000000.bin" in r.stdout and "(downloaded)" in r.stdout
        assert sorted(hub.gets()) == sorted(f"/datasets/{REPO_ID}/resolve/main/datasets/{p.relative_to(out)}"
                                            for p in expected if p.suffix == ".bin")

        # second run: nothing re-downloaded, shards not even asked for
        n_log, n_bin = len(hub.log), len(hub.hits(".bin"))
        r = run_downloader(hub.endpoint, hf_home, out, "--train-shards", "2")
        assert r.returncode == 0, r.stderr
        assert len(hub.hits(".bin")) == n_bin, "a present shard was requested again"
        assert not [p for m, p in hub.log[n_log:] if m == "GET" and not p.endswith("manifest.json")]
        assert r.stdout.count("(present)") == 5

        # bare positional integer overrides --train-shards: only the missing shard is fetched
        n_gets = len(hub.gets())
        r = run_downloader(hub.endpoint, hf_home, out, "--train-shards", "1", "3")
        assert r.returncode == 0, r.stderr
        assert hub.gets()[n_gets:] == [f"/datasets/{REPO_ID}/resolve/main/datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin"]

        # a local shard damaged in place (it is hard-linked to the HF cache blob) is detected and re-fetched
        with open(ds / "fineweb_train_000000.bin", "r+b") as f:
            f.truncate(0)
        (ds / "fineweb_train_000001.bin").write_bytes(b"\x00" * 1024)  # bad magic
        r = run_downloader(hub.endpoint, hf_home, out, "3")
        assert r.returncode == 0, r.stderr
        for i in range(3):
            name = f"fineweb_train_{i:06d}.bin"
            assert (ds / name).read_bytes() == files[f"datasets/datasets/fineweb10B_sp1024/{name}"]
        assert "local file is bad" in r.stdout

        # more shards than the manifest lists -> clear error
        r = run_downloader(hub.endpoint, hf_home, out, "--train-shards", "4")
        assert r.returncode != 0 and "has 3 train shards; 4 were requested" in r.stderr
        assert "Traceback" not in r.stderr

        # --skip-manifest: no network needed when everything is present
        down = closed_port_endpoint()
        r = run_downloader(down, hf_home, out, "--skip-manifest", "3")
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("(present)") == 6
        # endpoint down but everything present: falls back to the local manifest, still succeeds
        r = run_downloader(down, hf_home, out, "3")
        assert r.returncode == 0, r.stderr
        assert f"cannot reach {down}" in r.stdout and r.stdout.count("(present)") == 6

        # the manifest is refreshed from the repo on every run (not with --skip-manifest)
        m = json.loads(files["datasets/manifest.json"])
        m["note"] = "changed upstream"
        hub.files["datasets/manifest.json"] = json.dumps(m).encode()
        # --with-docs
        r = run_downloader(hub.endpoint, hf_home, out, "0", "--with-docs")
        assert json.loads((out / "manifest.json").read_text())["note"] == "changed upstream"
        assert r.returncode == 0, r.stderr
        assert (out / "docs_selected.jsonl").read_bytes() == files["datasets/docs_selected.jsonl"]
        assert (out / "docs_selected.source_manifest.json").is_file()


def test_downloader_rejects_bad_served_shard(tmp_path, smoke_build):
    files = fake_repo(smoke_build["tokenizer_path"])
    bad_key = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    good = files[bad_key]
    files[bad_key] = (999).to_bytes(4, "little") + good[4:]  # bad magic, right size
    out, hf_home = tmp_path / "data", tmp_path / "hf"
    ds = out / "datasets" / "fineweb10B_sp1024"
    with FakeHub(files) as hub:
        r = run_downloader(hub.endpoint, hf_home, out, "--train-shards", "3")
        assert r.returncode != 0
        err = r.stderr.strip()
        assert "fineweb_train_000001.bin" in err and "bad magic" in err and "Traceback" not in err
        assert len(err.splitlines()) == 1
        assert not (ds / "fineweb_train_000001.bin").exists()
        assert not (ds / "fineweb_train_000002.bin").exists()  # stopped at the bad file
        assert not [p for p in ds.iterdir() if p.name.startswith(".")], "temp file left behind"
        assert len([p for p in hub.gets() if p.endswith("fineweb_train_000001.bin")]) == 2  # forced re-download

        # truncated body (wrong header count) is rejected too; once fixed upstream, a rerun succeeds
        files[bad_key] = good[:-2]
        hub.files[bad_key] = good[:-2]
        r = run_downloader(hub.endpoint, hf_home, out, "--train-shards", "3")
        assert r.returncode != 0 and "fineweb_train_000001.bin" in r.stderr
        hub.files[bad_key] = good
        r = run_downloader(hub.endpoint, hf_home, out, "--train-shards", "3")
        assert r.returncode == 0, r.stderr
        assert (ds / "fineweb_train_000001.bin").read_bytes() == good


def test_downloader_unreachable_and_missing_repo(tmp_path, smoke_build):
    endpoint = closed_port_endpoint()
    t0 = time.time()
    r = run_downloader(endpoint, tmp_path / "hf", tmp_path / "data", "1")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot reach" in err and endpoint in err and REPO_ID in err
    assert time.time() - t0 < 20
    assert not (tmp_path / "data" / "datasets").exists()

    with FakeHub(fake_repo(smoke_build["tokenizer_path"])) as hub:
        r = run_downloader(hub.endpoint, tmp_path / "hf", tmp_path / "data", "1", repo_id="nobody/nothing")
        assert r.returncode != 0
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and "nobody/nothing" in err and "not found" in err

        r = run_downloader(hub.endpoint, tmp_path / "hf", tmp_path / "data", "--variant", "sp8192")
        assert r.returncode != 0 and "fineweb10B_sp8192" in r.stderr and "fineweb10B_sp1024" in r.stderr

        r = run_downloader(hub.endpoint, tmp_path / "hf", tmp_path / "fresh", "--skip-manifest")
        assert r.returncode != 0 and "manifest.json does not exist" in r.stderr


OFFLINE_HINTS = ("python3 data/make_smoke_dataset.py", "python3 data/build_shards.py")


def assert_offline_message(r: subprocess.CompletedProcess):
    """One complete line (no traceback, not cut mid-word) that points to the two offline data tools."""
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert all(h in err for h in OFFLINE_HINTS) and err.endswith("(see data/README.md).")


def test_downloader_offline_message(tmp_path):
    r = run_downloader(closed_port_endpoint(), tmp_path / "hf", tmp_path / "data", "1", HF_HUB_OFFLINE="1")
    assert_offline_message(r)
    assert "HF_HUB_OFFLINE is set" in r.stderr and "datasets/manifest.json" in r.stderr
    r = run_downloader(closed_port_endpoint(), tmp_path / "hf", tmp_path / "data", "--variant", "sp8192",
                       repo_id=None)
    assert_offline_message(r)
    assert "cannot reach" in r.stderr and "kevclark/parameter-golf" in r.stderr
    assert not (tmp_path / "data" / "datasets").exists()


def test_downloader_error_detail_cut_at_a_word():
    sys.path.insert(0, str(DATA))
    import cached_challenge_fineweb as dl

    long = "word " * 200 + "end"
    short = dl._first_line(RuntimeError(long + "\nsecond line"))
    assert len(short) <= 240 and short.endswith(" ...") and short[:-4].split(" ")[-1] == "word"
    assert dl._first_line(RuntimeError("")) == "RuntimeError"


def fake_sp8192_repo(tokenizer_path: Path) -> dict[str, bytes]:
    """The layout of the sp8192 export: same prefix, its own manifest, fineweb_8192_bpe.model."""
    files = {"datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin": shard_bytes(np.r_[1, np.arange(4, 400)]),
             "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin": shard_bytes(np.r_[1, np.arange(4, 900)]),
             "datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin": shard_bytes(np.r_[1, np.arange(4, 700)]),
             "datasets/tokenizers/fineweb_8192_bpe.model": tokenizer_path.read_bytes()}
    manifest = {"datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192",
                              "stats": {"files_train": 2, "files_val": 1}}],
                "tokenizers": [{"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model"}]}
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    return files


def test_downloader_sp8192_from_its_repo(tmp_path, smoke_build):
    sys.path.insert(0, str(DATA))
    import cached_challenge_fineweb as dl

    assert dl.VARIANT_REPO_IDS["sp8192"] == "kevclark/parameter-golf"
    files = fake_sp8192_repo(smoke_build["tokenizer_path"])
    out = tmp_path / "data"
    with FakeHub(files, repo_id="kevclark/parameter-golf") as hub:
        # no MATCHED_FINEWEB_REPO_ID: --variant sp8192 picks the repo that publishes it
        r = run_downloader(hub.endpoint, tmp_path / "hf", out, "--variant", "sp8192", "--train-shards", "1",
                           repo_id=None)
        assert r.returncode == 0, r.stderr
        assert "from dataset repo kevclark/parameter-golf" in r.stdout
        for rel in ("datasets/fineweb10B_sp8192/fineweb_val_000000.bin",
                    "datasets/fineweb10B_sp8192/fineweb_train_000000.bin", "tokenizers/fineweb_8192_bpe.model"):
            assert (out / rel).read_bytes() == files["datasets/" + rel], rel
        assert not (out / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000001.bin").exists()
        assert f"TOKENIZER_PATH={out / 'tokenizers' / 'fineweb_8192_bpe.model'} VOCAB_SIZE=8192" in r.stdout
        # sp1024 still comes from the challenge's own repo, which this fake hub is not
        r = run_downloader(hub.endpoint, tmp_path / "hf", tmp_path / "other", "0", repo_id=None)
        assert r.returncode == 1 and "willdepueoai/parameter-golf" in r.stderr and "not found" in r.stderr


def test_build_shards_help_and_single_txt_advice(tmp_path):
    script = str(DATA / "build_shards.py")
    helptext = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
    flat = " ".join(helptext.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert flat.count("(default: 50000)") == 1 and "(default 50000)" not in flat
    assert "--txt-docs-per-line --val-fraction 0.01" in flat
    book = tmp_path / "book.txt"
    book.write_text("First line of the book.\nSecond line.\n\nThird line, after a blank one.\n")
    tok = str(REPO / "tests" / "fixtures" / "fineweb_1024_bpe.model")
    r = subprocess.run([sys.executable, script, str(book), "--out", str(tmp_path / "a"), "--tokenizer", tok],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "each .txt file is read as ONE document" in r.stderr
    assert "--txt-docs-per-line" in r.stderr
    # the advice works as given
    r = subprocess.run([sys.executable, script, str(book), "--out", str(tmp_path / "b"), "--tokenizer", tok,
                        "--txt-docs-per-line", "--val-fraction", "0.01", "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "val: docs=1 " in r.stdout and "train: docs=2 " in r.stdout


def test_jsonl_shards_train_with_train_gpt_unchanged(tmp_path):
    """JSONL -> build_shards.py (CLI) -> train_gpt.py trains and evaluates on it as is."""
    import pydoc_data.topics as topics

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in list(topics.topics.values())[:120]))
    out = tmp_path / "datasets" / "fineweb10B_sp1024"
    tok = repo / "tests" / "fixtures" / "fineweb_1024_bpe.model"
    subprocess.run([sys.executable, str(repo / "data" / "build_shards.py"), str(src), "--out", str(out),
                    "--tokenizer", str(tok), "--val-docs", "20", "--workers", "1"], check=True, capture_output=True)
    env = dict(os.environ, RECIPE="r549", DATA_PATH=str(out), TOKENIZER_PATH=str(tok), RUN_ID="jsonl", NUM_LAYERS="2",
               MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64",
               TRAIN_BATCH_TOKENS="1024", ITERATIONS="3", WARMUP_STEPS="0", VAL_LOSS_EVERY="0",
               MAX_WALLCLOCK_SECONDS="0", VAL_TOKENS="2048", EVAL_STRIDE="64", TTT_ENABLED="0", VE_LAYERS="1",
               XSA_LAST_N="1", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="16", COMPILE="0", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(repo / "train_gpt.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "train_loader:dataset:fineweb10B_sp1024 train_shards:1" in run.stdout
    assert "final_int6_roundtrip_exact val_loss:" in run.stdout
