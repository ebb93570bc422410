#!/usr/bin/env python3
"""Raw text -> challenge-format token shards (format: data/README.md).

Inputs (files, or directories searched recursively for *.txt and *.jsonl, in sorted order):
  * `.jsonl`: one document per non-blank line, a JSON object whose `--text-field` (default `text`)
    holds the document;
  * `.txt`:   the whole file is one document, or one document per non-blank line with
    `--txt-docs-per-line`.

Pipeline:
  1. Index all documents (input order; a file named twice is read once). Blank lines and empty files are
     not documents; a document whose text is empty or only whitespace is dropped when encoded (it still
     takes its place in the split, so a split can hold fewer documents than asked for).
  2. Split into whole documents: shuffle the document order with `--seed` (numpy's frozen legacy
     RandomState, so the split is reproducible across numpy versions) unless `--no-shuffle`, then the
     first K documents are validation (`--val-docs K`, default 50,000 like the challenge, or
     `--val-fraction F`), the rest train, both kept in that (shuffled) order.
  3. Tokenizer: `--tokenizer MODEL` uses an existing SentencePiece model; otherwise `--vocab-size V`
     trains a BPE model with the challenge settings on (a prefix of) the *train* documents and writes
     `<tokenizer-dir>/<tokenizer-name>_<V>_bpe.model` (+ `.vocab`).
  4. Each document becomes `[BOS=1] + sp.encode(text)` (no EOS), documents back to back; encoding
     runs on `--workers` processes. Tokens are cut into shards of `--shard-tokens` tokens
     (`fineweb_val_000000.bin`, ..., `fineweb_train_000000.bin`, ...); a document may straddle two
     shards; each shard is written atomically (temporary name, then rename).
  5. A summary line per split: documents, tokens (BOS included), UTF-8 bytes of the raw text and
     bytes per token.

Example:
  python3 data/build_shards.py corpus.jsonl --out data/datasets/mycorpus_sp1024 \
      --vocab-size 1024 --tokenizer-name mycorpus --val-docs 50000 --workers 8

Importable: `build_shards(...)`, `train_tokenizer(...)`, `split_documents(...)`, `read_shard(path)`.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from shard_format import (  # noqa: E402  (re-exported for importers of this module)
    atomic_write_bytes,
    HEADER_BYTES,
    SHARD_MAGIC,
    SHARD_VERSION,
    ShardError,
    inspect_shard,
    read_shard,
    write_shard,
)

__all__ = [
    "BOS_ID",
    "DEFAULT_SHARD_TOKENS",
    "TOKENIZER_SETTINGS",
    "HEADER_BYTES",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "ShardError",
    "inspect_shard",
    "read_shard",
    "write_shard",
    "FileDocuments",
    "split_documents",
    "train_tokenizer",
    "check_tokenizer",
    "build_shards",
]

BOS_ID = 1
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_DOCS = 50_000
DEFAULT_TOKENIZER_TRAIN_DOCS = 200_000
ENCODE_CHUNK_DOCS = 256

# SentencePiece trainer settings of the challenge tokenizer.
TOKENIZER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)
SPACE_PIECE = "\u2581"  # "▁"


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------


class FileDocuments:
    """Random-access view of the documents in a list of .txt / .jsonl files.

    Only an index (file, byte offset, byte length) is kept in memory; texts are read on demand.
    """

    def __init__(self, inputs: Sequence[str | os.PathLike], *, txt_docs_per_line: bool = False,
                 text_field: str = "text"):
        self.files = expand_inputs(inputs)
        self.txt_docs_per_line = txt_docs_per_line
        self.text_field = text_field
        file_ids: list[np.ndarray] = []
        offsets: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        self._is_json = []
        for fid, path in enumerate(self.files):
            is_json = path.suffix == ".jsonl"
            self._is_json.append(is_json)
            if is_json or txt_docs_per_line:
                offs, lens = _index_lines(path)
            else:
                size = path.stat().st_size
                offs = np.array([0] if size else [], dtype=np.int64)
                lens = np.array([size] if size else [], dtype=np.int64)
            file_ids.append(np.full(offs.size, fid, dtype=np.int32))
            offsets.append(offs)
            lengths.append(lens)
        self._fid = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
        self._off = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self._len = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self._handles: dict[int, io.BufferedReader] = {}

    def __len__(self) -> int:
        return int(self._fid.size)

    def _handle(self, fid: int):
        h = self._handles.get(fid)
        if h is None:
            if len(self._handles) >= 64:
                for old in self._handles.values():
                    old.close()
                self._handles.clear()
            h = self._handles[fid] = open(self.files[fid], "rb")
        return h

    def __getitem__(self, i: int) -> str:
        fid, off, length = int(self._fid[i]), int(self._off[i]), int(self._len[i])
        path = self.files[fid]
        h = self._handle(fid)
        h.seek(off)
        raw = h.read(length)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: invalid UTF-8 in the document at byte offset {off}: {e.reason}") from None
        if not self._is_json[fid]:
            return line
        try:
            obj = json.loads(line)
            text = obj[self.text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: line at byte offset {off} is not a JSON object with a string "
                f"{self.text_field!r} field ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(text, str):
            raise ValueError(f"{path}: field {self.text_field!r} at byte offset {off} is not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{path}: the text at byte offset {off} is not valid Unicode ({e.reason})") from None
        return text

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".jsonl"))
            if not found:
                raise FileNotFoundError(f"{p}: directory has no .txt or .jsonl files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in (".txt", ".jsonl"):
                raise ValueError(f"{p}: unsupported input type (expected .txt or .jsonl)")
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    def identity(f: Path) -> tuple[int, int]:  # the file itself, under any name (symlinks and hard links too)
        st = f.stat()
        return st.st_dev, st.st_ino

    unique = {identity(f): f for f in reversed(files)}  # the first of each file's names, in input order
    return [f for f in files if unique[identity(f)] is f]


def _index_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and lengths (without the line terminator) of the non-blank lines of a file."""
    offs: list[int] = []
    lens: list[int] = []
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            n = len(line)
            body = line.rstrip(b"\r\n")
            if body.strip():
                offs.append(pos)
                lens.append(len(body))
            pos += n
    return np.array(offs, dtype=np.int64), np.array(lens, dtype=np.int64)


