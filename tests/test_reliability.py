"""Reliability of train_gpt.py runs: the pre-flight checks before any training step (every shard's header, size
and token ids, the artifact path, the compressor), finite-or-stop (a diverged loss, non-finite knobs, non-finite
export weights), errors written to logs/<RUN_ID>.txt (exceptions, config errors, SIGTERM), knob hygiene (stray
knob-like variables, STRICT_ENV, range checks), one run / one log / one artifact (RUN_ID refusal, RESUME_LOG, the
artifact lock, the SHA-256 pin of the final evaluation), the PGOLF6 checksum, eval-only honesty, and a 2-process
run with a parameter that gets no gradient.

Runs that must stop before training are single train_gpt.py processes started here (no torchrun), each a few
seconds; the rest is in-process."""
from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tg_helpers as H
import train_gpt as tg

CPU = torch.device("cpu")

# On top of H.TINY_RUN: a few steps, no TTT, no intermediate validation, no sliding window.
FAST = dict(ITERATIONS=3, WARMUP_STEPS=0, TTT_ENABLED=0, VAL_LOSS_EVERY=0, EVAL_STRIDE=64)


# ----------------------------------------------------------------------------- helpers


class Run:
    """One finished train_gpt.py process: exit code, stdout and stderr apart, its pid, its folder."""

    def __init__(self, cwd: Path, run_id: str, proc: subprocess.Popen, out: str, err: str, artifact: Path):
        self.cwd, self.run_id, self.rc, self.pid = cwd, run_id, proc.returncode, proc.pid
        self.out, self.err, self.artifact = out, err, artifact
        self.log_path = cwd / "logs" / f"{run_id}.txt"

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.is_file() else ""

    def describe(self) -> str:
        return f"run {self.run_id} rc={self.rc}\n--- stdout tail ---\n{self.out[-3000:]}\n--- stderr ---\n{self.err[-3000:]}"


