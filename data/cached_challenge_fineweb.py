#!/usr/bin/env python3
"""Download the challenge's pre-tokenized FineWeb shards and tokenizer from the Hugging Face Hub.

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
    python3 data/cached_challenge_fineweb.py 10            # bare integer = --train-shards 10

Source: the Hugging Face *dataset* repo `willdepueoai/parameter-golf` for sp1024 (and byte260), and
`kevclark/parameter-golf` for sp4096 / sp8192 (the exports the SP8192 records trained on); the env
MATCHED_FINEWEB_REPO_ID overrides either. Files live under the remote root prefix `datasets` (env
MATCHED_FINEWEB_REMOTE_ROOT_PREFIX). The manifest
`<prefix>/manifest.json` lists the datasets (`name`, `tokenizer_name`, `stats.files_train`,
`stats.files_val`) and the tokenizers (`name` + `model_path` / `vocab_path` / `path`).

Fetched (a remote path `<prefix>/X` lands at `<out>/X`; `<out>` defaults to this script's folder):
  manifest.json                                            (unless --skip-manifest: then it must exist)
  datasets/fineweb10B_<variant>/fineweb_val_NNNNNN.bin     every validation shard
  datasets/fineweb10B_<variant>/fineweb_train_NNNNNN.bin   the first --train-shards training shards
  tokenizers/...                                           the variant's tokenizer artifacts
  docs_selected.jsonl, docs_selected.source_manifest.json  with --with-docs

Downloads go through `huggingface_hub.hf_hub_download` (so HF_ENDPOINT, HF_TOKEN, HF_HOME /
HF_HUB_CACHE, HF_HUB_OFFLINE are honoured) into the HF cache, then are hard-linked (copy fallback)
to a temporary name next to the destination and renamed into place, so nothing half-written ever
carries a final name. Files already present and valid are skipped without any network access.
Every shard is checked (256-int32 header, magic 20240520, version 1, size == 1024 + 2*num_tokens);
a bad one is fetched again with force_download and, if still bad, the run fails naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Callable

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from shard_format import ShardError, inspect_shard, temp_path_for  # noqa: E402

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
# Larger vocabularies were exported to another dataset repo (same layout, its own manifest).
VARIANT_REPO_IDS = {"sp4096": "kevclark/parameter-golf", "sp8192": "kevclark/parameter-golf"}
OFFLINE_HINT = ("Without network access: `python3 data/make_smoke_dataset.py` builds a small offline dataset, "
                "and `python3 data/build_shards.py` turns your own text into shards (see data/README.md).")
DEFAULT_REMOTE_PREFIX = "datasets"
REPO_TYPE = "dataset"
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")
TOKENIZER_ARTIFACT_KEYS = ("model_path", "vocab_path", "path")


class DownloadError(Exception):
    """A failure reported to the user as one line (no traceback)."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable  # the endpoint could not be reached at all


# --------------------------------------------------------------------------------------------------
# Validation of local files
# --------------------------------------------------------------------------------------------------


