"""Token shard file format shared by the data tools (described in data/README.md).

A shard is:
  * a header of 256 little-endian int32 values (1,024 bytes):
    header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = num_tokens, the rest zero;
  * then num_tokens little-endian uint16 token ids.
A shard is valid only if file_size == 1024 + 2 * num_tokens.

The header check (`inspect_shard`) uses only the standard library so the downloader can run it
without numpy; `read_shard` / `write_shard` need numpy.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2  # uint16
MAX_TOKEN_ID = 0xFFFF


class ShardError(ValueError):
    """A shard file is missing, truncated, or has a bad header. The message names the file."""

    def __init__(self, path, reason: str):
        super().__init__(path, reason)  # both in args, so the exception pickles
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def inspect_shard(path: str | os.PathLike) -> int:
    """Validate the header and size of a shard; return its token count or raise ShardError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(path, f"cannot read shard ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(path, f"truncated shard, {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, num_tokens = struct.unpack_from("<3i", raw, 0)
    if magic != SHARD_MAGIC:
        raise ShardError(path, f"bad magic {magic} (expected {SHARD_MAGIC})")
    if version != SHARD_VERSION:
        raise ShardError(path, f"unsupported shard version {version} (expected {SHARD_VERSION})")
    if num_tokens < 0:
        raise ShardError(path, f"negative token count {num_tokens} in header")
    expected = HEADER_BYTES + TOKEN_BYTES * num_tokens
    if size != expected:
        raise ShardError(
            path, f"size {size} bytes does not match header ({num_tokens} tokens -> {expected} bytes)"
        )
    return num_tokens


def shard_problem(path: str | os.PathLike) -> str | None:
    """None if the shard is valid, else a one-line description of what is wrong."""
    try:
        inspect_shard(path)
    except ShardError as e:
        return str(e)
    return None


def read_shard(path: str | os.PathLike):
    """Return the tokens of a shard as a numpy uint16 array; raise ShardError naming the file if invalid."""
    import numpy as np

    num_tokens = inspect_shard(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_BYTES)
    if tokens.size != num_tokens:  # file changed under us
        raise ShardError(path, f"read {tokens.size} tokens, header says {num_tokens}")
    return tokens.astype(np.uint16, copy=False)


def shard_header(num_tokens: int) -> bytes:
    header = [0] * HEADER_INTS
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, int(num_tokens)
    return struct.pack(f"<{HEADER_INTS}i", *header)


def temp_path_for(final: Path) -> Path:
    """A hidden sibling of `final` (same directory, hence same filesystem) for atomic placement."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_shard(path: str | os.PathLike, tokens) -> int:
    """Write tokens (any integer array-like with values in [0, 65535]) as a shard, atomically.

    The data goes to a temporary name in the same directory, is flushed to disk, then renamed over
    `path`, so a reader never sees a half-written file under the final name. Returns the token count.
    """
    import numpy as np

    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        raise ValueError(f"{path}: token ids must fit in uint16, got range [{arr.min()}, {arr.max()}]")
    if arr.size >= 2**31:
        raise ValueError(f"{path}: {arr.size} tokens do not fit in the int32 header")
    arr = arr.astype("<u2", copy=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, shard_header(arr.size) + arr.tobytes())
    return int(arr.size)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name beside `path`, fsync, then rename over `path`."""
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
