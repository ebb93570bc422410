"""Fixtures for the train_gpt.py test suite (CPU only).

- `make_args(**knobs)`: a tg.Hyperparameters for a tiny model, built from a clean environment.
- `sp1024`: the challenge's sp1024 tokenizer (tests/fixtures/fineweb_1024_bpe.model).
- `tiny_data`: a DATA_PATH with one train and one val shard of real text (pydoc topics), built once.
- `tg_runs`: end-to-end runs of train_gpt.py as subprocesses. A test lists the runs it reads with
  `@pytest.mark.tg_runs("name", ...)`; the first test that asks starts every run that the selected tests
  mark, two at a time, and each test waits only for its own.
"""
from __future__ import annotations

import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.dont_write_bytecode = True  # never leave __pycache__ next to train_gpt.py
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import tg_helpers as H  # noqa: E402
import train_gpt as tg  # noqa: E402,F401

# Short end-to-end configs shared by several tests (on top of H.TINY_RUN).
# EMA_DECAY=0 makes the exported "ema" weights the live ones, so DIAGNOSTIC post_ema_exact is an 8-decimal
# val loss of the final live weights.
ACC = dict(ITERATIONS=6, WARMUP_STEPS=0, TTT_ENABLED=0, VAL_LOSS_EVERY=3, EMA_DECAY=0)
SHORT = dict(WARMUP_STEPS=0, TTT_ENABLED=0, EVAL_STRIDE=64)

# A tiny frontier config (RECIPE=frontier on top of the r549 H.TINY_RUN): 6 layers, layers 2..3 looped twice from
# 30% of the run (step 2 of 6, after a warm-up that compiles both graphs), lanes from layer 4, shuffled loader,
# the recipe's EMA (with warm-up) exported. No role balance (the frontier_balance runs test it): 2 ranks measure
# its multipliers to 2 %, not bit-exactly, and the 1- and 2-process exports are compared.
FRONTIER_ACC = dict(RECIPE="frontier", ITERATIONS=6, WARMUP_STEPS=2, TTT_ENABLED=0, VAL_LOSS_EVERY=3, NUM_LAYERS=6,
                    LOOP_START=2, LOOP_END=3, PARALLEL_START=4, ENABLE_LOOPING_AT=0.3, VOCAB_SIZE=1024,
                    BIGRAM_VOCAB_SIZE=0, XSA_LAST_N=6, TRAIN_LOADER="shuffled", SDCLIP_BALANCE_BATCHES=0)

PHASED = {"EVAL_ONLY_PATH": "<smoke>", "TTT_MODE": "phased", "TTT_DOC_BATCH": 4, "TTT_LORA_CHUNK": 16,
          "TTT_LORA_RANK": 4, "TTT_LORA_LR": 0.01, "TTT_PREFIX_DOCS": 10, "TTT_PHASES": 2, "TTT_PHASE_LR": 0.01,
          "TTT_CHUNK_TOKENS": 256, "TTT_BATCH_SEQS": 16}  # every phase chunk is one SGD step on 1 or 2 ranks
RANK_FREE = {"TTT_WARM_START_A": 0}  # warm A is kept per rank: 2 ranks equal 1 without it