def problem_with(path: Path, kind: str) -> str | None:
    """None if the file at `path` is usable as a `kind` file ("shard", "model", "json", "file")."""
    try:
        if kind == "shard":
            inspect_shard(path)
            return None
        size = path.stat().st_size
    except ShardError as e:
        return e.reason
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    if size == 0:
        return "empty file"
    if kind == "json":
        try:
            with open(path, "rb") as f:
                json.loads(f.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON ({e})"
    elif kind == "model":
        try:
            import sentencepiece as spm
        except ImportError:
            return None
        try:
            spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError depending on version
            return f"not a loadable SentencePiece model ({type(e).__name__})"
    return None


def kind_of(name: str) -> str:
    if name.endswith(".bin"):
        return "shard"
    if name.endswith(".model"):
        return "model"
    if name.endswith(".json"):
        return "json"
    return "file"


def human_size(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} MB"
    if n >= 1_000:
        return f"{n / 1e3:.1f} KB"
    return f"{n} B"


# --------------------------------------------------------------------------------------------------
# Hub access
# --------------------------------------------------------------------------------------------------


def _exception_chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _first_line(e: BaseException, width: int = 240) -> str:
    """The first line of an exception's message, shortened at a word boundary (never mid-word)."""
    lines = str(e).strip().splitlines()
    return textwrap.shorten(lines[0], width, placeholder=" ...") if lines else type(e).__name__


_CONNECTION_ERRORS = {
    "ConnectError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "Timeout",
    "NetworkError", "ProxyError", "SSLError", "NewConnectionError", "MaxRetryError",
    "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionRefusedError", "gaierror",
}


class Hub:
    """hf_hub_download + one-line error reporting. Imports huggingface_hub lazily."""

    def __init__(self, repo_id: str, revision: str):
        self.repo_id = repo_id
        self.revision = revision
        self._hf = None
        self._checked = False
        self._preflight_error: DownloadError | None = None

    @property
    def hf(self):
        if self._hf is None:
            try:
                import huggingface_hub
                import huggingface_hub.constants  # noqa: F401  (a lazily loaded submodule)
            except ImportError:
                raise DownloadError("huggingface_hub is not installed (pip install huggingface_hub)") from None
            self._hf = huggingface_hub
        return self._hf

    @property
    def endpoint(self) -> str:
        try:
            return self.hf.constants.ENDPOINT
        except (AttributeError, DownloadError):
            return os.environ.get("HF_ENDPOINT", "https://huggingface.co")

    def error(self, e: BaseException, remote: str) -> DownloadError:
        """A one-line DownloadError describing a huggingface_hub failure."""
        names = [type(x).__name__ for x in _exception_chain(e)]
        where = f"dataset repo {self.repo_id} at {self.endpoint}"
        first = _first_line(e)
        if names[0] in ("RepositoryNotFoundError", "GatedRepoError"):
            return DownloadError(f"{where}: repository not found or not accessible "
                                 "(check MATCHED_FINEWEB_REPO_ID / HF_TOKEN)")
        if names[0] == "RevisionNotFoundError":
            return DownloadError(f"{where}: revision {self.revision!r} not found")
        if names[0] in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            return DownloadError(f"{where}: file {remote} not found")
        if "OfflineModeIsEnabled" in names or (self.offline and "LocalEntryNotFoundError" in names):
            return DownloadError(f"HF_HUB_OFFLINE is set and {remote} (dataset repo {self.repo_id}) is not in the "
                                 f"local Hugging Face cache. {OFFLINE_HINT}", unreachable=True)
        if any(n in _CONNECTION_ERRORS for n in names):
            cause = next((x for x in _exception_chain(e) if type(x).__name__ not in ("LocalEntryNotFoundError",)), e)
            return DownloadError(f"cannot reach {self.endpoint} (dataset repo {self.repo_id}, file {remote}): "
                                 f"{type(cause).__name__}: {_first_line(cause)}. {OFFLINE_HINT}", unreachable=True)
        return DownloadError(f"failed to fetch {remote} from {where}: {type(e).__name__}: {first}")

    @property
    def offline(self) -> bool:
        return bool(getattr(self.hf.constants, "HF_HUB_OFFLINE", False))

    def _preflight(self, remote: str) -> None:
        """One quick HEAD without retries, so an unreachable endpoint fails fast (the download itself
        retries with backoff for ~20 s)."""
        if self._preflight_error is not None:
            raise self._preflight_error
        if self._checked:
            return
        self._checked = True
        hf = self.hf
        if self.offline:
            return  # offline mode: hf_hub_download serves from the cache or fails
        try:
            url = hf.hf_hub_url(self.repo_id, remote, repo_type=REPO_TYPE, revision=self.revision)
            hf.get_hf_file_metadata(url=url, timeout=getattr(hf.constants, "HF_HUB_ETAG_TIMEOUT", 10))
        except Exception as e:
            err = self.error(e, remote)
            if err.unreachable:
                self._preflight_error = err  # do not let later files wait through the client's retries
            else:
                self._checked = False
            raise err from None

    def download(self, remote: str, *, force: bool) -> Path:
        self._preflight(remote)
        try:
            path = self.hf.hf_hub_download(
                repo_id=self.repo_id, filename=remote, repo_type=REPO_TYPE, revision=self.revision,
                force_download=force,
            )
        except DownloadError:
            raise
        except Exception as e:
            raise self.error(e, remote) from None
        return Path(path)


# --------------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------------


def place(src: Path, final: Path, kind: str) -> None:
    """Hard-link (or copy) src to a temp name beside `final`, re-check it, then rename over `final`."""
    src = Path(os.path.realpath(src))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        problem = problem_with(tmp, kind)
        if problem is not None:
            raise DownloadError(f"{final.name}: copy is invalid ({problem})")
        os.replace(tmp, final)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        return a.read_bytes() == b.read_bytes()  # only used for small files (the manifest)
    except OSError:
        return False


def fetch_file(hub: Hub, remote: str, final: Path, *, force: bool, log: Callable[[str], None],
               label: str, refresh: bool = False) -> str:
    """Make `final` a valid copy of `remote`; return "present" or "downloaded".

    A valid local file is kept without any network access, unless `refresh` (ask the Hub; the HF
    cache makes an unchanged file cost one HEAD request) or `force` (download again).
    """
    kind = kind_of(final.name)
    if final.exists():
        problem = problem_with(final, kind)
        if problem is None and refresh and not force:
            cached = hub.download(remote, force=False)
            if problem_with(cached, kind) is None and _same_file(cached, final):
                log(f"{label} {final.name} {human_size(final.stat().st_size)} (up to date)")
                return "present"
        elif problem is None and not force:
            log(f"{label} {final.name} {human_size(final.stat().st_size)} (present)")
            return "present"
        if problem is not None:
            log(f"{label} {final.name}: local file is bad ({problem}); removing it and fetching again")
            final.unlink()
    cached = hub.download(remote, force=force)
    problem = problem_with(cached, kind)
    if problem is not None and not force:
        log(f"{label} {final.name}: downloaded copy is bad ({problem}); forcing a fresh download")
        cached = hub.download(remote, force=True)
        problem = problem_with(cached, kind)
    if problem is not None:
        raise DownloadError(
            f"{final.name} ({remote} in dataset repo {hub.repo_id}) is invalid after a forced re-download: {problem}"
        )
    place(cached, final, kind)
    log(f"{label} {final.name} {human_size(final.stat().st_size)} (downloaded)")
    return "downloaded"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _remote(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path


def _safe_relative(path: str, what: str) -> str:
    p = path.strip().lstrip("/")
    if not p or p.startswith("/") or any(part in ("..", "") for part in p.split("/")):
        raise DownloadError(f"manifest: unsafe or empty {what} path {path!r}")
    return p


def plan_files(manifest: dict, variant: str, train_shards: int, with_docs: bool) -> list[str]:
    """Paths relative to the remote prefix (== relative to the local data root), in fetch order."""
    name = f"fineweb10B_{variant}"
    datasets = manifest.get("datasets") or []
    entry = next((d for d in datasets if isinstance(d, dict) and d.get("name") == name), None)
    if entry is None:
        available = ", ".join(sorted(str(d.get("name")) for d in datasets if isinstance(d, dict))) or "none"
        hint = f"; {variant} is published on {VARIANT_REPO_IDS[variant]}" if variant in VARIANT_REPO_IDS else ""
        raise DownloadError(f"manifest has no dataset {name!r} (available: {available}){hint}")
    stats = entry.get("stats") or {}
    try:
        files_train, files_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"manifest entry {name!r} lacks integer stats.files_train / stats.files_val") from None
    if train_shards < 0:
        raise DownloadError(f"--train-shards must be >= 0, got {train_shards}")
    if train_shards > files_train:
        raise DownloadError(f"{name} has {files_train} train shards; {train_shards} were requested")
    files = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    files += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    tok_name = entry.get("tokenizer_name")
    if tok_name:
        tok = next((t for t in manifest.get("tokenizers") or [] if isinstance(t, dict) and t.get("name") == tok_name), None)
        if tok is None:
            raise DownloadError(f"manifest has no tokenizer {tok_name!r} (needed by {name})")
        for key in TOKENIZER_ARTIFACT_KEYS:
            if tok.get(key):
                rel = _safe_relative(str(tok[key]), f"tokenizer {key}")
                if rel not in files:
                    files.append(rel)
    if with_docs:
        files += list(DOCS_FILES)
    return files


def repo_for(variant: str) -> str:
    """MATCHED_FINEWEB_REPO_ID if set, else the repo that publishes `variant`."""
    return os.environ.get("MATCHED_FINEWEB_REPO_ID") or VARIANT_REPO_IDS.get(variant, DEFAULT_REPO_ID)


def run(args, log: Callable[[str], None] = print) -> dict:
    repo_id = repo_for(args.variant)
    prefix = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_PREFIX).strip("/")
    root = Path(args.out)
    hub = Hub(repo_id, args.revision)
    counts = {"downloaded": 0, "present": 0}

    manifest_path = root / "manifest.json"
    if args.skip_manifest:
        if not manifest_path.is_file():
            raise DownloadError(f"--skip-manifest given but {manifest_path} does not exist")
        log(f"[manifest] using local {manifest_path}")
    else:
        # Always refreshed (cheap: the HF cache answers unchanged files with a HEAD request only), so a
        # manifest from another repo never lingers.
        try:
            fetch_file(hub, _remote(prefix, "manifest.json"), manifest_path, force=args.force, log=log,
                       label="[manifest]", refresh=True)
        except DownloadError as e:
            if not (e.unreachable and problem_with(manifest_path, "json") is None):
                raise
            log(f"[manifest] warning: {e}; using the local {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DownloadError(f"{manifest_path}: cannot read manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise DownloadError(f"{manifest_path}: manifest is not a JSON object")

    files = plan_files(manifest, args.variant, args.train_shards, args.with_docs)
    log(f"{len(files)} files for fineweb10B_{args.variant} from dataset repo {repo_id} (prefix {prefix or '/'!r}) into {root}")
    for i, rel in enumerate(files, 1):
        status = fetch_file(hub, _remote(prefix, rel), root / rel, force=args.force, log=log,
                            label=f"[{i}/{len(files)}]")
        counts[status] += 1
    model = next((root / f for f in files if f.endswith(".model")), None)
    vocab = args.variant[2:] if args.variant.startswith("sp") else None
    log(f"done: {counts['downloaded']} downloaded, {counts['present']} already present; "
        f"DATA_PATH={root / 'datasets' / f'fineweb10B_{args.variant}'}"
        + (f" TOKENIZER_PATH={model}" if model else "") + (f" VOCAB_SIZE={vocab}" if vocab else ""))
    return counts


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Download the challenge FineWeb shards + tokenizer (manifest-driven, Hugging Face dataset repo).",
    )
    ap.add_argument("train_shards_positional", nargs="?", type=int, metavar="TRAIN_SHARDS",
                    help="same as --train-shards (overrides it)")
    ap.add_argument("--variant", default="sp1024",
                    help="sp<VOCAB> (sp1024, sp4096, sp8192, ...) or byte260; sp4096/sp8192 come from "
                         "kevclark/parameter-golf, the others from willdepueoai/parameter-golf "
                         "(MATCHED_FINEWEB_REPO_ID overrides)")
    ap.add_argument("--train-shards", type=int, default=80, help="number of train shards (100M tokens each)")
    ap.add_argument("--skip-manifest", action="store_true", help="use the local manifest.json, do not fetch it")
    ap.add_argument("--with-docs", action="store_true",
                    help="also fetch docs_selected.jsonl and docs_selected.source_manifest.json")
    ap.add_argument("--out", "--data-root", dest="out", default=str(_HERE),
                    help="local data root (default: the folder of this script, i.e. data/)")
    ap.add_argument("--revision", default="main", help="repo revision (branch, tag or commit)")
    ap.add_argument("--force", action="store_true", help="re-download every file even if present")
    args = ap.parse_args(argv)
    if args.train_shards_positional is not None:
        args.train_shards = args.train_shards_positional
    if not re.fullmatch(r"sp[1-9][0-9]*|byte260", args.variant):
        ap.error(f"--variant must be sp<VOCAB> or byte260, got {args.variant!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
