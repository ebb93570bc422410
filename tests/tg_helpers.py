"""Shared helpers for the train_gpt.py tests: shard writing, tiny configs, subprocess runs, log parsing.

Imported by tests/conftest.py and the test_*.py files of this suite (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_GPT = REPO / "train_gpt.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZER = FIXTURES / "fineweb_1024_bpe.model"
BOS = 1

# Every environment knob the script reads, taken from its source so that a stray variable in the caller's
# shell can never leak into a test config.
KNOBS = sorted(set(re.findall(r'env(?:_list)?\("([A-Z0-9_]+)"', TRAIN_GPT.read_text())))
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")

# A tiny model for in-process tests (values are strings, as in the environment), on the r549 stack (the
# defaults written in Hyperparameters) with its record's SGD TTT; the frontier recipe has its own tests in
# test_frontier.py.
TINY_MODEL = dict(
    RECIPE="r549", TTT_MODE="sgd",
    VOCAB_SIZE="1024", NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2",
    BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="16", VE_LAYERS="1,2", XSA_LAST_N="1", ROPE_DIMS="16",
    TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="32", COMPILE="0",
)

# The tiny end-to-end run of the brief (subprocess) on the r549 stack with its record's SGD TTT (phased TTT, the
# recipe's default, has its own runs: conftest.PHASED); DATA_PATH / TOKENIZER_PATH / RUN_ID are added per run.
TINY_RUN = dict(
    RECIPE="r549", TTT_MODE="sgd",
    VOCAB_SIZE="1024", SEED="1", NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2",
    TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024", ITERATIONS="30", WARMUP_STEPS="2",
    WARMDOWN_ITERS="10", VAL_LOSS_EVERY="10", TRAIN_LOG_EVERY="5", MAX_WALLCLOCK_SECONDS="0", VAL_TOKENS="4096",
    EVAL_STRIDE="32", TTT_ENABLED="1", TTT_CHUNK_TOKENS="1024", TTT_BATCH_SEQS="4", XSA_LAST_N="1",
    VE_LAYERS="1,2", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="16", ROPE_DIMS="16", COMPILE="0",
)


# ----------------------------------------------------------------------------- shards and text


def write_shard(path, tokens, magic=20240520, version=1, n_tokens=None, extra=b"") -> Path:
    """Challenge shard: 256 little-endian int32 header [magic, version, n_tokens, 0...], then uint16 tokens."""
    tokens = np.asarray(tokens)
    assert tokens.min(initial=0) >= 0 and tokens.max(initial=0) < 65536
    header = np.zeros(256, dtype="<i4")
    header[0], header[1] = magic, version
    header[2] = len(tokens) if n_tokens is None else n_tokens
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes() + extra)
    return path


def pydoc_docs() -> list[str]:
    """Real English text: the stdlib's pydoc topic pages, in a fixed order."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def encode_stream(sp, docs) -> np.ndarray:
    """[BOS] + ids for every document, back to back (the challenge layout, no EOS)."""
    out = []
    for d in docs:
        out.append(BOS)
        out.extend(sp.encode(d))
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------- in-process stand-ins


class DistStub:
    """Single-process stand-in for tg.Dist (no process group)."""

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size, self.enabled = rank, world_size, False
        self.device = torch.device("cpu")
        self.master = rank == 0

    def claim(self, start, end):
        return range(start, end)

    def all_reduce(self, t, op=None):
        return t

    def mean_(self, tensors):
        pass

    def share(self, obj):
        return obj

    def gather(self, obj):
        return [obj]

    def barrier(self):
        pass

    def close(self):
        pass


def clean_env(base=None) -> dict:
    env = dict(os.environ if base is None else base)
    for k in KNOBS + list(DIST_VARS):
        env.pop(k, None)
    return env


# ----------------------------------------------------------------------------- subprocess runs


@dataclass
class RunResult:
    name: str
    rc: int
    output: str
    log_path: Path
    cwd: Path
    artifact: Path
    env: dict

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.is_file() else ""

    def describe(self) -> str:
        return f"run {self.name} rc={self.rc}\n--- output tail ---\n{self.output[-4000:]}"


