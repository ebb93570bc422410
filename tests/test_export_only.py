"""The run's raw checkpoint and EXPORT_ONLY_FROM (re-export and evaluate a saved run without training), and the
code bytes the size check counts: the compact self-extracting copy that records/package.py ships."""
from __future__ import annotations

import hashlib
import lzma
import base64
import re
import subprocess
import sys

import pytest
import torch

import tg_helpers as H
import train_gpt as tg

sys.path.insert(0, str(H.REPO))
from records import package as pk  # noqa: E402


def test_checkpoint_path_sits_beside_the_artifact():
    assert tg.checkpoint_path("final_model.int6.ptz") == "final_model.pt"
    assert tg.checkpoint_path("runs/final_model_seed42.int6.ptz") == "runs/final_model_seed42.pt"
    assert tg.checkpoint_path("out/model.ptz") == "out/model.pt"
    assert tg.checkpoint_path("artifact.bin") == "artifact.bin.pt"


@pytest.mark.tg_runs("smoke")
def test_run_saves_its_export_weights_unquantized(tg_runs):
    run = tg_runs("smoke")
    assert run.rc == 0, run.describe()
    path = tg.checkpoint_path(str(run.artifact))
    saved = torch.load(path, map_location="cpu")
    assert saved["arch"]["num_layers"] == 3 and set(saved["arch"]) == set(tg.ARCH_KEYS)
    assert saved["calib_batches"] is None  # no GPTQ in this run: a GPTQ re-export uses GPTQ_CALIB_BATCHES
    assert any(re.fullmatch(rf"checkpoint:{re.escape(path)} bytes:\d+ .*", ln) for ln in run.log.splitlines())
    # the exported weights are the checkpoint's, quantized: the round-trip stays within int6 error of them
    _, state = tg.load_artifact(str(run.artifact))
    for name, w in saved["state"].items():
        assert state[name].shape == w.shape
        assert (state[name] - w.float()).abs().max() <= 0.05 * w.float().abs().max() + 1e-3, name


@pytest.mark.tg_runs("smoke", "export_only")
def test_export_only_reproduces_the_runs_export_and_evaluation(tg_runs):
    base, again = tg_runs("smoke"), tg_runs("export_only")
    assert again.rc == 0, again.describe()
    log = again.log
    assert "train_loss" not in log and "warmup_step" not in log, "EXPORT_ONLY_FROM trains nothing"
    assert "checkpoint_arch overrides: NUM_LAYERS=3 (environment/recipe: 5)" in log
    assert H.exact(log, "DIAGNOSTIC post_checkpoint_exact") == H.exact(base.log, "DIAGNOSTIC post_ema_exact")
    assert again.artifact.read_bytes() == base.artifact.read_bytes(), "same weights, same artifact bytes"
    assert H.exact(log, "final_int6_roundtrip_exact") == H.exact(base.log, "final_int6_roundtrip_exact")
    assert H.exact(log, "final_int6_sliding_window_exact") == H.exact(base.log, "final_int6_sliding_window_exact")


def test_compact_code_is_deterministic_and_runs_the_same_source():
    src = H.TRAIN_GPT.read_bytes()
    a, b = tg.compact_code(src), tg.compact_code(src)
    assert a == b and a.startswith(tg.COMPACT_HEAD) and a.endswith(tg.COMPACT_TAIL)
    assert len(a) < len(src) / 2
    payload = a[len(tg.COMPACT_HEAD):-len(tg.COMPACT_TAIL)]
    assert lzma.decompress(base64.b85decode(payload)) == tg.strip_source(src)
    assert tg.compact_code(a) == a, "a compact file is its own counted copy"
    assert pk.make_compact(src) == a, "the packager ships exactly what the run counts"


STRIP_CASES = '''"""Module doc."""
import math  # a comment


class Empty:
    """Only a docstring: the body becomes pass."""


def f(x):  # comment after code
    """Doc
    on two lines."""
    s = """keep   
# not a comment

    blank line above and trailing blanks kept"""
    t = "# not a comment either"
    return (x +  # inside brackets
            1), s, t


def g(): """one-line def: the docstring shares the def's line"""; return math.pi
'''


def test_strip_source_keeps_the_program_and_drops_comments_docstrings_blank_lines():
    out = tg.strip_source(STRIP_CASES.encode()).decode()
    assert pk.program(out) == pk.program(STRIP_CASES)
    assert "comment after" not in out and "inside brackets" not in out and "Module doc" not in out
    assert "on two lines" not in out and "class Empty:\n    pass\n" in out
    a, b = {}, {}
    exec(compile(STRIP_CASES, "a", "exec"), a), exec(compile(out, "b", "exec"), b)
    assert a["f"](1) == b["f"](1) and b["f"](1)[1].count("\n") == 3 and a["g"]() == b["g"]()
    assert out.count("\n\n") == 1, "the only blank line left is the string's"
    edges = "x = 1 \\\n# a comment line after a backslash\ny = 2\nclass T:\n\tdef f(self):\n\t\t'doc'\n"
    out = tg.strip_source(edges.encode()).decode()
    assert pk.program(out) == pk.program(edges) and "\t\tpass" in out and "comment" not in out
    src = H.TRAIN_GPT.read_bytes()
    stripped = tg.strip_source(src)
    assert pk.program(stripped) == pk.program(src), "the run's program"
    assert len(stripped) < 0.85 * len(src) and tg.strip_source(stripped) == stripped


def test_compact_copy_serves_its_source_to_inspect_and_triton(tmp_path):
    """Triton's @jit reads a kernel's source with inspect, which exec'd code has only through linecache."""
    path = tmp_path / "train_gpt.py"
    path.write_bytes(tg.compact_code(H.TRAIN_GPT.read_bytes()))
    probe = ("import inspect, runpy, sys; g = runpy.run_path(sys.argv[1], run_name='probe'); "
             "print(inspect.getsource(g['compact_code']).splitlines()[0]); "
             "print(g['triton'] is None or 'def softcap_ce_kernel' in g['softcap_ce_kernel'].src)")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120,
                         env=H.clean_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["def compact_code(source: bytes) -> bytes:", "True"]


@pytest.mark.tg_runs("smoke")
def test_size_check_counts_the_compact_copy(tg_runs):
    log = tg_runs("smoke").log
    counted = len(tg.compact_code(H.TRAIN_GPT.read_bytes()))
    m = re.search(r"^code_sha256:([0-9a-f]{64}) code_bytes:(\d+) counted_code_bytes:(\d+) ", log, re.M)
    assert m and m[1] == hashlib.sha256(H.TRAIN_GPT.read_bytes()).hexdigest()
    assert int(m[2]) == len(H.TRAIN_GPT.read_bytes()) and int(m[3]) == counted
    assert int(H.line_value(log, r"^Code size: (\d+) bytes")) == counted
    model = int(H.line_value(log, r"^Serialized model int6\+\w+: (\d+) bytes"))
    assert int(H.line_value(log, r"^Total submission size int6\+\w+: (\d+) bytes")) == model + counted