def _whole_file_hint(docs) -> str:
    """Advice when .txt inputs were read as one document per file (the usual cause of too few documents)."""
    if not isinstance(docs, FileDocuments) or docs.txt_docs_per_line:
        return ""
    if not any(f.suffix == ".txt" for f in docs.files):
        return ""
    return ("; each .txt file is read as ONE document: pass --txt-docs-per-line to make every non-blank line "
            "a document (e.g. --txt-docs-per-line --val-fraction 0.01 for a single .txt file)")


def split_documents(n_docs: int, *, val_docs: int | None = None, val_fraction: float | None = None,
                    seed: int = 1337, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return (val_indices, train_indices): whole documents, validation taken first.

    The order is a seeded permutation (numpy legacy RandomState: a frozen stream, identical across
    numpy versions) unless shuffle=False; the first K documents of that order are validation.
    """
    if val_docs is not None and val_fraction is not None:
        raise ValueError("give either val_docs or val_fraction, not both")
    if val_fraction is not None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        k = int(round(n_docs * val_fraction))
        if val_fraction > 0:
            k = max(k, 1)
    else:
        k = DEFAULT_VAL_DOCS if val_docs is None else int(val_docs)
    if k < 0:
        raise ValueError(f"val_docs must be >= 0, got {k}")
    if k >= n_docs:
        raise ValueError(
            f"the corpus has {n_docs} document(s), not enough for {k} validation document(s) plus at least one "
            "training document (lower --val-docs, or use --val-fraction)"
        )
    if shuffle:
        order = np.random.RandomState(seed).permutation(n_docs)
    else:
        order = np.arange(n_docs)
    return order[:k].astype(np.int64), order[k:].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def tokenizer_filename(name: str, vocab_size: int) -> str:
    return f"{name}_{vocab_size}_bpe.model"


def check_tokenizer(model_path_or_proto) -> "object":
    """Load a SentencePiece model and check what byte accounting relies on; return the processor."""
    import sentencepiece as spm

    if isinstance(model_path_or_proto, (bytes, bytearray)):
        sp = spm.SentencePieceProcessor(model_proto=bytes(model_path_or_proto))
        where = "trained tokenizer"
    else:
        where = str(model_path_or_proto)
        if not Path(where).is_file():
            raise FileNotFoundError(f"{where}: tokenizer model not found")
        sp = spm.SentencePieceProcessor(model_file=where)
    if sp.vocab_size() > 65536:
        raise ValueError(f"{where}: vocab size {sp.vocab_size()} does not fit uint16 shards")
    if sp.bos_id() != BOS_ID:
        raise ValueError(f"{where}: bos_id is {sp.bos_id()}, shards need BOS={BOS_ID}")
    # Without a standalone "▁" piece a space becomes 3 byte-fallback tokens and
    # bits-per-byte is underestimated.
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise ValueError(f"{where}: the model has no standalone '{SPACE_PIECE}' piece (byte accounting needs it)")
    return sp


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str | os.PathLike, *,
                    num_threads: int = 1, max_sentence_length: int = 1 << 20) -> Path:
    """Train a SentencePiece BPE model with the challenge settings; write `model_path` (+ `.vocab`).

    Each text is one training "sentence" (texts longer than `max_sentence_length` bytes are cut).
    The model is written atomically; the function fails if the model lacks a standalone "▁" piece or has
    fewer than `vocab_size` pieces.
    """
    import sentencepiece as spm

    model_path = Path(model_path)

    def sentences() -> Iterator[str]:
        for t in texts:
            if len(t) * 4 > max_sentence_length:  # cheap bound before encoding
                b = t.encode("utf-8")
                if len(b) > max_sentence_length:
                    t = b[:max_sentence_length].decode("utf-8", errors="ignore")
            if t.strip():
                yield t

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=proto,
        vocab_size=int(vocab_size),
        num_threads=max(1, int(num_threads)),
        max_sentence_length=int(max_sentence_length),
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
        **TOKENIZER_SETTINGS,
    )
    data = proto.getvalue()
    sp = check_tokenizer(data)
    if sp.vocab_size() != vocab_size:  # hard_vocab_limit=False: too little text stops short of vocab_size
        raise ValueError(f"the texts gave a tokenizer of {sp.vocab_size()} pieces, not {vocab_size} (too little text "
                         f"for that vocabulary): give more text or a vocab size of at most {sp.vocab_size()}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(model_path, data)
    vocab_lines = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    atomic_write_bytes(model_path.with_suffix(".vocab"), vocab_lines.encode("utf-8"))
    return model_path


# --------------------------------------------------------------------------------------------------
# Encoding (multiprocessing)
# --------------------------------------------------------------------------------------------------

_WORKER_SP = None


def _init_worker(model_proto: bytes) -> None:
    global _WORKER_SP
    import sentencepiece as spm

    _WORKER_SP = spm.SentencePieceProcessor(model_proto=model_proto)


def _encode_texts(texts: list[str]) -> tuple[np.ndarray, int, int]:
    """[BOS] + ids for each text that is not empty or only whitespace, concatenated; plus the UTF-8 byte count
    of those texts and their number."""
    texts = [t for t in texts if t.strip()]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)  # a lone surrogate stops here, as a ValueError
    ids = _WORKER_SP.encode(texts)
    total = sum(len(x) for x in ids) + len(ids)
    out = np.empty(total, dtype=np.uint16)
    pos = 0
    for x in ids:
        out[pos] = BOS_ID
        out[pos + 1: pos + 1 + len(x)] = x
        pos += 1 + len(x)
    return out, nbytes, len(texts)


def _chunks(docs, indices: np.ndarray, size: int) -> Iterator[list[str]]:
    for start in range(0, indices.size, size):
        yield [docs[int(i)] for i in indices[start:start + size]]


def _encode_stream(docs, indices: np.ndarray, pool, model_proto: bytes,
                   max_pending: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """Yield (tokens, bytes, n_docs) per chunk, in document order, with bounded read-ahead."""
    if pool is None:
        _init_worker(model_proto)
        for texts in _chunks(docs, indices, ENCODE_CHUNK_DOCS):
            yield _encode_texts(texts)
        return
    pending: deque = deque()  # bounded read-ahead keeps memory flat on huge corpora
    for texts in _chunks(docs, indices, ENCODE_CHUNK_DOCS):
        pending.append(pool.apply_async(_encode_texts, (texts,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.cap = out_dir, split, int(shard_tokens)
        self.buf = np.empty(min(self.cap, 1 << 20), dtype=np.uint16)
        self.fill = 0
        self.paths: list[Path] = []
        self.tokens = 0

    def add(self, toks: np.ndarray) -> None:
        pos = 0
        while pos < toks.size:
            if self.fill == self.buf.size and self.buf.size < self.cap:  # grow lazily up to one shard
                new = np.empty(min(self.cap, 2 * self.buf.size), dtype=np.uint16)
                new[: self.fill] = self.buf[: self.fill]
                self.buf = new
            take = min(toks.size - pos, self.buf.size - self.fill)
            self.buf[self.fill: self.fill + take] = toks[pos: pos + take]
            self.fill += take
            pos += take
            if self.fill == self.cap:
                self._flush()

    def _flush(self) -> None:
        path = self.out_dir / f"fineweb_{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, self.buf[: self.fill])
        self.paths.append(path)
        self.tokens += self.fill
        self.fill = 0

    def close(self) -> list[Path]:
        if self.fill:
            self._flush()
        return self.paths


def _existing_shards(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("fineweb_train_*.bin")) + sorted(out_dir.glob("fineweb_val_*.bin"))


def _swap_in(out_dir: Path, build_dir: Path) -> None:
    """Replace the shards of `out_dir` with those of `build_dir` (a folder inside it): the old ones wait in
    `out_dir/.replaced` until every new one is in place, and go back if that fails."""
    old_dir = out_dir / ".replaced"
    shutil.rmtree(old_dir, ignore_errors=True)
    old_dir.mkdir()
    for p in _existing_shards(out_dir):
        os.replace(p, old_dir / p.name)
    try:
        for p in _existing_shards(build_dir):
            os.replace(p, out_dir / p.name)
    except BaseException:
        for p in _existing_shards(out_dir):
            p.unlink()
        for p in _existing_shards(old_dir):
            os.replace(p, out_dir / p.name)
        old_dir.rmdir()
        raise
    shutil.rmtree(old_dir)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def build_shards(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike] | None = None, *,
                 documents: Sequence[str] | None = None,
                 tokenizer: str | os.PathLike | None = None,
                 vocab_size: int | None = None,
                 tokenizer_name: str = "custom",
                 tokenizer_dir: str | os.PathLike | None = None,
                 tokenizer_train_docs: int | None = DEFAULT_TOKENIZER_TRAIN_DOCS,
                 val_docs: int | None = None,
                 val_fraction: float | None = None,
                 seed: int = 1337,
                 shuffle: bool = True,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 workers: int = 1,
                 txt_docs_per_line: bool = False,
                 text_field: str = "text",
                 overwrite: bool = False,
                 retrain_tokenizer: bool = False,
                 log: Callable[[str], None] | None = print) -> dict:
    """Build train/val shards from files (`inputs`) or in-memory texts (`documents`).

    Exactly one of `tokenizer` (existing .model) or `vocab_size` (train one) must be given. The shards are
    written to a folder `.partial` inside `out_dir` and moved in (replacing the old ones, with `overwrite`) only
    once both splits are complete, and a trained tokenizer replaces an existing file of its name only then
    (`retrain_tokenizer`: other datasets may be encoded with it): a failed build leaves the old dataset as it was.
    Returns a dict: {"tokenizer": Path, "val": {...}, "train": {...}} where each split has
    "docs", "tokens" (BOS included), "bytes" (UTF-8 of the raw text), "shards" (list of Paths).
    """
    log = log or (lambda s: None)
    t0 = time.time()
    out_dir = Path(out_dir)
    if (inputs is None) == (documents is None):
        raise ValueError("give exactly one of inputs (files) or documents (texts)")
    if (tokenizer is None) == (vocab_size is None):
        raise ValueError("give exactly one of tokenizer (an existing model) or vocab_size (train a new one)")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if vocab_size is not None and not 260 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [260, 65536] (256 byte pieces and 4 special ones; token ids are "
                         f"stored as uint16), got {vocab_size}")
    stale = _existing_shards(out_dir) if out_dir.is_dir() else []
    if stale and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(stale)} shard(s); pass overwrite (--overwrite) to replace them")

    if documents is not None:
        docs = documents
    else:
        docs = FileDocuments(inputs, txt_docs_per_line=txt_docs_per_line, text_field=text_field)
        log(f"indexed {len(docs)} documents from {len(docs.files)} file(s)")
    build_dir, trained = out_dir / ".partial", None  # inside out_dir: on its filesystem, outside the shard glob
    try:
        try:
            val_idx, train_idx = split_documents(len(docs), val_docs=val_docs, val_fraction=val_fraction,
                                                 seed=seed, shuffle=shuffle)
        except ValueError as e:
            raise ValueError(f"{e}{_whole_file_hint(docs)}") from None

        if tokenizer is None:
            tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else out_dir.parent.parent / "tokenizers"
            model_path = tok_dir / tokenizer_filename(tokenizer_name, int(vocab_size))
            if model_path.exists() and not retrain_tokenizer:
                raise FileExistsError(f"{model_path} exists, and datasets encoded with it would not match a "
                                      f"retrained one: encode with it (--tokenizer {model_path}), choose another "
                                      f"--tokenizer-name, or pass retrain_tokenizer (--retrain-tokenizer)")
            n_tok_docs = train_idx.size if tokenizer_train_docs is None else min(train_idx.size, int(tokenizer_train_docs))
            log(f"training tokenizer vocab={vocab_size} on {n_tok_docs} train documents -> {model_path}")
            trained = model_path.with_name("partial_" + model_path.name)
            train_tokenizer((docs[int(i)] for i in train_idx[:n_tok_docs]), int(vocab_size), trained,
                            num_threads=max(1, workers))
        else:
            model_path = Path(tokenizer)
        sp = check_tokenizer(trained or model_path)
        model_proto = sp.serialized_model_proto()

        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True)
        result: dict = {"tokenizer": model_path}
        pool = None
        if workers > 1:
            pool = multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(model_proto,))
        try:
            for split, idx in (("val", val_idx), ("train", train_idx)):
                writer = _ShardWriter(build_dir, split, shard_tokens)
                nbytes = ndocs = 0
                for toks, b, n in _encode_stream(docs, idx, pool, model_proto, 4 * workers):
                    writer.add(toks)
                    nbytes += b
                    ndocs += n
                paths = writer.close()
                if not ndocs:
                    raise ValueError(f"the {split} split holds no document with text (every one of its "
                                     f"{idx.size} is empty or only whitespace)")
                result[split] = {"docs": ndocs, "tokens": writer.tokens, "bytes": nbytes,
                                 "shards": [out_dir / p.name for p in paths]}
                log(f"wrote {len(paths)} {split} shard(s), {writer.tokens} tokens")
        except BaseException:
            if pool is not None:
                pool.terminate()  # close() + join() would wait for the tasks of interrupted workers
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        _swap_in(out_dir, build_dir)
        if trained is not None:
            for suffix in (".model", ".vocab"):
                os.replace(trained.with_suffix(suffix), model_path.with_suffix(suffix))
    finally:  # a failed build's shards would pass for a whole dataset: none of them stays
        shutil.rmtree(build_dir, ignore_errors=True)
        if trained is not None:
            for suffix in (".model", ".vocab"):
                trained.with_suffix(suffix).unlink(missing_ok=True)
        if isinstance(docs, FileDocuments):
            docs.close()

    parts = []
    for split in ("val", "train"):
        s = result[split]
        bpt = s["bytes"] / s["tokens"] if s["tokens"] else float("nan")
        parts.append(f"{split}: docs={s['docs']} tokens={s['tokens']} bytes={s['bytes']} bytes/token={bpt:.4f}")
    log(f"summary: {' | '.join(parts)} | tokenizer={model_path} | {time.time() - t0:.1f}s")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Build challenge-format token shards (fineweb_{val,train}_NNNNNN.bin) from raw text.",
        epilog="A .txt file is ONE document unless --txt-docs-per-line; for a single .txt file use e.g. "
               "--txt-docs-per-line --val-fraction 0.01. Format and examples: data/README.md.",
    )
    ap.add_argument("inputs", nargs="+",
                    help=".txt / .jsonl files or directories (searched recursively); .jsonl = one document per "
                         "line, .txt = one document per file (see --txt-docs-per-line)")
    ap.add_argument("--out", required=True, help="output dataset directory, e.g. data/datasets/mycorpus_sp1024")
    tok = ap.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="existing SentencePiece .model to encode with")
    tok.add_argument("--vocab-size", type=int, help="train a BPE tokenizer of this vocab size (challenge settings)")
    ap.add_argument("--tokenizer-name", default="custom",
                    help="a trained model is <name>_<vocab>_bpe.model (default: %(default)s)")
    ap.add_argument("--tokenizer-dir", default=None,
                    help="where to write a trained model (default: <out>/../../tokenizers)")
    ap.add_argument("--tokenizer-train-docs", type=int, default=DEFAULT_TOKENIZER_TRAIN_DOCS,
                    help="train the tokenizer on at most this many train documents, 0 = all (default: %(default)s)")
    split = ap.add_mutually_exclusive_group()
    split.add_argument("--val-docs", type=int, default=None,
                       help=f"number of validation documents (default: {DEFAULT_VAL_DOCS})")
    split.add_argument("--val-fraction", type=float, default=None,
                       help="fraction of the documents used for validation, instead of --val-docs")
    ap.add_argument("--seed", type=int, default=1337,
                    help="seed of the document shuffle, i.e. the train/val split (default: %(default)s)")
    ap.add_argument("--no-shuffle", action="store_true", help="keep input order (the first documents -> val)")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                    help="tokens per shard (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                    help="encoding processes (default: %(default)s, the CPU count up to 8)")
    ap.add_argument("--txt-docs-per-line", action="store_true",
                    help=".txt inputs hold one document per non-blank line")
    ap.add_argument("--text-field", default="text",
                    help="JSON field holding the text in .jsonl inputs (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    ap.add_argument("--retrain-tokenizer", action="store_true",
                    help="replace an existing <name>_<vocab>_bpe.model (rebuild every dataset encoded with it)")
    args = ap.parse_args(argv)
    try:
        build_shards(
            args.out, args.inputs,
            tokenizer=args.tokenizer, vocab_size=args.vocab_size, tokenizer_name=args.tokenizer_name,
            tokenizer_dir=args.tokenizer_dir, tokenizer_train_docs=args.tokenizer_train_docs or None,
            val_docs=args.val_docs, val_fraction=args.val_fraction, seed=args.seed, shuffle=not args.no_shuffle,
            shard_tokens=args.shard_tokens, workers=args.workers, txt_docs_per_line=args.txt_docs_per_line,
            text_field=args.text_field, overwrite=args.overwrite, retrain_tokenizer=args.retrain_tokenizer,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