# name -> (overrides, nproc, run this first). Submitted in this order (slowest first). An override may be
# "<dep>" (the artifact path of the run it depends on) or a function of that run's RunResult.
RUN_SPECS: dict[str, tuple[dict, int, str | None]] = {
    "smoke": ({}, 1, None),
    "acc_2p": (ACC, 2, None),
    "acc_1p": (ACC, 1, None),
    # Parallel Muon: bank gradients reduce-scattered, each rank orthogonalizes half the matrices
    "acc_2p_sharded": (dict(ACC, MUON_SHARDED=1), 2, None),
    # 1 layer: no U-Net skip, so skip_weights is an empty [0, d] parameter that never gets a gradient
    "l1_2p": (dict(SHORT, ITERATIONS=3, VAL_LOSS_EVERY=0, NUM_LAYERS=1, VE_LAYERS="0", XSA_LAST_N=1), 2, None),
    "frontier_acc_2p": (FRONTIER_ACC, 2, None),
    "frontier_acc_1p": (FRONTIER_ACC, 1, None),
    "seed_again": (ACC, 1, None),
    "seed_other": (dict(ACC, SEED=2), 1, None),
    "smoke_eval_2p": ({"TTT_ENABLED": 0, "EVAL_ONLY_PATH": "<smoke>"}, 2, "smoke"),
    "smoke_eval": ({"TTT_ENABLED": 0, "EVAL_ONLY_PATH": "<smoke>"}, 1, "smoke"),
    # re-export the smoke run's saved checkpoint without training (NUM_LAYERS=5 must be overridden by it)
    "export_only": ({"TTT_ENABLED": 0, "NUM_LAYERS": 5, "EXPORT_ONLY_FROM": lambda dep: tg.checkpoint_path(str(dep.artifact))},
                    1, "smoke"),
    # the 3-layer smoke artifact evaluated under an environment that says 11 layers and XSA on the last 2
    "eval_l11": ({"TTT_ENABLED": 0, "EVAL_ONLY_PATH": "<smoke>", "NUM_LAYERS": 11, "XSA_LAST_N": 2}, 1, "smoke"),
    # TTT with 3 sequences per chunk: an uneven split over 2 ranks must still give the 1-process update
    "ttt_uneven_1p": ({"EVAL_ONLY_PATH": "<smoke>", "TTT_CHUNK_TOKENS": 192, "TTT_LR": 0.05}, 1, "smoke"),
    "ttt_uneven_2p": ({"EVAL_ONLY_PATH": "<smoke>", "TTT_CHUNK_TOKENS": 192, "TTT_LR": 0.05}, 2, "smoke"),
    # phased TTT of the smoke artifact: 2 ranks must give the 1-process scores (batches alternate between ranks)
    "phased_1p": (PHASED | RANK_FREE, 1, "smoke"),
    "phased_2p": (PHASED | RANK_FREE, 2, "smoke"),
    # a training run whose final evaluation is phased TTT, and an eval-only run of its artifact
    "phased_train": ({k: v for k, v in PHASED.items() if k != "EVAL_ONLY_PATH"}, 1, None),
    "phased_train_eval": (PHASED | {"EVAL_ONLY_PATH": "<phased_train>"}, 1, "phased_train"),
    # the live weights (EMA_DECAY=0) exported with lzma
    "exp_lzma": (dict(SHORT, ITERATIONS=5, WARMDOWN_ITERS=5, VAL_LOSS_EVERY=5, EMA_DECAY=0, COMPRESSOR="lzma"), 1,
                 None),
    # EMA_DECAY=1: only the warm-up decay (1+t)/(10+t) moves the EMA
    "exp_ema1": (dict(SHORT, ITERATIONS=4, VAL_LOSS_EVERY=2, EMA_DECAY=1), 1, None),
    # live weights, artifact over a cap 1000 bytes above the code's (size fitting cannot get there)
    "exp_over": (dict(SHORT, ITERATIONS=4, VAL_LOSS_EVERY=2, EMA_DECAY=0,
                      SIZE_LIMIT=len(tg.compact_code(H.TRAIN_GPT.read_bytes())) + 1000), 1, None),
    # acc_1p again with a cap 10% below its model size: SIZE_FIT must coarsen the int6 steps until it fits
    # re-export the tiny frontier run's checkpoint: GPTQ recalibrated on as many batches must give the same bytes
    "frontier_export_only": ({**FRONTIER_ACC, "EXPORT_ONLY_FROM": lambda dep: tg.checkpoint_path(str(dep.artifact))},
                             1, "frontier_acc_1p"),
    # per-role step multipliers measured in the calibration reserve, and a re-export that measures them again.
    # Without the document mask: with it, this tiny model's v role loses ~1e-6 to quantization, at the sign where
    # its multiplier jumps from 1 to 2, so 2 ranks' own batches cannot measure it to 2 %.
    "frontier_balance": (dict(FRONTIER_ACC, SDCLIP_BALANCE_BATCHES=2, DOC_MASK=0), 1, None),
    "frontier_balance_2p": (dict(FRONTIER_ACC, SDCLIP_BALANCE_BATCHES=2, DOC_MASK=0), 2, None),
    "frontier_balance_export_only": ({**FRONTIER_ACC, "SDCLIP_BALANCE_BATCHES": 2, "DOC_MASK": 0,
                                      "EXPORT_ONLY_FROM": lambda dep: tg.checkpoint_path(str(dep.artifact))},
                                     1, "frontier_balance"),
    # late QAT on the GPTQ export's grid (a fixed k multiplier and role multipliers), and a re-export of its
    # checkpoint without those knobs and with the role balance on, which must still keep QAT's multipliers
    "frontier_qat": (dict(FRONTIER_ACC, LATE_QAT_THRESHOLD=0.5, QAT_GRID_MULT=1.3, SDCLIP_ROLE_MULT="q=1.2,v=0.8",
                          SDCLIP_COLUMN_ROLES="none"), 1, None),
    "frontier_qat_export_only": ({**FRONTIER_ACC, "SDCLIP_BALANCE_BATCHES": 2,
                                  "EXPORT_ONLY_FROM": lambda dep: tg.checkpoint_path(str(dep.artifact))},
                                 1, "frontier_qat"),
    "fit": (dict(ACC, SIZE_LIMIT=lambda dep: len(tg.compact_code(H.TRAIN_GPT.read_bytes())) + int(0.9 * dep.artifact.stat().st_size)),
            1, "acc_1p"),
}