def cli_env(cwd: Path, run_id: str, data: Path, **knobs) -> dict:
    env = H.clean_env()
    env.update(H.TINY_RUN)
    env.update(FAST)
    env.update(RUN_ID=run_id, ARTIFACT_PATH=str(cwd / f"{run_id}.int6.ptz"), DATA_PATH=str(data),
               TOKENIZER_PATH=str(H.TOKENIZER), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.update({k: str(v) for k, v in knobs.items()})
    return {k: str(v) for k, v in env.items()}


def cli(cwd: Path, run_id: str, data: Path, timeout: float = 180, **knobs) -> Run:
    """Run `python3 train_gpt.py` in cwd (H.TINY_RUN + FAST + knobs) and wait for it."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = cli_env(cwd, run_id, data, **knobs)
    p = subprocess.Popen([sys.executable, str(H.TRAIN_GPT)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    return Run(cwd, run_id, p, out, err, Path(env["ARTIFACT_PATH"]))


def assert_stopped_before_training(run: Run, *needles: str, phase: str = "preflight"):
    """Non-zero exit, no step: line at all (no train step, no step-0 validation), and the reason on stderr and as
    the log's last line, after `run_stopped phase:<phase> step:0`."""
    assert run.rc == 1, run.describe()
    log = run.log
    assert log, f"no log {run.log_path}\n{run.describe()}"
    assert not re.search(r"^step:", log, re.M), f"a training/validation step ran\n{log[-2000:]}"
    lines = log.rstrip("\n").splitlines()
    assert lines[-2] == f"run_stopped phase:{phase} step:0", lines[-3:]
    assert lines[-1].startswith("error: ") and lines[-1] in run.err, (lines[-1], run.err)
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    assert not run.artifact.is_file()
    return lines[-1]


def temp_files(*folders: Path) -> list[str]:
    return [str(p) for d in folders if d.is_dir() for p in d.iterdir() if re.search(r"\.tmp\d", p.name)]


@pytest.fixture
def own_data(tmp_path, tiny_data):
    """A private copy of tiny_data (one train and one val shard) for a test to damage."""
    d = tmp_path / "data" / "fineweb10B_sp1024"
    shutil.copytree(tiny_data, d)
    return d


def _second_train_shard(data: Path, case: str) -> Path:
    """fineweb_train_000001.bin: a copy of the first train shard, then damaged. The tiny runs read only a few
    thousand tokens of shard 0, so without a pre-flight they would never reach it."""
    first = data / "fineweb_train_000000.bin"
    path = data / "fineweb_train_000001.bin"
    raw = first.read_bytes()
    if case == "truncated":
        path.write_bytes(raw[:len(raw) // 2 + 1])
    elif case == "wrong_magic":
        header = np.frombuffer(raw[:1024], dtype="<i4").copy()
        header[0] = 20240521
        path.write_bytes(header.tobytes() + raw[1024:])
    elif case == "empty":
        path.write_bytes(b"")
    return path


def _with_bad_token(path: Path, pos: int, value: int):
    tokens = np.asarray(tg.load_shard(str(path))).astype(np.int64)
    tokens[pos] = value
    H.write_shard(path, tokens)


@pytest.fixture
def in_process(make_args, monkeypatch, tmp_path, tiny_data):
    """Environment for tg.main() in this process: a tiny 5-step r549 run in tmp_path (logs/ and the artifact
    there). Returns a function that sets the knobs and returns the log path."""

    def setup(**knobs):
        monkeypatch.chdir(tmp_path)
        base = dict(DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(H.TOKENIZER), TRAIN_BATCH_TOKENS="1024",
                    VAL_TOKENS="4096", ITERATIONS="5", WARMUP_STEPS="0", TTT_ENABLED="0", VAL_LOSS_EVERY="0",
                    MAX_WALLCLOCK_SECONDS="0", EVAL_STRIDE="64", RUN_ID="inproc",
                    ARTIFACT_PATH=str(tmp_path / "inproc.int6.ptz"))
        base.update(knobs)
        make_args(**base)
        return tmp_path / "logs" / f"{base['RUN_ID']}.txt"

    return setup


def _tiny_artifact(make_args, path: Path, seed=0, **knobs) -> tuple[bytes, "tg.Hyperparameters"]:
    a = make_args(**knobs)
    torch.manual_seed(seed)
    m = H.randomize(tg.GPT(a), std=0.05, seed=seed)
    arch = {k: getattr(a, k) for k in tg.ARCH_KEYS}
    blob = tg.pack_artifact(tg.quantize_state(m.state_dict(), a), arch, "lzma")
    tg.write_atomic(str(path), blob)
    return blob, a


# ----------------------------------------------------------------------------- 1. pre-flight


@pytest.mark.parametrize("case, needle", [
    ("truncated", "header says {n} tokens ({size} bytes) but file has {cut} bytes"),
    ("wrong_magic", "bad magic 20240521 (expected 20240520)"),
    ("empty", "file of 0 bytes"),
])
def test_bad_second_train_shard_stops_before_step_1(tmp_path, own_data, case, needle):
    bad = _second_train_shard(own_data, case)
    first = own_data / "fineweb_train_000000.bin"
    needle = needle.format(n=len(tg.load_shard(str(first))), size=first.stat().st_size, cut=bad.stat().st_size)
    run = cli(tmp_path / "run", "badshard", own_data)
    error = assert_stopped_before_training(run, str(bad), needle)
    assert error.startswith(f"error: shard {bad}:")
    assert "preflight: ok" not in run.log


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_id_out_of_vocab_is_named_with_file_and_position(tmp_path, own_data, split):
    path = own_data / f"fineweb_{split}_000000.bin"
    _with_bad_token(path, 777, 1024)
    run = cli(tmp_path / "run", f"badid_{split}", own_data)
    assert_stopped_before_training(run, f"shard {path}: token id 1024 at position 777 is >= VOCAB_SIZE=1024")


def test_check_shard_unit(tmp_path):
    good = H.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(100) % 50)
    assert tg.check_shard(str(good), 50) is None
    assert tg.check_shard(str(good), 49) == f"shard {good}: token id 49 at position 49 is >= VOCAB_SIZE=49"
    # the first offending position, not the largest id
    H.write_shard(good, [1, 2, 60, 3, 99, 60])
    assert tg.check_shard(str(good), 50) == f"shard {good}: token id 60 at position 2 is >= VOCAB_SIZE=50"
    empty = H.write_shard(tmp_path / "fineweb_train_000001.bin", [])
    assert tg.check_shard(str(empty), 50) is None  # a valid header of 0 tokens holds no bad id
    short = tmp_path / "fineweb_train_000002.bin"
    short.write_bytes(b"\0" * 10)
    assert "shorter than the 1024-byte header" in tg.check_shard(str(short), 50)
    assert "No such file" in tg.check_shard(str(tmp_path / "missing.bin"), 50)


class _GatherStub(H.DistStub):
    """Rank `rank` of `world_size`, alone in this process: gather() returns its own value followed by `others`,
    which stand for the other ranks' values."""

    def __init__(self, rank, world_size, others=()):
        super().__init__(rank, world_size)
        self.others = list(others)

    def gather(self, obj):
        return [obj] + self.others


def test_preflight_splits_files_over_ranks_and_gathers_errors(make_args, monkeypatch, tmp_path):
    data = tmp_path / "data"
    files = [H.write_shard(data / f"fineweb_{s}_00000{i}.bin", np.arange(64)) for s, n in (("train", 3), ("val", 2))
             for i in range(n)]
    checked = {0: [], 1: []}  # rank -> the files that rank's preflight checked
    real = tg.check_shard

    def check_shard(path, vocab_size):
        checked[rank].append(path)
        return real(path, vocab_size)

    monkeypatch.setattr(tg, "check_shard", check_shard)
    for rank in range(2):
        a = make_args(DATA_PATH=str(data), ARTIFACT_PATH=str(tmp_path / f"r{rank}.ptz"), TOKENIZER_PATH=H.TOKENIZER)
        lock, _, _ = tg.preflight(a, _GatherStub(rank, 2), lambda msg: None)
        assert (lock is not None) == (rank == 0), "rank 0 alone locks the artifact"
        if lock:
            lock.close()
    assert sorted(checked[0] + checked[1]) == sorted(map(str, files)) and not set(checked[0]) & set(checked[1])
    assert len(checked[0]) == 3 and len(checked[1]) == 2
    # another rank's bad shards stop this rank too; the first is named, the rest counted
    a = make_args(DATA_PATH=str(data), ARTIFACT_PATH=str(tmp_path / "g.ptz"), TOKENIZER_PATH=H.TOKENIZER)
    others = [["shard /x/fineweb_train_000007.bin: bad magic 1 (expected 20240520)"], ["shard /x/y: bad"]]
    with pytest.raises(SystemExit) as ei:
        tg.preflight(a, _GatherStub(0, 3, others), lambda msg: None)
    assert str(ei.value) == ("error: shard /x/fineweb_train_000007.bin: bad magic 1 (expected 20240520) "
                             "(and 1 more bad shards)")
    # all good: the validation split loaded (its three lines), then one summary line
    a = make_args(DATA_PATH=str(data), ARTIFACT_PATH=str(tmp_path / "ok.ptz"), TOKENIZER_PATH=H.TOKENIZER)
    logs = []
    lock, val, luts = tg.preflight(a, H.DistStub(), logs.append)
    lock.close()
    assert val.tolist() == list(range(64)) + [0] and len(luts) == 3  # 127 targets: one 64-token sequence kept
    assert [line.split(":")[0] for line in logs[:3]] == ["val_bpb", "val_loader", "val_loader"] and len(logs) == 4
    assert logs[2] == "val_loader:split_targets:127 (scored: whole sequences of 64, VAL_TOKENS=0)"
    assert re.fullmatch(r"preflight: ok shards:5 token_ids<1024 compressor:auto time:\d+\.\ds", logs[3])


def test_check_shard_time_per_gb(tmp_path):
    """check_shard reads the whole file (a vectorized max over the memory map). Prints s/GB on this machine,
    warm (page cache) and cold (the file dropped from the page cache), with `pytest -s`."""
    n = 100_000_000  # 200 MB of tokens
    path = tmp_path / "fineweb_train_000000.bin"
    H.write_shard(path, np.tile(np.arange(1024, dtype=np.uint16), n // 1024 + 1)[:n])
    gb = path.stat().st_size / 1e9
    timings = {}
    for kind in ("cold", "warm"):
        if kind == "cold":
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        t = time.perf_counter()
        assert tg.check_shard(str(path), 1024) is None
        timings[kind] = (time.perf_counter() - t) / gb
    with open(path, "r+b") as f:  # the very last token: check_shard must read to the end
        f.seek(-2, os.SEEK_END)
        f.write(np.array([1024], dtype="<u2").tobytes())
    t = time.perf_counter()
    assert tg.check_shard(str(path), 1024) == f"shard {path}: token id 1024 at position {n - 1} is >= VOCAB_SIZE=1024"
    timings["bad_id"] = (time.perf_counter() - t) / gb
    print("\ncheck_shard s/GB: " + " ".join(f"{k}:{v:.3f}" for k, v in timings.items()))
    assert all(v < 30 for v in timings.values()), timings


def test_artifact_path_in_a_missing_directory_fails_before_training(tmp_path, tiny_data):
    target = tmp_path / "no" / "such" / "dir" / "model.ptz"
    run = cli(tmp_path / "run", "missingdir", tiny_data, ARTIFACT_PATH=target)
    assert_stopped_before_training(run, f"ARTIFACT_PATH={target}", f"directory {target.parent} does not exist")
    assert not (tmp_path / "no").exists()
    assert temp_files(tmp_path, tmp_path / "run") == []


def test_artifact_path_naming_a_directory_fails_before_training(tmp_path, tiny_data):
    target = tmp_path / "adir"
    target.mkdir()
    run = cli(tmp_path / "run", "isdir", tiny_data, ARTIFACT_PATH=target)
    assert_stopped_before_training(run, f"ARTIFACT_PATH={target} is a directory")
    assert list(target.iterdir()) == []
    assert temp_files(tmp_path, target, tmp_path / "run") == []
    assert not Path(f"{target}.lock").exists()


def test_missing_zstandard_fails_at_start(tmp_path, tiny_data):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "zstandard.py").write_text("raise ImportError('zstandard is hidden by this test')\n")
    run = cli(tmp_path / "run", "nozstd", tiny_data, PYTHONPATH=shim, COMPRESSOR="zstd")
    assert_stopped_before_training(run, "zstandard", "COMPRESSOR=auto", "COMPRESSOR=zstd")


def test_preflight_without_zstandard_in_process(make_args, monkeypatch, tmp_path, tiny_data):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` raises ImportError
    a = make_args(DATA_PATH=str(tiny_data), ARTIFACT_PATH=str(tmp_path / "a.ptz"), COMPRESSOR="zstd",
                  TOKENIZER_PATH=H.TOKENIZER)
    with pytest.raises(SystemExit, match=r"zstandard.*COMPRESSOR=auto.*lzma"):
        tg.preflight(a, H.DistStub(), lambda msg: None)
    assert list(tmp_path.iterdir()) == [], "checked before the artifact path is locked"
    a = make_args(DATA_PATH=str(tiny_data), ARTIFACT_PATH=str(tmp_path / "b.ptz"), COMPRESSOR="lzma",
                  TOKENIZER_PATH=H.TOKENIZER)
    logs = []
    tg.preflight(a, H.DistStub(), logs.append)[0].close()  # lzma needs no zstandard
    assert logs[-1].startswith("preflight: ok shards:2 token_ids<1024 compressor:lzma ")


# ----------------------------------------------------------------------------- 2. finite or stop


def test_diverged_loss_stops_within_10_steps_without_artifact(tmp_path, tiny_data):
    run = cli(tmp_path / "run", "diverge", tiny_data, ITERATIONS=30, TIED_EMBED_LR="1e30")
    assert run.rc == 1, run.describe()
    log = run.log
    m = re.search(r"^run_stopped phase:train step:(\d+)\nerror: the training loss became non-finite", log, re.M)
    assert m and 1 <= int(m.group(1)) <= 10, log[-2000:]
    assert any(math.isnan(v) for v in H.train_lines(log).values()), "the loss did go NaN"
    assert max(H.train_lines(log)) < 10
    assert "error: the training loss became non-finite" in run.err
    assert not run.artifact.exists() and "Serialized model" not in log
    assert sorted(p.name for p in run.cwd.iterdir()) == ["logs"], "no artifact, lock or temporary file"


def _trainer(make_args, tmp_path, **knobs):
    a = make_args(**dict(dict(TRAIN_BATCH_TOKENS="128", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0",
                              VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="0"), **knobs))
    files = [str(H.write_shard(tmp_path / "fineweb_train_000000.bin",
                               np.random.default_rng(0).integers(2, 1024, 20000)))]
    torch.manual_seed(0)
    return tg.Trainer(a, H.DistStub(), lambda msg: None, tg.GPT(a), files, 1)


@pytest.mark.parametrize("iterations, bad_from, stop_at, value", [
    (30, 3, 10, math.nan), (30, 12, 20, math.inf), (30, 10, 10, -math.inf), (5, 2, 5, math.nan), (30, 30, 30, math.nan),
])
def test_non_finite_loss_is_read_every_10_steps(make_args, tmp_path, iterations, bad_from, stop_at, value):
    tr = _trainer(make_args, tmp_path, ITERATIONS=str(iterations))
    real, calls = tr.step, []

    def step(loader, qat, looped):
        calls.append(1)
        loss = real(loader, qat, looped)
        return loss * value if len(calls) >= bad_from else loss

    tr.step = step
    with pytest.raises(SystemExit) as ei:
        tr.run(lambda looped: (0.0, 0.0), tg.WeightAverager(tr.params, tr.args, lambda msg: None))
    assert str(ei.value).startswith(f"error: the training loss became non-finite at or before step {stop_at} ")
    assert len(calls) == stop_at and tg.PROGRESS == {"phase": "train", "step": stop_at}


def test_finite_loss_trains_to_the_end(make_args, tmp_path):
    tr = _trainer(make_args, tmp_path, ITERATIONS="12")
    steps, _ = tr.run(lambda looped: (0.0, 0.0), tg.WeightAverager(tr.params, tr.args, lambda msg: None))
    assert steps == 12


@pytest.mark.parametrize("name, value", [
    ("EMA_DECAY", "nan"), ("MAX_WALLCLOCK_SECONDS", "nan"), ("TIED_EMBED_LR", "inf"), ("MATRIX_LR", "-inf"),
    ("TTT_LR", "NaN"),
])
def test_non_finite_float_knobs_are_rejected(make_args, name, value):
    with pytest.raises(SystemExit) as ei:
        make_args(**{name: value})
    assert str(ei.value).startswith(f"error: {name}=") and "is not a finite number" in str(ei.value)


def _export_args(make_args, tmp_path):
    return make_args(ARTIFACT_PATH=str(tmp_path / "model.int6.ptz"))


def test_non_finite_export_weights_write_nothing(make_args, tmp_path):
    a = _export_args(make_args, tmp_path)
    torch.manual_seed(0)
    m = tg.GPT(a)
    with torch.no_grad():
        m.blocks[1].mlp_scale[3] = math.nan
        m.skip_weights[0, 0] = math.inf
    logs = []
    with pytest.raises(SystemExit) as ei:
        tg.export_model(a, H.DistStub(), logs.append, m, None, b"code", {"pre_quant": 1.0})
    msg = str(ei.value)
    assert msg.startswith("error: the export weights are not finite") and "no artifact written" in msg
    assert "skip_weights" in msg and "blocks.1.mlp_scale" in msg
    assert list(tmp_path.iterdir()) == [] and logs == []


def test_non_finite_pre_quant_bpb_writes_nothing(make_args, tmp_path):
    a = _export_args(make_args, tmp_path)
    m = tg.GPT(a)
    with pytest.raises(SystemExit, match="val_bpb nan"):
        tg.export_model(a, H.DistStub(), lambda msg: None, m, None, b"code", {"pre_quant": math.nan})
    assert list(tmp_path.iterdir()) == []


def test_export_records_the_sha256_it_wrote(make_args, tmp_path):
    a = _export_args(make_args, tmp_path)
    m = H.randomize(tg.GPT(a), std=0.05)
    results = {"pre_quant": 1.0}
    assert tg.export_model(a, H.DistStub(), lambda msg: None, m, None, b"code", results) == 0
    assert results["artifact_sha256"] == H.sha256_file(a.artifact_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int6.ptz"]


# ----------------------------------------------------------------------------- 3. errors in the log


def test_exception_after_start_is_logged_with_traceback(in_process, monkeypatch):
    log_path = in_process()
    real = tg.Trainer.step
    calls = []

    def step(self, loader, qat, looped):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in the third step")
        return real(self, loader, qat, looped)

    monkeypatch.setattr(tg.Trainer, "step", step)
    with pytest.raises(RuntimeError, match="boom"):
        tg.main()
    log = log_path.read_text()
    assert "preflight: ok" in log and re.search(r"^step:2/5 train_loss:", log, re.M)
    tail = log.split("run_stopped ")[-1]
    assert tail.startswith("phase:train step:2\nTraceback (most recent call last):\n")
    assert 'raise RuntimeError("boom in the third step")' in tail
    assert tail.rstrip("\n").splitlines()[-1] == "error: RuntimeError: boom in the third step"
    assert not (log_path.parent.parent / "inproc.int6.ptz").exists()
    assert not (log_path.parent.parent / "inproc.int6.ptz.lock").exists(), "the lock file is removed at exit"


def test_config_error_creates_the_log(in_process, monkeypatch, tmp_path):
    log_path = in_process(RUN_ID="badcfg")
    monkeypatch.setenv("NUM_LAYERS", "0")  # after in_process built (and so validated) the rest
    with pytest.raises(SystemExit) as ei:
        tg.main()
    assert str(ei.value) == "error: NUM_LAYERS must be >= 1"
    assert log_path.read_text() == "run_stopped phase:setup step:0\nerror: NUM_LAYERS must be >= 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]


def test_sigterm_is_logged_with_phase_and_step(tmp_path, tiny_data):
    cwd = tmp_path / "run"
    cwd.mkdir()
    env = cli_env(cwd, "term", tiny_data, ITERATIONS=100000, TRAIN_LOG_EVERY=1)
    log_path = cwd / "logs" / "term.txt"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        p = subprocess.Popen([sys.executable, str(H.TRAIN_GPT)], cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            deadline = time.time() + 120
            while not (log_path.is_file() and re.search(r"^step:\d+/100000 train_loss", log_path.read_text(), re.M)):
                assert p.poll() is None and time.time() < deadline, "the run ended or never reached a step"
                time.sleep(0.05)
            p.send_signal(signal.SIGTERM)
            rc = p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
    assert rc == 1, f"rc={rc}: SIGTERM must end the run through its handler, not kill it"
    log = log_path.read_text()
    lines = log.rstrip("\n").splitlines()
    m = re.fullmatch(r"error: stopped by signal SIGTERM in phase train at step (\d+)", lines[-1])
    assert m, lines[-3:]
    step = int(m.group(1))
    assert lines[-2] == f"run_stopped phase:train step:{step}"
    assert step >= max(H.train_lines(log)) >= 1
    assert lines[-1] in (tmp_path / "err.txt").read_text()
    assert sorted(p.name for p in cwd.iterdir()) == ["logs"], "no artifact, no lock left behind"


@pytest.mark.parametrize("device,ids", [("cuda:3", [3]), ("cpu", None)])
def test_closing_barrier_names_the_gpu(monkeypatch, device, ids):
    calls = []
    monkeypatch.setattr(tg.dist, "barrier", lambda **kw: calls.append(kw))
    monkeypatch.setattr(tg.dist, "destroy_process_group", lambda: calls.append("destroyed"))
    d = tg.Dist.__new__(tg.Dist)
    d.enabled, d.device = True, torch.device(device)
    d.close()
    assert calls == [{"device_ids": ids}, "destroyed"]


# ----------------------------------------------------------------------------- 4. knob hygiene

KNOWN_ENV = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PATH", "HOME",
             "CUDA_VISIBLE_DEVICES", "PYTHONUNBUFFERED", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
             "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "LD_LIBRARY_PATH",
             # set by torchrun for every worker
             "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE",
             "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
             "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING"]


def test_stray_knobs_unit(make_args):
    make_args(_tiny=False)
    known = dict(tg.CONFIG)
    assert "NUM_LAYERS" in known and "STRICT_ENV" in known and "RESUME_LOG" in known
    assert tg.stray_knobs({k: "1" for k in KNOWN_ENV}, known) == []
    assert tg.stray_knobs({k: "1" for k in known}, known) == [], "the script's own knobs are not stray"
    env = {"NUM_LAYER": "3", "LATE_QAT": "1", "TTT_ENABLE": "0", "MATRIX_LRR": "0.1", "num_layer": "3",
           "WARMUP": "5", "PATH": "/bin"}
    assert tg.stray_knobs(env, known) == ["LATE_QAT", "MATRIX_LRR (did you mean MATRIX_LR?)",
                                          "NUM_LAYER (did you mean NUM_LAYERS?)", "TTT_ENABLE (did you mean TTT_ENABLED?)",
                                          "WARMUP"]


def _no_stray_env(monkeypatch, make_args):
    """Remove knob-like variables of the caller's shell, so the assertions see only the test's own."""
    make_args()  # fills tg.CONFIG
    for name in tg.stray_knobs(os.environ, tg.CONFIG):
        monkeypatch.delenv(name.split(" ")[0])


def test_stray_knobs_are_warned_about(make_args, monkeypatch):
    _no_stray_env(monkeypatch, make_args)
    a = make_args()
    lines = []
    tg.start_run(a, H.DistStub(), lines.append)
    assert not [ln for ln in lines if ln.startswith("warning:")]
    monkeypatch.setenv("NUM_LAYER", "3")
    monkeypatch.setenv("LATE_QAT", "1")
    lines = []
    tg.start_run(a, H.DistStub(), lines.append)
    assert [ln for ln in lines if ln.startswith("warning:")] == [
        "warning: environment variable LATE_QAT looks like a knob but this script does not read it",
        "warning: environment variable NUM_LAYER (did you mean NUM_LAYERS?) looks like a knob but this script "
        "does not read it"]
    a = make_args(STRICT_ENV="1")
    with pytest.raises(SystemExit) as ei:
        tg.start_run(a, H.DistStub(), lambda msg: None)
    assert str(ei.value) == ("error: STRICT_ENV=1 and the environment sets unknown knobs: LATE_QAT, NUM_LAYER "
                             "(did you mean NUM_LAYERS?)")


def test_a_size_limit_the_code_fills_stops_the_run_at_start(make_args, monkeypatch):
    _no_stray_env(monkeypatch, make_args)
    code = len(tg.code_info()[1])
    with pytest.raises(SystemExit, match=f"SIZE_LIMIT={code} leaves no bytes for a model: the code alone counts"):
        tg.start_run(make_args(SIZE_LIMIT=str(code)), H.DistStub(), lambda msg: None)
    tg.start_run(make_args(SIZE_LIMIT=str(code), EVAL_ONLY_PATH="x.ptz"), H.DistStub(), lambda msg: None)  # no export
    tg.start_run(make_args(SIZE_LIMIT=str(code + 1)), H.DistStub(), lambda msg: None)


def test_strict_env_stops_the_run_at_start(tmp_path, tiny_data, monkeypatch, make_args):
    _no_stray_env(monkeypatch, make_args)
    run = cli(tmp_path / "run", "strict", tiny_data, STRICT_ENV=1, NUM_LAYER=3, LATE_QAT=1)
    assert_stopped_before_training(run, "STRICT_ENV=1", "LATE_QAT", "NUM_LAYER (did you mean NUM_LAYERS?)",
                                   phase="setup")
    warnings = [ln for ln in run.log.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and "NUM_LAYER (did you mean NUM_LAYERS?)" in warnings[1]
    assert "preflight" not in run.log


@pytest.mark.parametrize("name, value, needle", [
    ("MAX_WALLCLOCK_SECONDS", "-5", "MAX_WALLCLOCK_SECONDS must be >= 0"),
    ("ITERATIONS", "-1", "ITERATIONS must be >= 0"),
    ("SEED", "-1", "SEED must be in [0, 2**32)"),
    ("SEED", "4294967296", "SEED must be in [0, 2**32)"),
])
def test_out_of_range_knobs_are_rejected(make_args, name, value, needle):
    with pytest.raises(SystemExit) as ei:
        make_args(**{name: value})
    assert str(ei.value) == f"error: {needle}" or str(ei.value).startswith(f"error: {needle} ")


def test_range_limits_are_inclusive(make_args):
    a = make_args(SEED="4294967295", ITERATIONS="0", MAX_WALLCLOCK_SECONDS="0")
    assert a.seed == 2**32 - 1 and a.iterations == 0 and a.max_wallclock_seconds == 0
    assert make_args(SEED="0").seed == 0


# ----------------------------------------------------------------------------- 5. one run, one log, one artifact


def test_same_run_id_is_refused_and_resume_log_appends(tmp_path, tiny_data):
    cwd = tmp_path / "run"
    first = cli(cwd, "dup", tiny_data, ITERATIONS=2)
    assert first.rc == 0, first.describe()
    before = first.log_path.read_bytes()
    art = first.artifact.read_bytes()
    again = cli(cwd, "dup", tiny_data, ITERATIONS=2)
    assert again.rc == 1, again.describe()
    assert first.log_path.read_bytes() == before, "the first run's log must stay byte for byte"
    assert first.artifact.read_bytes() == art
    refusal = (f"error: log logs/dup.txt already exists (a run with RUN_ID=dup ran before); choose another RUN_ID, "
               f"delete the file, or set RESUME_LOG=1 to append")
    assert refusal in again.err and again.out == ""
    failed = cwd / "logs" / f"dup.failed-{again.pid}.txt"
    assert failed.read_text() == f"run_stopped phase:setup step:0\n{refusal}\n"
    assert sorted(p.name for p in (cwd / "logs").iterdir()) == sorted(["dup.txt", failed.name])
    resumed = cli(cwd, "dup", tiny_data, ITERATIONS=2, RESUME_LOG=1)
    assert resumed.rc == 0, resumed.describe()
    log = resumed.log_path.read_bytes()
    assert log.startswith(before) and len(log) > len(before)
    assert log[len(before):].decode().startswith("logs/dup.txt\n")
    assert sorted(p.name for p in cwd.iterdir()) == ["dup.int6.ptz", "dup.pt", "logs"], "no lock or temporary file left"


def test_locked_artifact_path_is_refused_at_start(tmp_path, tiny_data):
    cwd = tmp_path / "run"
    cwd.mkdir()
    artifact = cwd / "locked.int6.ptz"
    with open(f"{artifact}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = cli(cwd, "locked", tiny_data)
        assert Path(f"{artifact}.lock").exists(), "the refused run must not remove another run's lock"
    assert_stopped_before_training(run, f"ARTIFACT_PATH={artifact} is in use by another run")
    # released: the same path is free again
    lock = tg.lock_artifact(str(artifact))
    with pytest.raises(SystemExit, match="in use by another run"):
        tg.lock_artifact(str(artifact))
    lock.close()
    tg.lock_artifact(str(artifact)).close()


def test_load_artifact_checks_the_expected_sha256(make_args, tmp_path):
    path = tmp_path / "model.ptz"
    blob, a = _tiny_artifact(make_args, path, seed=0)
    sha = hashlib.sha256(blob).hexdigest()
    arch, _ = tg.load_artifact(str(path), expected_sha256=sha)
    assert arch["num_layers"] == a.num_layers
    _tiny_artifact(make_args, path, seed=1)  # another valid artifact at the same path
    with pytest.raises(ValueError, match="SHA-256 differs") as ei:
        tg.load_artifact(str(path), expected_sha256=sha)
    assert str(path) in str(ei.value)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        tg.model_from_artifact(str(path), a, CPU, expected_sha256=sha)
    tg.load_artifact(str(path))  # without a pin, the new file loads


def test_final_evaluation_loads_only_the_artifact_it_wrote(make_args, tmp_path, tiny_data):
    path = tmp_path / "model.ptz"
    blob, _ = _tiny_artifact(make_args, path)
    a = make_args(DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(H.TOKENIZER), VAL_TOKENS="1024", EVAL_STRIDE="64",
                  TTT_ENABLED="0", EVAL_ONLY_PATH=str(path))
    val, luts = tg.load_eval_data(a, H.DistStub(), lambda msg: None)
    wrong = hashlib.sha256(blob + b"x").hexdigest()
    with pytest.raises(ValueError, match="SHA-256 differs"):
        tg.final_evaluation(a, H.DistStub(), lambda msg: None, val, luts, {"artifact_sha256": wrong})
    assert tg.PROGRESS["phase"] == "evaluate"
    logs = []
    assert tg.final_evaluation(a, H.DistStub(), logs.append, val, luts,
                               {"artifact_sha256": hashlib.sha256(blob).hexdigest()}) == 0
    assert any(ln.startswith("final_int6_roundtrip_exact ") for ln in logs)


# ----------------------------------------------------------------------------- 6. artifact integrity


def test_artifact_is_pgolf6_with_a_trailing_sha256(make_args, tmp_path):
    blob, _ = _tiny_artifact(make_args, tmp_path / "m.ptz")
    assert tg.ARTIFACT_MAGIC == b"PGOLF6" and blob.startswith(b"PGOLF6lzma")
    assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()


@pytest.mark.parametrize("key, old, new", [("xsa_last_n", b'"xsa_last_n": 1', b'"xsa_last_n": 2'),
                                          ("num_layers", b'"num_layers": 3', b'"num_layers": 4')])
def test_changed_header_digit_fails_the_checksum(make_args, tmp_path, key, old, new):
    path = tmp_path / "m.ptz"
    blob, _ = _tiny_artifact(make_args, path)
    assert blob.count(old) == 1
    path.write_bytes(blob.replace(old, new))
    with pytest.raises(ValueError) as ei:
        tg.load_artifact(str(path))
    assert str(ei.value) == f"artifact {path} is corrupted: its checksum does not match its contents"


@pytest.mark.parametrize("older", [b"PGOLF2", b"PGOLF4", b"PGOLF5"])
def test_older_artifact_formats_are_named(make_args, tmp_path, older):
    path = tmp_path / "m.ptz"
    blob, _ = _tiny_artifact(make_args, path)
    path.write_bytes(older + blob[6:])  # PGOLF2: no checksum, no byte planes; PGOLF4: banks in the chunks; PGOLF5: fp16 steps
    with pytest.raises(ValueError) as ei:
        tg.load_artifact(str(path))
    msg = str(ei.value)
    assert str(path) in msg and older.decode() in msg and "(older) train_gpt.py" in msg and "PGOLF6" in msg


@pytest.mark.parametrize("fail", ["replace", "write"])
def test_write_atomic_leaves_no_temporary_file_on_failure(monkeypatch, tmp_path, fail):
    path = tmp_path / "a.ptz"
    path.write_bytes(b"previous")
    if fail == "replace":
        def boom(src, dst):
            raise OSError("simulated replace failure")
        monkeypatch.setattr(tg.os, "replace", boom)
        with pytest.raises(OSError, match="simulated"):
            tg.write_atomic(str(path), b"new contents")
    else:
        with pytest.raises(TypeError):
            tg.write_atomic(str(path), "not bytes")  # the write itself fails
    assert os.listdir(tmp_path) == ["a.ptz"] and path.read_bytes() == b"previous"


@pytest.mark.parametrize("name, ignored", [
    ("final_model.int6.ptz.tmp12345", True), ("records/x/model_seed1.ptz.tmp7", True),
    ("final_model.int6.ptz.lock", True), ("records/x/final_model_seed42.int6.ptz.lock", True),
    ("notes.tmpl", False), ("train_gpt.py", False),
])
def test_gitignore_covers_temporary_and_lock_files(name, ignored):
    p = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=H.REPO)
    assert p.returncode == (0 if ignored else 1), name


# ----------------------------------------------------------------------------- 7. eval-only honesty


def test_model_from_artifact_logs_the_architecture_it_overrides(make_args, tmp_path):
    path = tmp_path / "m.ptz"
    _, a = _tiny_artifact(make_args, path)
    b = make_args(NUM_LAYERS="11", XSA_LAST_N="2")
    logs = []
    tg.model_from_artifact(str(path), b, CPU, logs.append)
    assert len(logs) == 3 and re.fullmatch(r"artifact_decode: time:\d+\.\ds", logs[0])
    assert logs[1].startswith("artifact_arch: VOCAB_SIZE=1024 NUM_LAYERS=3 MODEL_DIM=64 ")
    assert logs[1].count("=") == len(tg.ARCH_KEYS)
    assert logs[2] == "artifact_arch overrides: NUM_LAYERS=3 (environment/recipe: 11), XSA_LAST_N=1 (environment/recipe: 2)"
    assert b.num_layers == 3 and b.xsa_last_n == 1
    logs = []
    tg.model_from_artifact(str(path), make_args(), CPU, logs.append)
    assert logs[2] == "artifact_arch overrides: none"


@pytest.mark.tg_runs("smoke", "eval_l11")
def test_eval_only_logs_the_artifact_architecture(tg_runs):
    run = tg_runs("eval_l11")
    assert run.rc == 0, run.describe()
    log = run.log
    assert "config NUM_LAYERS=11" in log.splitlines()
    arch = H.line_value(log, r"^artifact_arch: (.*)$").split()
    assert "NUM_LAYERS=3" in arch and "XSA_LAST_N=1" in arch
    assert ("artifact_arch overrides: NUM_LAYERS=3 (environment/recipe: 11), XSA_LAST_N=1 (environment/recipe: 2)"
            in log.splitlines())
    # the artifact's architecture is the one evaluated: the smoke run's own round-trip score
    assert H.exact(log, "final_int6_roundtrip_exact") == H.exact(tg_runs("smoke").log, "final_int6_roundtrip_exact")


# ----------------------------------------------------------------------------- 8. a parameter with no gradient

@pytest.mark.tg_runs("l1_2p")
def test_two_process_run_with_a_parameter_that_gets_no_gradient(tg_runs):
    run = tg_runs("l1_2p")
    assert run.rc == 0, run.describe()
    log = run.log
    assert "world_size:2 grad_accum_steps:4" in log.splitlines() and re.search(r"^step:3/3 train_loss:", log, re.M)
    assert "final_int6_roundtrip_exact" in log


def test_one_layer_model_round_trips_through_the_artifact(make_args, tmp_path):
    """NUM_LAYERS=1: skip_weights is an empty [0, d] tensor; the artifact must still load (the 2-process run
    above reaches its final evaluation only if it does)."""
    a = make_args(NUM_LAYERS="1", VE_LAYERS="0")
    torch.manual_seed(0)
    m = H.randomize(tg.GPT(a), std=0.05)
    assert m.skip_weights.shape == (0, a.model_dim)
    arch = {k: getattr(a, k) for k in tg.ARCH_KEYS}
    for compressor in ("zstd", "lzma"):
        path = tmp_path / f"l1.{compressor}.ptz"
        blob = tg.pack_artifact(tg.quantize_state(m.state_dict(), a), arch, compressor)
        tg.write_atomic(str(path), blob)
        _, state = tg.load_artifact(str(path))
        assert state["skip_weights"].shape == (0, a.model_dim)
        loaded = tg.model_from_artifact(str(path), make_args(), CPU)
        assert len(loaded.blocks) == 1 and loaded.skip_weights.shape == (0, a.model_dim)



def test_tokenizer_and_short_val_split_stop_in_preflight_and_allow_the_retry(tmp_path, own_data):
    """A missing tokenizer or a validation split shorter than one sequence is found by the preflight (before its
    `ok` line), so the log does not block a retry with the same RUN_ID."""
    run = cli(tmp_path / "run", "retry", own_data, TOKENIZER_PATH=tmp_path / "missing.model")
    assert_stopped_before_training(run, "missing.model", "TOKENIZER_PATH")
    assert "preflight: ok" not in run.log
    H.write_shard(own_data / "fineweb_val_000000.bin", np.arange(40))
    run = cli(tmp_path / "run", "retry", own_data)
    assert "already exists" not in run.err
    assert_stopped_before_training(run, "the validation split", "fewer than one sequence of 64")
    assert "preflight: ok" not in run.log and "missing.model" not in run.log, "the first attempt's log is replaced"


def test_a_config_error_log_does_not_block_the_retry(tmp_path, monkeypatch):
    """A run stopped by a bad knob leaves logs/<RUN_ID>.txt; fixing the knob and rerunning with the same RUN_ID
    replaces that record instead of being refused (a log of a run that did start is still protected)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    failed = tmp_path / "logs" / "r.txt"
    failed.write_text("run_stopped phase:setup step:0\nerror: NUM_LAYERS must be >= 1\n")
    log = tg.Logger()
    log.open("r", resume=False)
    log("fresh")
    assert failed.read_text() == "fresh\n"
    with pytest.raises(SystemExit, match="already exists"):
        tg.Logger().open("r", resume=False)
    opened = "logs/r.txt\ncode_sha256:0 code_bytes:1\n"  # stopped after the log opened, before or after preflight
    failed.write_text(opened + "run_stopped phase:preflight step:0\nerror: EVAL_ONLY_PATH=x is not a file\n")
    tg.Logger().open("r", resume=False)
    assert not failed.exists()
    failed.write_text(opened + "preflight: ok shards:2\nrun_stopped phase:train step:7\nerror: boom\n")
    with pytest.raises(SystemExit, match="already exists"):
        tg.Logger().open("r", resume=False)


def test_every_rank_names_its_log_by_rank_0s_run_id(in_process, monkeypatch, tmp_path):
    """RUN_ID unset: each rank draws its own id, so main names the log by rank 0's (Dist.share), as every rank's
    crash log beside it."""
    in_process(RUN_ID="mine", EVAL_ONLY_PATH="missing.ptz")

    class Rank0Id(H.DistStub):
        def share(self, obj):
            return "rank0"

    monkeypatch.setattr(tg, "Dist", Rank0Id)
    with pytest.raises(SystemExit, match="EVAL_ONLY_PATH=missing.ptz is not a file"):
        tg.main()
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["rank0.txt"]


def test_a_crash_on_another_rank_is_written_beside_the_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "3")
    log = tg.Logger(master=False)
    log.open("r", resume=False)
    log("rank 3 never writes the main log")
    log.fail(SystemExit("error: a stop every rank logs through rank 0"))
    assert not (tmp_path / "logs").exists()
    try:
        raise MemoryError("CUDA out of memory on rank 3")
    except MemoryError as e:
        log.fail(e)
    text = (tmp_path / "logs" / "r.rank3.txt").read_text()
    assert text.startswith("run_stopped phase:") and "error: MemoryError: CUDA out of memory on rank 3" in text
