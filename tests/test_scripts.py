"""Tests of the helper scripts in scripts/: size_probe.py on a real chunked artifact, gpu_smoke.sh's checks."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
SIZE_PROBE = REPO / "scripts" / "size_probe.py"


def _run(*args, **env):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **env)  # no __pycache__ next to train_gpt.py
    return subprocess.run([*args], capture_output=True, text=True, timeout=120, env=env)


def test_size_probe_help_prints_usage():
    r = _run(sys.executable, str(SIZE_PROBE), "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: size_probe.py") and "artifact" in r.stdout


def test_size_probe_reads_a_chunked_artifact(tmp_path, make_args):
    torch.manual_seed(0)
    # > 2 MiB of table codes, so the artifact has several independently compressed chunks (and the bank's rANS)
    state = {"blocks.mlp_up_bank": torch.randn(6, 512, 768), "tok_emb.weight": torch.randn(4096, 640),
             "final_norm.weight": torch.randn(640)}
    blob = tg.pack_artifact(tg.quantize_state(state, make_args()), {"num_layers": 3}, "zstd")
    art = tmp_path / "final_model.int6.ptz"
    art.write_bytes(blob)
    (hlen,) = struct.unpack("<I", blob[10:14])
    assert blob.startswith(tg.ARTIFACT_MAGIC) and len(json.loads(blob[14:14 + hlen])["chunks"]) >= 2
    r = _run(sys.executable, str(SIZE_PROBE), str(art), "--no-recompress")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    codes = {"blocks.mlp_up_bank.q", "tok_emb.weight.q", "blocks.mlp_up_bank.qscale", "tok_emb.weight.qscale"}
    assert {ln.split()[0] for ln in lines[:4]} == codes, lines[:4]  # weights' codes and row steps' log codes
    assert f"artifact {len(blob) / 1e6:.3f} MB" in r.stdout and "matrix step x1.5" in r.stdout
    sys.path.insert(0, str(SIZE_PROBE.parent))
    import size_probe
    codes = size_probe.load_codes(str(art))
    assert codes["blocks.mlp_up_bank.q"].dtype == torch.int8 and codes["blocks.mlp_up_bank.q"].shape == (6, 512, 768)
    assert codes["blocks.mlp_up_bank.q"].abs().max() <= 31
    # a file that is not an artifact: one error line, no traceback
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(b"not an artifact")
    r = _run(sys.executable, str(SIZE_PROBE), str(bad))
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_gpu_smoke_explains_missing_data(tmp_path):
    r = _run("bash", str(REPO / "scripts" / "gpu_smoke.sh"), "train", OUT=str(tmp_path),
             DATA_PATH=str(tmp_path / "nowhere" / "fineweb10B_sp1024"))
    assert r.returncode == 1 and "nvidia-smi" not in r.stderr
    assert f"DATA_PATH={tmp_path / 'nowhere' / 'fineweb10B_sp1024'}" in r.stderr
    assert "python3 data/cached_challenge_fineweb.py --variant sp1024" in r.stderr
    assert "python3 data/build_shards.py" in r.stderr


@pytest.mark.tg_runs("frontier_acc_1p")
def test_export_table_compares_methods_on_a_saved_checkpoint(tg_runs, tmp_path):
    """scripts/export_table.py on the tiny frontier run's checkpoint: one row per method, every fitted
    artifact within the budget the run had, and the GPTQ row's bytes equal to the run's own export."""
    run = tg_runs("frontier_acc_1p")
    assert run.rc == 0, run.describe()
    env = {k: v for k, v in run.env.items() if k not in ("RUN_ID", "ARTIFACT_PATH")}
    out = tmp_path / "table.md"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "export_table.py"), tg.checkpoint_path(str(run.artifact)),
                        "--only", "0", "2", "10", "--attribute", "2", "--balance", "3", "--freq-power", "0.3", "--column-roles", "o",
                        "--env", "GPTQ_SWEEPS=0", f"GPTQ_SWEEPS={tg.RECIPES['frontier']['GPTQ_SWEEPS']}", "--out", str(out)],
                       capture_output=True, text=True,
                       timeout=300,
                       env=dict(env, PYTHONDONTWRITEBYTECODE="1"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = out.read_text().splitlines()
    budget = int(table[0].split(": ")[1].split()[0])
    split = table.index("| part restored to the checkpoint | round-trip val_bpb | gap left | share of the gap |")
    parts = [ln.split(" | ")[0][2:] for ln in table[split + 2:]]
    knob = table[-1].split("SDCLIP_ROLE_MULT=")[1]
    assert parts[:8] == list(tg.ROLES) + ["fp16-stored tensors (norms, gains, gates)"]
    assert set(tg.role_pairs(knob)) <= set(tg.ROLES)
    table = table[:split]
    rows = [ln for ln in table if ln.startswith("| ") and not ln.startswith(("| export", "| unquantized"))]
    assert [ln.split(" | ")[0] for ln in rows] == ["| clip search + step fit (previous export)", "| GPTQ + SDClip fit",
                                                   "| GPTQ + SDClip fit, roles balanced on 4 training batches",
                                                   "| GPTQ + SDClip fit, roles balanced on 3 training batches",
                                                   "| GPTQ + SDClip fit, roles balanced on 4 training batches, "
                                                   "EMBED_FREQ_POWER=0.3",
                                                   "| GPTQ + SDClip fit, roles balanced on 4 training batches, "
                                                   "SDCLIP_COLUMN_ROLES=o",
                                                   "| as a run, GPTQ_SWEEPS=0", f"| as a run, GPTQ_SWEEPS={tg.RECIPES['frontier']['GPTQ_SWEEPS']}",
                                                   f"| GPTQ + SDClip fit, SDCLIP_ROLE_MULT={knob}"]
    sizes = [int(ln.split(" | ")[1]) for ln in rows]
    assert all(s <= budget for s in sizes)
    assert rows[4].split(" | ")[1:3] != rows[2].split(" | ")[1:3], "the power (0.3 against the recipe's 0.5) acts"
    assert rows[5].split(" | ")[1:3] != rows[2].split(" | ")[1:3], "o alone, not the recipe's o,embed, is exported"
    assert sizes[1] == run.artifact.stat().st_size, "same checkpoint, Hessians and knobs as the run's own export"
    assert rows[7].split(" | ")[1:3] == rows[1].split(" | ")[1:3], "--env with the run's knobs is the run's export"
    assert rows[6].split(" | ")[1:3] != rows[7].split(" | ")[1:3], "GPTQ_SWEEPS=0 reaches the export"


def export_table():
    sys.path.insert(0, str(REPO / "scripts"))
    import export_table as et
    return et


def test_export_table_env_variants_parse_set_and_restore_knobs(make_args, monkeypatch):
    et = export_table()
    make_args(_tiny=False, RECIPE="frontier")
    monkeypatch.setenv("GPTQ_SWEEPS", "2")
    run = et.knob_run("GPTQ_SWEEPS=0, SDCLIP_COLUMN_ROLES=o,embed,EMBED_FREQ_POWER=0.25")
    assert (run.gptq_sweeps, run.column_roles, run.embed_freq_power) == (0, ("o", "embed"), 0.25)
    assert os.environ["GPTQ_SWEEPS"] == "2" and "SDCLIP_COLUMN_ROLES" not in os.environ
    with pytest.raises(SystemExit, match="GPTQ_SWEEP is not a train_gpt.py knob"):
        et.knob_run("GPTQ_SWEEP=1")
    with pytest.raises(SystemExit, match="GPTQ_SWEEPS"):
        et.knob_run("GPTQ_SWEEPS=-1")  # checked as a run checks it, and the environment still restored
    assert os.environ["GPTQ_SWEEPS"] == "2"


def test_gap_attribution_restores_exactly_one_part_at_a_time():
    """With a 'loss' that is the summed error of every weight, restoring one part removes exactly that part's
    error: q and o are the two halves of qo_bank, k and v of kv_bank, and the shares add up to the whole gap."""
    import torch
    et, L = export_table(), 3
    original = {"qo_bank": torch.zeros(2 * L, 4, 4), "kv_bank": torch.zeros(2 * L, 2, 4),
                "mlp_up_bank": torch.zeros(L, 8, 4), "mlp_down_bank": torch.zeros(L, 4, 8),
                "tok_emb.weight": torch.zeros(16, 4), "blocks.0.attn_scale": torch.zeros(4)}
    errors = {"q": 1.0, "o": 2.0, "k": 3.0, "v": 4.0, "up": 5.0, "down": 6.0, "embed": 7.0}
    state = {n: t.clone() for n, t in original.items()}
    state["qo_bank"][:L] += 1.0 / state["qo_bank"][:L].numel()
    state["qo_bank"][L:] += 2.0 / state["qo_bank"][L:].numel()
    state["kv_bank"][:L] += 3.0 / state["kv_bank"][:L].numel()
    state["kv_bank"][L:] += 4.0 / state["kv_bank"][L:].numel()
    for n, e in (("mlp_up_bank", 5.0), ("mlp_down_bank", 6.0), ("tok_emb.weight", 7.0), ("blocks.0.attn_scale", 8.0)):
        state[n] += e / state[n].numel()

    class Model:
        def load_state_dict(self, s):
            self.s = s
    model = Model()
    measure = lambda: sum(float((model.s[n] - original[n]).abs().sum()) for n in original)
    gap = sum(errors.values()) + 8.0
    rows, gaps = et.attribution(state, original, model, measure, gap, 0.0)
    left = {r.split(" | ")[0][2:]: float(r.split(" | ")[1]) for r in rows[2:]}
    assert left == pytest.approx({**{k: gap - e for k, e in errors.items()}, et.FP16_PART: gap - 8.0})
    assert gaps == pytest.approx({**errors, et.FP16_PART: 8.0})
    assert state["qo_bank"].abs().sum() > 0, "the artifact's state is left as it was"


def test_muon_bench_times_both_gradient_paths_on_two_ranks():
    """scripts/muon_bench.py over 2 gloo ranks: both paths timed, and from the same weights and gradients they
    end on the same weights (fp32 collectives on CPU, so exactly)."""
    env = dict(os.environ, NUM_LAYERS="4", LOOP_START="1", LOOP_END="2", PARALLEL_START="3", MODEL_DIM="64",
               NUM_HEADS="2", NUM_KV_HEADS="1", VOCAB_SIZE="1024", BENCH_REPS="2", PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "scripts" / "muon_bench.py")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("muon_bench"))
    fields = dict(f.split(":") for f in line.split()[1:] if ":" in f)
    assert fields["world_size"] == "2" and float(fields["plain"]) > 0 and float(fields["sharded"]) > 0
    assert float(fields["max_weight_diff"]) == 0.0


def test_profile_step_sorts_kernels_into_categories():
    sys.path.insert(0, str(REPO / "scripts"))
    import profile_step as ps
    names = {"ncclDevKernel_ReduceScatter_Sum_bf16": "communication",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": "attention",
             "triton_tem_fused_flex_attention_0": "attention",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128": "GEMM",
             "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "GEMM",
             "triton_per_fused__to_copy_mul_rsqrt_0": "elementwise/reductions",
             "void at::native::vectorized_elementwise_kernel<4>": "elementwise/reductions",
             "leaky_mlp_kernel": "GEMM",  # the fused MLP's GEMM with its epilogue
             "softcap_ce_kernel": "elementwise/reductions",
             "mystery_kernel": "other"}
    assert {n: ps.category(n) for n in names} == names


def test_profile_ttt_times_the_chunk_steps_of_each_document_length():
    """scripts/profile_ttt.py runs the real phased-TTT scorer (score_doc_batch) on a tiny CPU model: one line of
    wall and device time per chunk step for every requested document length, and its categories."""
    import tg_helpers as H
    knobs = {**H.TINY_MODEL, "EVAL_SEQ_LEN": "64", "TTT_LORA_CHUNK": "16", "TTT_DOC_BATCH": "3", "COMPILE": "0"}
    r = _run(sys.executable, str(REPO / "scripts" / "profile_ttt.py"), "100", "30", **{k: str(v) for k, v in knobs.items()})
    assert r.returncode == 0, r.stderr[-2000:]
    steps = {ln.split()[1]: ln.split() for ln in r.stdout.splitlines() if ln.startswith("ttt_step ")}
    assert list(steps) == ["doc_len:100", "doc_len:30"]
    assert steps["doc_len:100"][2:4] == ["docs:3", "steps:7"] and steps["doc_len:30"][3] == "steps:2"
    assert all(float(f[4].split(":")[1]) > 0 and float(f[5].split(":")[1]) > 0 for f in steps.values())
    assert any(ln.startswith("ttt_step_ms doc_len:100 optimizer") for ln in r.stdout.splitlines())