@pytest.fixture(autouse=True)
def _process_state(monkeypatch):
    """tg.main() run in-process installs a SIGTERM handler and moves tg.PROGRESS: each test starts from a fresh
    PROGRESS and gets the pytest process's SIGTERM handler back afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(tg, "PROGRESS", {"phase": "setup", "step": 0}, raising=False)
    yield
    signal.signal(signal.SIGTERM, handler)


def pytest_configure(config):
    config.addinivalue_line("markers", "tg_runs(*names): end-to-end train_gpt.py runs the test reads")


@pytest.fixture
def make_args(monkeypatch):
    """Build tg.Hyperparameters for a tiny model (or, with _tiny=False, the script defaults); keyword
    overrides are environment knobs."""

    def make(_tiny=True, **knobs):
        for k in list(H.KNOBS) + list(H.DIST_VARS):
            monkeypatch.delenv(k, raising=False)
        env = dict(H.TINY_MODEL) if _tiny else {}
        env.update({k: str(v) for k, v in knobs.items()})
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return tg.Hyperparameters()

    return make


@pytest.fixture(scope="session")
def sp1024():
    import sentencepiece as spm
    assert H.TOKENIZER.is_file(), f"missing fixture {H.TOKENIZER}"
    return spm.SentencePieceProcessor(model_file=str(H.TOKENIZER))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, sp1024):
    """DATA_PATH with fineweb_train_000000.bin (7/8 of the pydoc pages) and fineweb_val_000000.bin (1/8)."""
    d = tmp_path_factory.mktemp("tiny_data") / "fineweb10B_sp1024"
    docs = H.pydoc_docs()
    H.write_shard(d / "fineweb_train_000000.bin", H.encode_stream(sp1024, [t for i, t in enumerate(docs) if i % 8]))
    H.write_shard(d / "fineweb_val_000000.bin", H.encode_stream(sp1024, docs[::8]))
    return d


class RunPool:
    def __init__(self, base: Path, data: Path, names):
        self.base, self.data = base, data
        self.ex = ThreadPoolExecutor(max_workers=2)
        self.futures = {}
        for name in RUN_SPECS:  # fixed submission order
            if name in names:
                self._submit(name)

    def _submit(self, name):
        if name in self.futures:
            return
        if name not in RUN_SPECS:
            raise KeyError(f"unknown run {name!r}")
        after = RUN_SPECS[name][2]
        if after:
            self._submit(after)  # submitted earlier, so started no later (FIFO): waiting on it cannot deadlock
        self.futures[name] = self.ex.submit(self._job, name)

    def _job(self, name):
        overrides, nproc, after = RUN_SPECS[name]
        overrides = dict(overrides)
        if after:
            dep = self.futures[after].result()
            assert dep.rc == 0, dep.describe()
            for k, v in overrides.items():
                if v == f"<{after}>":
                    overrides[k] = str(dep.artifact)
                elif callable(v):
                    overrides[k] = v(dep)
        overrides.update(DATA_PATH=str(self.data), TOKENIZER_PATH=str(H.TOKENIZER))
        return H.run_train(name, self.base / name, overrides, nproc=nproc)

    def __call__(self, name):
        self._submit(name)
        return self.futures[name].result()

    def close(self):
        self.ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def tg_runs(request, tmp_path_factory, tiny_data):
    names = set()
    for item in request.session.items:
        for mark in item.iter_markers("tg_runs"):
            names.update(mark.args)
    pool = RunPool(tmp_path_factory.mktemp("runs"), tiny_data, names)
    yield pool
    pool.close()
