#!/usr/bin/env python3
"""Build a small offline English dataset + vocab-1024 tokenizer in the challenge format.

No network. The text comes from the Python standard library, present on any machine with Python:
  * `pydoc_data.topics`: the help topics of the language reference (~465 KB of English prose),
    one document per topic;
  * docstrings (module, class, function; read with `ast`, never imported) of the top-level
    stdlib modules, one document per module, modules in sorted file-name order.

Split: the topics are shuffled with a fixed seed and the first ones, up to ~150 KB of text, are the
validation documents (>= 40k tokens; checked); the other topics and all docstring documents are
the training documents. The tokenizer (challenge BPE settings, vocab 1024) is trained on the
training documents only. Output (default `data/smoke/`):

  data/smoke/datasets/fineweb10B_sp1024/fineweb_val_000000.bin
  data/smoke/datasets/fineweb10B_sp1024/fineweb_train_000000.bin
  data/smoke/tokenizers/smoke_1024_bpe.model  (+ .vocab)

  DATA_PATH=data/smoke/datasets/fineweb10B_sp1024 \
  TOKENIZER_PATH=data/smoke/tokenizers/smoke_1024_bpe.model VOCAB_SIZE=1024 python3 train_gpt.py

Deterministic for a given Python version (the text is that version's stdlib). Existing valid outputs
are kept unless --force.
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from build_shards import build_shards, check_tokenizer  # noqa: E402
from shard_format import ShardError, inspect_shard  # noqa: E402

SMOKE_SEED = 1337
SMOKE_VOCAB = 1024
SMOKE_VAL_BYTES = 150_000
SMOKE_MIN_VAL_TOKENS = 40_000
DATASET_NAME = "fineweb10B_sp1024"
TOKENIZER_NAME = "smoke"


def smoke_paths(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    data = out / "datasets" / DATASET_NAME
    tok = out / "tokenizers" / f"{TOKENIZER_NAME}_{SMOKE_VOCAB}_bpe.model"
    return {
        "out_dir": out,
        "data_path": data,
        "tokenizer_path": tok,
        "val_shards": [data / "fineweb_val_000000.bin"],
        "train_shards": [data / "fineweb_train_000000.bin"],
    }


def topic_documents() -> list[str]:
    from pydoc_data import topics

    return [topics.topics[k] for k in sorted(topics.topics) if topics.topics[k].strip()]


def docstring_documents() -> list[str]:
    """One document per top-level stdlib module: its docstrings joined by blank lines."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        if path.name.startswith("_") or path.name == "this.py":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                ds = ast.get_docstring(node, clean=True)
                if ds and ds.strip():
                    parts.append(ds.strip())
        if parts:
            docs.append("\n\n".join(parts))
    return docs


def _existing_ok(paths: dict) -> bool:
    try:
        for p in paths["val_shards"] + paths["train_shards"]:
            inspect_shard(p)
        sp = check_tokenizer(paths["tokenizer_path"])
        return sp.vocab_size() == SMOKE_VOCAB
    except (ShardError, OSError, ValueError, RuntimeError):
        return False


def foreign_shards(paths: dict) -> list[Path]:
    """Shards in the smoke dataset's folder that this tool did not write (a build replaces every shard there):
    any beyond its two, or any at all without the smoke tokenizer beside them."""
    found = sorted(paths["data_path"].glob("fineweb_*_*.bin"))
    own = set(paths["val_shards"] + paths["train_shards"]) if paths["tokenizer_path"].is_file() else set()
    return [p for p in found if p not in own]


def build_smoke_dataset(out_dir: str | Path = _HERE / "smoke", *, force: bool = False, workers: int = 1,
                        log=print) -> dict:
    """Build (or reuse) the smoke dataset under out_dir; return its paths and token counts. Refuses a folder
    that holds other shards (downloaded FineWeb shards under --out data, say): it would delete them."""
    log = log or (lambda s: None)
    paths = smoke_paths(out_dir)
    foreign = foreign_shards(paths)
    if foreign:
        raise RuntimeError(f"{paths['data_path']} holds {len(foreign)} shards this tool did not build (e.g. "
                           f"{foreign[0].name}); building the smoke dataset there would delete them: choose another "
                           f"--out (default: data/smoke)")
    if not force and _existing_ok(paths):
        log(f"smoke dataset already present under {paths['out_dir']} (use --force to rebuild)")
        paths["built"] = False
    else:
        t0 = time.time()
        topics = topic_documents()
        order = np.random.RandomState(SMOKE_SEED).permutation(len(topics))
        topics = [topics[i] for i in order]
        n_val, acc = 0, 0
        while n_val < len(topics) - 1 and acc < SMOKE_VAL_BYTES:
            acc += len(topics[n_val].encode("utf-8"))
            n_val += 1
        documents = topics + docstring_documents()
        res = build_shards(
            paths["data_path"], documents=documents, vocab_size=SMOKE_VOCAB, tokenizer_name=TOKENIZER_NAME,
            tokenizer_dir=paths["tokenizer_path"].parent, tokenizer_train_docs=None,
            val_docs=n_val, shuffle=False, workers=workers, overwrite=True, retrain_tokenizer=True, log=log,
        )
        assert res["tokenizer"] == paths["tokenizer_path"]
        assert res["val"]["shards"] == paths["val_shards"] and res["train"]["shards"] == paths["train_shards"]
        log(f"smoke dataset built under {paths['out_dir']} in {time.time() - t0:.1f}s")
        paths["built"] = True
    paths["val_tokens"] = sum(inspect_shard(p) for p in paths["val_shards"])
    paths["train_tokens"] = sum(inspect_shard(p) for p in paths["train_shards"])
    if paths["val_tokens"] < SMOKE_MIN_VAL_TOKENS:
        raise RuntimeError(f"smoke val split has only {paths['val_tokens']} tokens (< {SMOKE_MIN_VAL_TOKENS})")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(_HERE / "smoke"), help="output root (default: data/smoke next to this script)")
    ap.add_argument("--force", action="store_true", help="rebuild even if valid outputs exist")
    args = ap.parse_args(argv)
    try:
        p = build_smoke_dataset(args.out, force=args.force)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"val_tokens={p['val_tokens']} train_tokens={p['train_tokens']}")
    print(f"DATA_PATH={p['data_path']} TOKENIZER_PATH={p['tokenizer_path']} VOCAB_SIZE={SMOKE_VOCAB}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