def run_train(name: str, cwd: Path, overrides: dict, nproc: int = 1, timeout: float = 300) -> RunResult:
    """Run train_gpt.py (or torchrun with nproc gloo workers) in `cwd`; logs land in cwd/logs/<name>.txt."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = clean_env()
    env.update(TINY_RUN)
    env.update(RUN_ID=name, ARTIFACT_PATH=str(cwd / f"{name}.int6.ptz"), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.update({k: str(v) for k, v in overrides.items()})
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN_GPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(TRAIN_GPT)]
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    return RunResult(name, p.returncode, p.stdout, cwd / "logs" / f"{name}.txt", cwd, Path(env["ARTIFACT_PATH"]),
                     env)


# ----------------------------------------------------------------------------- log parsing

_NUM = r"([-+0-9.eE]+|nan|inf)"


def val_lines(log: str) -> dict[int, tuple[float, float]]:
    return {int(m[0]): (float(m[1]), float(m[2]))
            for m in re.findall(rf"^step:(\d+)/\d+ val_loss:{_NUM} val_bpb:{_NUM} ", log, re.M)}


def train_lines(log: str) -> dict[int, float]:
    return {int(m[0]): float(m[1]) for m in re.findall(rf"^step:(\d+)/\d+ train_loss:{_NUM} ", log, re.M)}


def exact(log: str, key: str) -> tuple[float, float]:
    """(val_loss, val_bpb) of the last `<key> val_loss:X val_bpb:Y` line."""
    found = re.findall(rf"^{re.escape(key)} val_loss:{_NUM} val_bpb:{_NUM}$", log, re.M)
    assert found, f"no '{key}' line in log"
    return float(found[-1][0]), float(found[-1][1])


def line_value(log: str, pattern: str) -> str:
    m = re.search(pattern, log, re.M)
    assert m, f"pattern {pattern!r} not in log"
    return m.group(1)


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- closed-form counts


def param_count(a) -> int:
    """Closed-form parameter count of tg.GPT for a Hyperparameters-like object (SPEC §3.1 breakdown, plus the
    frontier's loops, gates and lanes)."""
    L, d, V = a.num_layers, a.model_dim, a.vocab_size
    head = d // a.num_heads
    kv = a.num_kv_heads * head
    hidden = int(a.mlp_mult * d)
    virtual = L + (a.num_loops * (a.loop_end - a.loop_start + 1) if a.num_loops else 0)  # looped depth
    enc = virtual // 2                          # looped encoder length: one skip weight (and gate) each
    n = V * d                                   # tok_emb (tied head)
    if a.bigram_vocab_size:
        n += a.bigram_vocab_size * a.bigram_dim + d * a.bigram_dim + 1   # embed, proj, scale
    if a.smear_enabled:
        n += a.smear_gate_dims + 1 if a.smear_gate_dims else d   # smear.proj + smear.lam, or smear.gate
    n += enc * d * (2 if a.skip_gates else 1)   # skip_weights (+ skip_gates)
    n += 2 * L * d * d + 2 * L * kv * d         # qo_bank, kv_bank
    n += 2 * L * hidden * d                     # mlp up + down banks
    n += L * (4 * d + a.num_heads)              # attn_scale, mlp_scale, resid_mix (2d), q_gain
    n += L * a.num_heads * a.attn_gate_dims     # SparseAttnGate [H, k] per block
    if a.parallel_start and a.parallel_mode == "lanes":
        n += (L - a.parallel_start) * (2 + 4)   # lane_resid, lane_post per lanes block
    ve_layers = a.ve_layers if a.ve_enabled else []
    if ve_layers:
        n += V * a.ve_dim + kv * a.ve_dim + 1 + len(ve_layers)
    return n


def randomize(model, std=0.2, seed=0):
    """Give every parameter random values (gates, lanes and zero-init banks included), so no block is the
    identity and no branch is zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def assert_same_training(one: str, two: str):
    """A 1-process and a 2-process log of the same 6-step config: same val curve (steps 0, 3, 6), it trained,
    the same exported weights (DIAGNOSTIC post_ema_exact) and close train losses."""
    import pytest
    assert "world_size:1 grad_accum_steps:8" in one and "world_size:2 grad_accum_steps:4" in two
    v1, v2 = val_lines(one), val_lines(two)
    assert sorted(v1) == sorted(v2) == [0, 3, 6]
    for s in v1:
        assert abs(v1[s][0] - v2[s][0]) <= 1.5e-4 and abs(v1[s][1] - v2[s][1]) <= 1.5e-4, (s, v1[s], v2[s])
    assert v1[6][0] < v1[0][0] - 0.3  # the runs did train
    (l1, b1), (l2, b2) = exact(one, "DIAGNOSTIC post_ema_exact"), exact(two, "DIAGNOSTIC post_ema_exact")
    assert l2 == pytest.approx(l1, rel=1e-6) and b2 == pytest.approx(b1, rel=1e-6)
    # rank 0 logs its own micro-batches' mean, so train losses agree only roughly (exactly at init)
    t1, t2 = train_lines(one), train_lines(two)
    assert sorted(t1) == sorted(t2) == list(range(1, 7))
    assert t1[1] == pytest.approx(t2[1], abs=0.02)
    assert all(abs(t1[s] - t2[s]) < 0.3 for s in t1)
    return v1, l1
