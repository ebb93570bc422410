"""The frontier recipe of train_gpt.py (RECIPE=frontier, the default): recipes and their resolution, depth
recurrence (layer schedule, the looping switch, no recompile after the warm-up), parallel residuals (two lanes,
GPT-J form), sigmoid-gated U-Net skips, SparseAttnGate, the input-dependent SmearGate, MuonEq-R and Polar Express,
the WARMDOWN_FRAC / MIN_LR schedule, the EMA warm-up, the shuffled loader, and a 2-process gloo run of a tiny
frontier config against 1 process with gradient accumulation."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tg_helpers as H
import train_gpt as tg

CPU = torch.device("cpu")

# The frontier stack as published (SP8192 with the training stack of the 2026-04-09 .. 2026-04-27 records).
# Written out here, not read from tg.RECIPES, so that an accidental edit of the recipe is caught.
FRONTIER = dict(
    DATA_PATH="./data/datasets/fineweb10B_sp8192", TOKENIZER_PATH="./data/tokenizers/fineweb_8192_bpe.model",
    VOCAB_SIZE=8192, MLP_MULT=4.0, XSA_LAST_N=11, QK_GAIN_INIT=5.25, ROPE_TRAIN_SEQ_LEN=2048, BIGRAM_VOCAB_SIZE=0,
    VE_ENABLED=False, SMEAR_GATE_DIMS=12, SKIP_GATES=True, ATTN_GATE_DIMS=12, ATTN_GATE_SCALE=0.5, NUM_LOOPS=2,
    LOOP_START=3, LOOP_END=5, ENABLE_LOOPING_AT=0.35, PARALLEL_START=8, TRAIN_LOADER="shuffled", MATRIX_LR=0.026,
    SCALAR_LR=0.02, TIED_EMBED_LR=0.03, MUON_MOMENTUM=0.97, MUON_WD=0.095, ADAM_WD=0.02, EMBED_WD=0.085,
    BETA2=0.99, MUON_ROW_NORM=True, MUON_NS="polar", WARMDOWN_FRAC=0.85, MIN_LR=0.10, EMA_DECAY=0.9965,
    LATE_QAT_THRESHOLD=0.0,
    DOC_MASK=True,  # the records' varlen attention: within BOS-to-BOS documents
    TTT_LR=0.005, TTT_MODE="phased", EVAL_STRIDE=2048,
    QUANT_METHOD="gptq", GPTQ_RESERVE_SECONDS=12.0,
    SDCLIP_BALANCE_BATCHES=4,  # ours, not the records': the export's per-role steps measured in the reserve
    EMBED_FREQ_POWER=0.5,  # ours: the tied embedding's row steps by token count
    SDCLIP_COLUMN_ROLES="o,embed",  # ours: per-input-column steps of the attention out and embedding matrices
    GPTQ_SWEEPS=1,  # ours: coordinate-descent passes over the codes after GPTQ
)

# A tiny frontier model for in-process tests (on top of H.TINY_MODEL): 6 layers, layers 2..3 looped, lanes from
# layer 4, every other frontier feature at its recipe value.
TINY_FRONTIER = dict(RECIPE="frontier", NUM_LAYERS="6", LOOP_START="2", LOOP_END="3", PARALLEL_START="4",
                     BIGRAM_VOCAB_SIZE="0", XSA_LAST_N="6", TTT_MODE="phased")

# Polar Express coefficients for 5 iterations, as published (modded-nanogpt; arXiv:2505.16932).
POLAR_PUBLISHED = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


randomize = H.randomize


def rand_ids(vocab, shape, seed=0):
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


def bank_slices(m, i):
    L = m.args.num_layers
    return {"q": m.qo_bank[i], "o": m.qo_bank[L + i], "k": m.kv_bank[i], "v": m.kv_bank[L + i],
            "up": m.mlp_up_bank[i], "down": m.mlp_down_bank[i]}


def block_inputs(m, T=12, B=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    d = m.args.model_dim
    x, x0, x2 = (torch.randn(B, T, d, generator=g) for _ in range(3))
    cos, sin = tg.rope_tables(T, m.rot_dims, m.args.rope_base, m.args.rope_train_seq_len, CPU)
    return x, x0, x2, cos, sin


# ----------------------------------------------------------------------------- recipes


def test_frontier_is_the_default_recipe(make_args):
    assert tg.DEFAULT_RECIPE == "frontier" and set(tg.RECIPES) == {"r549", "frontier"}
    a = make_args(_tiny=False)
    assert a.recipe == "frontier" and tg.CONFIG["RECIPE"] == "frontier"
    assert a.vocab_size == 8192 and a.num_loops == 2 and a.train_loader == "shuffled"


def test_frontier_recipe_resolves_to_its_documented_values(make_args):
    assert tg.RECIPES["frontier"] == FRONTIER
    a = make_args(_tiny=False, RECIPE="frontier")
    for key, value in FRONTIER.items():
        got = getattr(a, key.lower())
        assert got == value and type(got) is type(value), (key, got, value)
        assert tg.CONFIG[key] == value, key
    # the rest keeps the code defaults
    assert a.num_layers == 11 and a.model_dim == 512 and a.train_seq_len == 2048 and a.warmdown_iters == 3500


def test_r549_recipe_is_the_code_defaults_but_its_evaluation(make_args):
    """r549 is the record stack written in Hyperparameters, evaluated by phased TTT (better than the record's SGD
    TTT on the bench, two seeds) with no sliding-window phase; the record's evaluation is two knobs away."""
    assert tg.RECIPES["r549"] == dict(TTT_MODE="phased", EVAL_STRIDE=2048)
    a = make_args(_tiny=False, RECIPE="r549")
    assert a.ttt_enabled and a.ttt_mode == "phased" and a.eval_stride >= a.eval_seq_len
    record = make_args(_tiny=False, RECIPE="r549", TTT_MODE="sgd", EVAL_STRIDE="64")
    assert record.ttt_mode == "sgd" and record.eval_stride == 64
    assert a.recipe == "r549" and a.vocab_size == 1024 and a.mlp_mult == 3.0 and a.bigram_vocab_size == 1536
    assert a.num_loops == 0 and a.parallel_start == 0 and not a.skip_gates and a.smear_gate_dims == 0
    assert a.attn_gate_dims == 0 and a.train_loader == "sequential" and a.muon_ns == "standard"
    assert not a.muon_row_norm and a.warmdown_frac == 0.0 and a.min_lr == 0.0 and a.ema_decay == 0.997
    assert a.data_path == "./data/datasets/fineweb10B_sp1024"


def test_env_var_overrides_a_recipe_value(make_args):
    a = make_args(_tiny=False, RECIPE="frontier", VOCAB_SIZE="1024", NUM_LOOPS="0", MLP_MULT="3.5", SKIP_GATES="0",
                  MUON_NS="standard", DATA_PATH="/elsewhere")
    assert a.vocab_size == 1024 and a.num_loops == 0 and a.mlp_mult == 3.5 and a.skip_gates is False
    assert a.muon_ns == "standard" and a.data_path == "/elsewhere"
    assert a.attn_gate_dims == 12 and a.warmdown_frac == 0.85  # the others keep the recipe's values
    assert tg.CONFIG["VOCAB_SIZE"] == 1024 and tg.CONFIG["SKIP_GATES"] is False


def test_recipe_values_are_real_knobs_typed_like_the_code_defaults(make_args):
    make_args(_tiny=False, RECIPE="r549")
    defaults = dict(tg.CONFIG)  # every knob at its code default
    for name, recipe in tg.RECIPES.items():
        for key, value in recipe.items():
            assert key in defaults, f"recipe {name} sets {key}, which no knob reads"
            assert type(value) is type(defaults[key]), (name, key, value, defaults[key])
        make_args(_tiny=False, RECIPE=name)
        resolved = dict(tg.CONFIG)
        assert resolved.keys() == defaults.keys()
        for key in defaults:
            assert type(resolved[key]) is type(defaults[key]), (name, key)


def test_unknown_recipe_exits_naming_recipe(make_args):
    with pytest.raises(SystemExit) as ei:
        make_args(RECIPE="bogus")
    msg = str(ei.value)
    assert "RECIPE" in msg and "'bogus'" in msg and "frontier" in msg and "r549" in msg


def test_start_run_logs_recipe_and_every_config_value(make_args):
    a = make_args(**TINY_FRONTIER)
    lines = []
    tg.start_run(a, H.DistStub(), lines.append)
    assert "recipe:frontier" in lines
    for want in ("config RECIPE=frontier", "config NUM_LOOPS=2", "config NUM_LAYERS=6", "config MUON_NS=polar",
                 "config SKIP_GATES=True", "config WARMDOWN_FRAC=0.85", "config VE_LAYERS=1,2"):
        assert want in lines, want
    config = [line for line in lines if line.startswith("config ")]
    assert len(config) == len(tg.CONFIG) and {line.split()[1].split("=")[0] for line in config} == set(tg.CONFIG)


@pytest.mark.parametrize("knobs, needle", [
    (dict(TRAIN_LOADER="random"), "TRAIN_LOADER"),
    (dict(MUON_NS="cubic"), "MUON_NS"),
    (dict(MUON_NS="polar", MUON_BACKEND_STEPS="6"), "MUON_BACKEND_STEPS"),
    (dict(PARALLEL_MODE="both"), "PARALLEL_MODE"),
    (dict(WARMDOWN_FRAC="1.5"), "WARMDOWN_FRAC"),
    (dict(MIN_LR="-0.1"), "MIN_LR"),
    (dict(SMEAR_GATE_DIMS="65"), "SMEAR_GATE_DIMS"),
    (dict(ATTN_GATE_DIMS="65"), "ATTN_GATE_DIMS"),
    (dict(NUM_LOOPS="-1"), "NUM_LOOPS"),
    (dict(ENABLE_LOOPING_AT="1.5"), "ENABLE_LOOPING_AT"),
    (dict(NUM_LOOPS="1", LOOP_START="1", LOOP_END="3"), "LOOP_END"),
    (dict(NUM_LOOPS="1", LOOP_START="2", LOOP_END="1"), "LOOP_START"),
    (dict(PARALLEL_START="3"), "PARALLEL_START"),
    (dict(NUM_LAYERS="6", NUM_LOOPS="1", LOOP_START="2", LOOP_END="4", PARALLEL_START="3"), "PARALLEL_START"),
    (dict(TTT_DEADLINE_SECONDS="-1"), "TTT_DEADLINE_SECONDS"),
])
def test_invalid_frontier_knobs_are_rejected(make_args, knobs, needle):
    with pytest.raises(SystemExit) as ei:
        make_args(**knobs)
    assert needle in str(ei.value)


@pytest.mark.parametrize("start, mode", [("2", "lanes"), ("5", "lanes"), ("3", "gptj")])
def test_lanes_may_start_outside_the_loop(make_args, start, mode):
    # the lanes/loop rule rejects only a start strictly inside LOOP_START..LOOP_END; GPT-J blocks may loop
    a = make_args(NUM_LAYERS="6", NUM_LOOPS="1", LOOP_START="2", LOOP_END="4", PARALLEL_START=start,
                  PARALLEL_MODE=mode)
    m = randomize(tg.GPT(a))
    ids = rand_ids(a.vocab_size, (1, 8))
    with torch.no_grad():
        looped, plain = m.forward_logits(ids, looped=True), m.forward_logits(ids, looped=False)
    assert torch.isfinite(looped).all() and (looped - plain).abs().amax() > 1e-3


def test_frontier_default_parameter_count(make_args):
    a = make_args(_tiny=False)
    with torch.device("meta"):
        m = tg.GPT(a)
    # tok_emb 8192*512, smear 12+1, skip weights+gates 2*8*512, banks, per-block scalars 11*(4*512+8),
    # attention gates 11*8*12, lanes 3*(2+4)
    assert sum(p.numel() for p in m.parameters()) == 35_945_623
    assert H.param_count(a) == 35_945_623
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["skip_weights"] == shapes["skip_gates"] == (8, 512)
    assert shapes["mlp_up_bank"] == (11, 2048, 512) and shapes["blocks.0.attn_gate"] == (8, 12)
    assert shapes["smear.proj"] == (12,) and shapes["smear.lam"] == ()
    assert [i for i in range(11) if f"blocks.{i}.lane_post" in shapes] == [8, 9, 10]
    assert "bigram.embed.weight" not in shapes and "ve_shared.embed.weight" not in shapes


@pytest.mark.parametrize("knobs", [
    TINY_FRONTIER,
    dict(TINY_FRONTIER, PARALLEL_MODE="gptj", SMEAR_GATE_DIMS="0", NUM_LOOPS="1"),
    dict(NUM_LAYERS="5", SKIP_GATES="1", ATTN_GATE_DIMS="4", NUM_LOOPS="3", LOOP_START="0", LOOP_END="0"),
])
def test_tiny_frontier_parameter_count_formula(make_args, knobs):
    a = make_args(**knobs)
    assert sum(p.numel() for p in tg.GPT(a).parameters()) == H.param_count(a)

# ----------------------------------------------------------------------------- depth recurrence


@pytest.mark.parametrize("loops, start, end, enc, dec", [
    (2, 3, 5, [0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10]),
    (2, 4, 5, [0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10]),
    (0, 3, 5, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]),
])
def test_layer_schedule_matches_published_lists(make_args, loops, start, end, enc, dec):
    a = make_args(NUM_LAYERS="11", NUM_LOOPS=str(loops), LOOP_START=str(start), LOOP_END=str(end))
    assert tg.layer_schedule(a, True) == (enc, dec)
    assert tg.layer_schedule(a, False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])  # before the switch: plain


def _record_calls(model):
    calls = []  # (physical layer, input x, output) in call order
    handles = [b.register_forward_hook(lambda mod, args, out, i=i: calls.append((i, args[0].detach().clone(),
                                                                                     out.detach().clone())))
               for i, b in enumerate(model.blocks)]
    return calls, handles


@pytest.mark.parametrize("looped", [False, True])
def test_forward_runs_the_schedule_with_lifo_skips(make_args, looped):
    a = make_args(NUM_LAYERS="11", NUM_LOOPS="2", LOOP_START="3", LOOP_END="5", MODEL_DIM="32", VE_LAYERS="10")
    torch.manual_seed(0)
    m = randomize(tg.GPT(a))
    enc, dec = m.schedules[looped]
    assert (enc, dec) == tg.layer_schedule(a, looped)
    assert m.skip_weights.shape == (8, 32)  # sized by the looped encoder, the longer one
    calls, handles = _record_calls(m)
    with torch.no_grad():
        m.forward_logits(rand_ids(a.vocab_size, (1, 10)), looped=looped)
    for h in handles:
        h.remove()
    assert [c[0] for c in calls] == enc + dec
    E = len(enc)
    for pos in range(1, len(calls)):
        prev_out, x_in = calls[pos - 1][2], calls[pos][1]
        j = pos - E
        if 0 <= j < E:  # decoder position j gets encoder position E-1-j through skip weight j
            with torch.no_grad():
                expected = prev_out + m.skip_weights[j] * calls[E - 1 - j][2]
            torch.testing.assert_close(x_in, expected)
            assert (x_in - prev_out).abs().amax() > 1e-3
        else:
            assert torch.equal(x_in, prev_out), pos


def test_looped_flag_changes_the_forward_only_with_loops(make_args):
    ids = rand_ids(1024, (2, 16))
    for loops in ("0", "1"):
        a = make_args(NUM_LOOPS=loops, LOOP_START="1", LOOP_END="1")
        torch.manual_seed(0)
        m = randomize(tg.GPT(a))
        with torch.no_grad():
            plain, looped = m.forward_logits(ids, looped=False), m.forward_logits(ids, looped=True)
            default = m.forward_logits(ids)
        assert torch.equal(default, looped), "forward_logits loops by default"
        if loops == "0":
            assert torch.equal(plain, looped)
        else:
            assert (plain - looped).abs().amax() > 1e-3


@pytest.mark.parametrize("knobs, variants", [
    (dict(), [(False, False), (True, False)]),  # r549: late QAT only
    (dict(NUM_LOOPS="1", ENABLE_LOOPING_AT="0.35", LATE_QAT_THRESHOLD="0"), [(False, False), (False, True)]),
    (dict(NUM_LOOPS="1", ENABLE_LOOPING_AT="0"), [(False, True), (True, True)]),
    # late QAT may fire before or after the recurrence switches on: all four graphs are reachable
    (dict(NUM_LOOPS="1", ENABLE_LOOPING_AT="0.3"), [(False, False), (False, True), (True, False), (True, True)]),
    (dict(LATE_QAT_THRESHOLD="0"), [(False, False)]),
])
def test_graph_variants(make_args, knobs, variants):
    a = make_args(LOOP_START="1", LOOP_END="1", **knobs)
    tr = tg.Trainer(a, H.DistStub(), lambda msg: None, tg.GPT(a), [], 1)
    assert tr.graph_variants() == variants


@pytest.fixture
def train_shard(tmp_path):
    """One training shard of random tokens (token values are irrelevant to these schedule tests)."""
    toks = np.random.default_rng(0).integers(2, 1024, 20000)
    return [str(H.write_shard(tmp_path / "fineweb_train_000000.bin", toks))]


RUN_KNOBS = dict(TRAIN_BATCH_TOKENS="128", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0", VAL_LOSS_EVERY="0",
                 TRAIN_LOG_EVERY="0")


def _trainer(make_args, files, **knobs):
    a = make_args(**dict(RUN_KNOBS, **knobs))
    torch.manual_seed(0)
    model = tg.GPT(a)
    logs = []
    return tg.Trainer(a, H.DistStub(), logs.append, model, files, 1), logs


def _record_steps(trainer):
    """Wrap Trainer.step: record (qat, looped, [lr of every param group]) of each optimizer step."""
    seen, real = [], trainer.step

    def step(loader, qat, looped):
        seen.append((qat, looped, [g["lr"] for o in trainer.optimizers for g in o.param_groups]))
        return real(loader, qat, looped)

    trainer.step = step
    return seen


def test_no_recompile_after_warm_up(make_args, train_shard):
    """Warm-up compiles every graph the run reaches; the timed run then adds none (eager backend, CPU)."""
    from torch._dynamo.utils import counters
    tr, logs = _trainer(make_args, train_shard, ITERATIONS="10", NUM_LOOPS="1", LOOP_START="1", LOOP_END="1",
                        ENABLE_LOOPING_AT="0.3", LATE_QAT_THRESHOLD="0.3", WARMDOWN_FRAC="0.5", WARMUP_STEPS="3")
    variants = [(False, False), (False, True), (True, False), (True, True)]
    assert tr.graph_variants() == variants
    torch._dynamo.reset()
    counters.clear()
    try:
        tr.loss_fn = torch.compile(tr.model, backend="eager", fullgraph=True, dynamic=False)
        before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
        seen = _record_steps(tr)
        tr.warm_up()
        warm = counters["stats"]["unique_graphs"]
        assert warm == 4, "one graph per (qat, looped) variant"
        assert [s[:2] for s in seen] == variants, "WARMUP_STEPS=3 < 4 variants: warm-up still visits each"
        assert all(torch.equal(v, before[k]) for k, v in tr.model.state_dict().items()), "warm-up restores weights"
        seen.clear()
        tr.run(lambda looped: (0.0, 0.0), tg.WeightAverager(tr.params, tr.args, logs.append))
        assert counters["stats"]["unique_graphs"] == warm, "the timed run recompiled"
        # progress 0.3 at step 3 -> looping; warmdown (1 - s/10) / 0.5 < 0.3 from step 9 -> QAT
        assert [s[:2] for s in seen] == [(False, False)] * 3 + [(False, True)] * 6 + [(True, True)]
        assert any(line.startswith("looping:enabled step:3 layers:([0, 1], [1, 2])") for line in logs), logs
        assert "late_qat:enabled step:9 warmdown:0.2000" in logs
    finally:
        torch._dynamo.reset()

# ----------------------------------------------------------------------------- parallel residuals


def test_lanes_block_matches_hand_computation(make_args):
    m = randomize(tg.GPT(make_args(NUM_LAYERS="4", PARALLEL_START="2", VE_LAYERS="3")))
    x, x0, lm, cos, sin = block_inputs(m)
    seq, blk = m.blocks[1], m.blocks[2]
    assert seq.parallel is None and blk.parallel == "lanes"
    with torch.no_grad():
        # the helpers compose to the sequential block (verified against the spec in test_model.py)
        w1 = bank_slices(m, 1)
        xm = seq.mix(x, x0)
        mid = xm + seq.attn_out(xm, w1, None, cos, sin)
        torch.testing.assert_close(seq(x, x0, w1, None, cos, sin), mid + seq.mlp_out(mid, w1))
        # lanes: attention reads lane a, the MLP lane m; both outputs go to both lanes with learned weights
        w = bank_slices(m, 2)
        a = blk.attn_out(blk.mix(x, x0), w, None, cos, sin)
        mo = blk.mlp_out(blk.mix(lm, x0), w)
        r, P = blk.lane_resid, blk.lane_post
        want_a = r[0] * x + P[0, 0] * a + P[0, 1] * mo
        want_m = r[1] * lm + P[1, 0] * a + P[1, 1] * mo
        got_a, got_m = blk.forward_lanes(x, lm, x0, w, None, cos, sin)
    torch.testing.assert_close(got_a, want_a)
    torch.testing.assert_close(got_m, want_m)
    assert (got_a - got_m).abs().amax() > 1e-3


def test_lane_parameters_and_init(make_args):
    m = tg.GPT(make_args(NUM_LAYERS="5", PARALLEL_START="3", VE_LAYERS="4"))
    assert [b.parallel for b in m.blocks] == [None, None, None, "lanes", "lanes"]
    for b in m.blocks[3:]:
        assert torch.equal(b.lane_resid.detach(), torch.full((2,), 1.1))
        assert torch.equal(b.lane_post.detach(), torch.ones(2, 2))
    names = {k for k, _ in m.named_parameters()}
    assert not any(k.startswith(("blocks.0.lane", "blocks.1.lane", "blocks.2.lane")) for k in names)
    off = tg.GPT(make_args(NUM_LAYERS="5", PARALLEL_START="0", VE_LAYERS="4"))
    assert all(b.parallel is None for b in off.blocks) and not any("lane" in k for k, _ in off.named_parameters())
    gptj = tg.GPT(make_args(NUM_LAYERS="5", PARALLEL_START="3", PARALLEL_MODE="gptj", VE_LAYERS="4"))
    assert [b.parallel for b in gptj.blocks] == [None, None, None, "gptj", "gptj"]
    assert not any("lane" in k for k, _ in gptj.named_parameters())


def test_gptj_block_matches_hand_computation(make_args):
    m = randomize(tg.GPT(make_args(NUM_LAYERS="4", PARALLEL_START="2", PARALLEL_MODE="gptj", VE_LAYERS="3")))
    x, x0, _, cos, sin = block_inputs(m)
    blk, w = m.blocks[2], bank_slices(m, 2)
    with torch.no_grad():
        xm = blk.mix(x, x0)
        want = xm + blk.attn_out(xm, w, None, cos, sin) + blk.mlp_out(xm, w)  # both branches read x
        got = blk(x, x0, w, None, cos, sin)
        mid = xm + blk.attn_out(xm, w, None, cos, sin)
        sequential = mid + blk.mlp_out(mid, w)
    torch.testing.assert_close(got, want)
    assert (got - sequential).abs().amax() > 1e-3


def test_model_lanes_start_from_one_stream_and_end_in_their_mean(make_args):
    # 5 layers: encoder [0, 1], decoder [2, 3, 4]; lanes from layer 3, which gets the skip of layer 0
    a = make_args(NUM_LAYERS="5", PARALLEL_START="3", VE_LAYERS="4", SKIP_GATES="1")
    m = randomize(tg.GPT(a))
    calls = []
    for i in (3, 4):
        blk = m.blocks[i]

        def wrapped(la, lm, *rest, real=blk.forward_lanes, i=i):
            out = real(la, lm, *rest)
            calls.append((i, la.detach().clone(), lm.detach().clone(), out[0].detach().clone(),
                          out[1].detach().clone()))
            return out

        blk.forward_lanes = wrapped
    seq_calls, handles = _record_calls(m)
    with torch.no_grad():
        hidden = m.hidden(rand_ids(a.vocab_size, (2, 10)))
    for h in handles:
        h.remove()
    assert [c[0] for c in seq_calls] == [0, 1, 2] and [c[0] for c in calls] == [3, 4]
    (_, a3, m3, oa3, om3), (_, a4, m4, oa4, om4) = calls
    with torch.no_grad():
        merged = m.merge_skip(seq_calls[2][2], seq_calls[0][2], 1)
    torch.testing.assert_close(a3, merged)
    assert torch.equal(a3, m3), "both lanes start from the one residual stream"
    assert torch.equal(a4, oa3) and torch.equal(m4, om3), "each lane carries on (layer 4 gets no skip)"
    torch.testing.assert_close(hidden, F.rms_norm((oa4 + om4) / 2, (a.model_dim,)))
    assert (oa4 - om4).abs().amax() > 1e-3

# ----------------------------------------------------------------------------- gated skips


def test_gated_skip_is_a_sigmoid_lerp(make_args):
    m = tg.GPT(make_args(NUM_LAYERS="5", SKIP_GATES="1", VE_LAYERS="4"))
    assert torch.equal(m.skip_gates.detach(), torch.zeros(2, 64))
    g = torch.Generator().manual_seed(4)
    x, skip = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 64, generator=g)
    with torch.no_grad():
        m.skip_weights.copy_(torch.randn(2, 64, generator=g))
        ws = m.skip_weights[1] * skip
        torch.testing.assert_close(m.merge_skip(x, skip, 1), 0.5 * x + 0.5 * ws)  # zero-init gate: 0.5
        m.skip_gates.copy_(torch.randn(2, 64, generator=g) * 2)
        s = torch.sigmoid(m.skip_gates[1])
        torch.testing.assert_close(m.merge_skip(x, skip, 1), s * x + (1 - s) * ws)
        assert (m.merge_skip(x, skip, 1) - m.merge_skip(x, skip, 0)).abs().amax() > 1e-3
    plain = tg.GPT(make_args(NUM_LAYERS="5", SKIP_GATES="0", VE_LAYERS="4"))
    assert plain.skip_gates is None
    with torch.no_grad():
        plain.skip_weights.copy_(m.skip_weights)
        torch.testing.assert_close(plain.merge_skip(x, skip, 1), x + ws)


def test_skip_gates_are_used_by_the_forward(make_args):
    m = randomize(tg.GPT(make_args(NUM_LAYERS="5", SKIP_GATES="1", VE_LAYERS="4")))
    ids = rand_ids(1024, (1, 12))
    with torch.no_grad():
        ref = m.forward_logits(ids)
        m.skip_gates[1].add_(3.0)
        assert (m.forward_logits(ids) - ref).abs().amax() > 1e-4

# ----------------------------------------------------------------------------- SparseAttnGate


def test_attn_gate_zero_init_halves_attention_and_learns(make_args):
    m = tg.GPT(make_args(ATTN_GATE_DIMS="8"))
    assert all(torch.equal(b.attn_gate.detach(), torch.zeros(2, 8)) for b in m.blocks)
    randomize(m)
    blk = m.blocks[2]  # an XSA layer: the gate acts on the output after XSA
    assert blk.xsa
    with torch.no_grad():
        blk.attn_gate.zero_()  # (randomize filled it)
    x, x0, _, cos, sin = block_inputs(m)
    w = bank_slices(m, 2)
    gated = blk.attn_out(blk.mix(x, x0), w, None, cos, sin)
    gate = blk.attn_gate
    blk.attn_gate = None
    with torch.no_grad():
        ungated = blk.attn_out(blk.mix(x, x0), w, None, cos, sin)
    blk.attn_gate = gate
    torch.testing.assert_close(gated, 0.5 * ungated)
    assert ungated.abs().amax() > 1e-2
    (gated * torch.randn(gated.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert gate.grad is not None and (gate.grad != 0).all()
    assert all(b.attn_gate is None for b in tg.GPT(make_args()).blocks)  # ATTN_GATE_DIMS=0: no gate


def test_attn_gate_is_a_per_head_sigmoid_of_the_first_dims(make_args):
    k, scale = 8, 0.5
    m = randomize(tg.GPT(make_args(ATTN_GATE_DIMS=str(k), ATTN_GATE_SCALE=str(scale), NUM_HEADS="4",
                                   NUM_KV_HEADS="2", ROPE_DIMS="8")))
    blk = m.blocks[1]
    d, Hh, hd = 64, 4, 16
    w = dict(bank_slices(m, 1), o=torch.eye(d))  # identity output projection: attn_out returns y per head
    x, x0, _, cos, sin = block_inputs(m)
    with torch.no_grad():
        blk.attn_scale.fill_(1.0)
        xm = blk.mix(x, x0)
        gated = blk.attn_out(xm, w, None, cos, sin).view(2, 12, Hh, hd)
        gate = blk.attn_gate.detach().clone()
        blk.attn_gate = None
        plain = blk.attn_out(xm, w, None, cos, sin).view(2, 12, Hh, hd)
        u = F.rms_norm(xm, (d,)) * blk.ln_factor
        g = torch.sigmoid(scale * torch.einsum("btk,hk->bth", u[..., :k], gate))
    torch.testing.assert_close(gated, plain * g.unsqueeze(-1))
    assert (g - 0.5).abs().amax() > 0.05 and (g[..., 0] - g[..., 1]).abs().amax() > 0.01

# ----------------------------------------------------------------------------- input-dependent SmearGate


def test_input_dependent_smeargate():
    d, k, T, p = 16, 4, 12, 6
    g = torch.Generator().manual_seed(0)
    sg = tg.SmearGate(d, gate_dims=k)
    assert not hasattr(sg, "gate") and sg.proj.shape == (k,) and sg.lam.shape == ()
    x = torch.randn(2, T, d, generator=g)
    ids = torch.randint(2, 100, (2, T), generator=g)
    ids[:, p] = H.BOS
    ids[1, 0] = H.BOS
    assert torch.equal(sg(x, ids), x), "zero init (lam = 0) is the identity"
    with torch.no_grad():
        sg.proj.copy_(torch.randn(k, generator=g))
        sg.lam.fill_(0.7)
    out = sg(x, ids)
    got = out.detach()
    for b in range(2):
        for t in range(T):
            if ids[b, t] == H.BOS:
                want = x[b, t]
            else:
                prev = x[b, t - 1] if t > 0 else torch.zeros(d)
                want = x[b, t] + 0.7 * torch.sigmoid(x[b, t, :k] @ sg.proj) * prev
            torch.testing.assert_close(got[b, t], want.detach())
    # the previous document never reaches a BOS or anything after it
    x2, ids2 = x.clone(), ids.clone()
    x2[:, :p] = torch.randn(2, p, d, generator=g)
    ids2[:, :p] = torch.randint(2, 100, (2, p), generator=g)
    assert torch.equal(sg(x2, ids2)[:, p:], got[:, p:])
    ids3 = ids.clone()
    ids3[:, p] = 5  # without the BOS it would
    assert not torch.allclose(sg(x2, ids3)[:, p], sg(x, ids3)[:, p])
    out.sum().backward()
    assert sg.proj.grad.abs().sum() > 0 and sg.lam.grad.abs() > 0


def test_model_uses_the_smeargate_kind_of_its_config(make_args):
    assert tg.GPT(make_args(SMEAR_GATE_DIMS="12")).smear.proj.shape == (12,)
    assert tg.GPT(make_args()).smear.gate.shape == (64,)

# ----------------------------------------------------------------------------- MuonEq-R and Polar Express


@pytest.fixture
def ns_inputs(monkeypatch):
    seen, real = [], tg.newton_schulz

    def spy(G, steps, polar=False):
        seen.append((G.detach().clone(), steps, polar))
        return real(G, steps, polar)

    monkeypatch.setattr(tg, "newton_schulz", spy)
    return seen, real


def test_muon_row_norm_feeds_unit_rows_to_newton_schulz(ns_inputs):
    seen, real = ns_inputs
    g = torch.Generator().manual_seed(2)
    shape = (2, 24, 16)
    w0 = torch.randn(shape, generator=g)
    grad = torch.randn(shape, generator=g) * torch.logspace(-3, 3, 24)[None, :, None]  # rows of very unequal size
    grad[1, 5] = 0.0  # an all-zero row stays zero (the norm is clamped, no NaN)
    for row_norm in (False, True):
        seen.clear()
        p = torch.nn.Parameter(w0.clone())
        opt = tg.Muon([p], lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1, row_norm=row_norm)
        p.grad = grad.clone()
        opt.step()
        (G, steps, polar), = seen
        assert steps == 5 and polar is False
        if not row_norm:
            torch.testing.assert_close(G, 1.9 * grad)
            continue
        norms = G.norm(dim=-1)
        assert torch.equal(G[1, 5], torch.zeros(16))
        mask = torch.ones(2, 24, dtype=torch.bool)
        mask[1, 5] = False
        torch.testing.assert_close(norms[mask], torch.ones(int(mask.sum())))
        torch.testing.assert_close(G, 1.9 * grad / (1.9 * grad).norm(dim=-1, keepdim=True).clamp_min(1e-7))
        k = max(1.0, 24 / 16) ** 0.5
        torch.testing.assert_close(p.detach(), w0 * (1 - 0.05 * 0.1) - 0.05 * k * real(G, 5))


def test_polar_express_table_is_the_published_one():
    assert tg.POLAR_EXPRESS == POLAR_PUBLISHED


def _spectrum(lo, n=32, m=48, batch=3, seed=0):
    """Matrices [batch, m, n] with singular values spread log-uniformly over [lo, 1]."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(batch, m, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g))
    return U @ torch.diag_embed(torch.logspace(math.log10(lo), 0, n).expand(batch, n)) @ V.mT


@pytest.mark.parametrize("transpose", [False, True])
def test_polar_express_orthogonalizes_tighter_than_the_standard_coefficients(transpose):
    G = _spectrum(1e-2)
    G = G.mT if transpose else G
    s_polar = torch.linalg.svdvals(tg.newton_schulz(G, 5, polar=True))
    s_std = torch.linalg.svdvals(tg.newton_schulz(G, 5))
    # measured: polar [0.86, 1.14], standard [0.68, 1.18] on these inputs; the published composite maps every
    # singular value in [1e-3, 1] (after the Frobenius normalization) into [0.8589, 1.1411]
    assert 0.84 < s_polar.min() and s_polar.max() < 1.16, (s_polar.min(), s_polar.max())
    assert 0.5 < s_std.min() < 0.8 and s_std.max() < 1.25, (s_std.min(), s_std.max())
    # same singular vectors as G
    M = G.mT @ tg.newton_schulz(G, 5, polar=True)
    torch.testing.assert_close(M, M.mT, atol=1e-3, rtol=1e-3)


def test_polar_express_follows_the_recurrence_step_by_step():
    G = _spectrum(1e-2, batch=2, seed=1).double()
    X = G / G.norm(dim=(-2, -1), keepdim=True)
    for steps in range(1, 6):
        a, b, c = POLAR_PUBLISHED[steps - 1]
        A = X.mT @ X  # m > n: the code iterates on the transpose; the same polynomial from this side
        X = a * X + X @ (b * A + c * A @ A)
        got = tg.newton_schulz(G.float(), steps, polar=True).double()
        torch.testing.assert_close(got, X, atol=2e-4, rtol=1e-3)


def test_muon_passes_polar_and_build_optimizers_wires_the_knobs(make_args, ns_inputs):
    seen, _ = ns_inputs
    p = torch.nn.Parameter(torch.randn(1, 8, 8))
    opt = tg.Muon([p], lr=0.01, momentum=0.9, backend_steps=3, weight_decay=0.0, polar=True)
    p.grad = torch.randn(1, 8, 8)
    opt.step()
    assert seen[-1][1:] == (3, True)
    for knobs, polar, row_norm, embed_wd, adam_wd in [(TINY_FRONTIER, True, True, 0.085, 0.02),
                                                      (dict(), False, False, 0.04, 0.04),
                                                      (dict(EMBED_WD="0.5"), False, False, 0.5, 0.04)]:
        a = make_args(**knobs)
        adam, muon = tg.build_optimizers(tg.GPT(a), a, fused=False)
        assert (muon.polar, muon.row_norm) == (polar, row_norm)
        tables, scalars = adam.param_groups
        assert tables["weight_decay"] == embed_wd and scalars["weight_decay"] == adam_wd
        assert muon.param_groups[0]["weight_decay"] == a.muon_wd
        assert adam.defaults["betas"] == (a.beta1, a.beta2)

# ----------------------------------------------------------------------------- WARMDOWN_FRAC, MIN_LR


@pytest.mark.parametrize("knobs, step, elapsed_ms, scale, down", [
    # warmdown over the last 40% of 100 steps, floored at 10% of the base LR: scale = 0.1 + 0.9 * down
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1"), 0, 0.0, 1.0, 1.0),
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1"), 60, 0.0, 1.0, 1.0),
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1"), 70, 0.0, 0.775, 0.75),
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1"), 90, 0.0, 0.325, 0.25),
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1"), 100, 0.0, 0.1, 0.0),
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1"), 130, 0.0, 0.1, 0.0),
    # with a 50 s cap the fraction is of the wall clock or of ITERATIONS, whichever is further along
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1", MAX_WALLCLOCK_SECONDS="50"), 95, 0.0, 0.2125, 0.125),  # ITERATIONS ends the run first
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1", MAX_WALLCLOCK_SECONDS="50"), 3, 30000.0, 1.0, 1.0),
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1", MAX_WALLCLOCK_SECONDS="50"), 3, 40000.0, 0.55, 0.5),
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1", MAX_WALLCLOCK_SECONDS="50"), 3, 45000.0, 0.325, 0.25),
    (dict(ITERATIONS="100", WARMDOWN_FRAC="0.4", MIN_LR="0.1", MAX_WALLCLOCK_SECONDS="50"), 3, 60000.0, 0.1, 0.0),
    # WARMDOWN_ITERS (WARMDOWN_FRAC=0) with a floor: 0.2 + 0.8 * (30 - 25) / 10
    (dict(ITERATIONS="30", WARMDOWN_ITERS="10", MIN_LR="0.2"), 25, 0.0, 0.6, 0.5),
    (dict(ITERATIONS="30", WARMDOWN_ITERS="10", MIN_LR="0.2"), 10, 0.0, 1.0, 1.0),
    # WARMDOWN_ITERS under a 60 s cap: 30 steps of 500 ms = 15 s of warmdown, 10 s left -> 2/3
    (dict(ITERATIONS="100000", WARMDOWN_ITERS="30", MAX_WALLCLOCK_SECONDS="60"), 100, 50000.0, 2 / 3, 2 / 3),
    (dict(ITERATIONS="100000", WARMDOWN_ITERS="30", MAX_WALLCLOCK_SECONDS="60"), 100, 40000.0, 1.0, 1.0),
    (dict(ITERATIONS="100000", WARMDOWN_ITERS="30", MAX_WALLCLOCK_SECONDS="60"), 0, 0.0, 1.0, 1.0),
    # ... whichever ends the run first: ITERATIONS, (120 - 100) / 30; the cap, 5 s left of 30 steps of 550 ms
    (dict(ITERATIONS="120", WARMDOWN_ITERS="30", MAX_WALLCLOCK_SECONDS="60"), 100, 20000.0, 2 / 3, 2 / 3),
    (dict(ITERATIONS="120", WARMDOWN_ITERS="30", MAX_WALLCLOCK_SECONDS="60"), 100, 55000.0, 5 / 16.5, 5 / 16.5),
    # MIN_LR floors the LR multiplier only; the warmdown factor goes to 0
    (dict(ITERATIONS="10", WARMDOWN_FRAC="0.5", MIN_LR="0.5"), 8, 0.0, 0.7, 0.4),
])
def test_lr_scale_values(make_args, knobs, step, elapsed_ms, scale, down):
    a = make_args(**dict(dict(MAX_WALLCLOCK_SECONDS="0"), **knobs))
    got = tg.lr_scale(a, step, elapsed_ms)
    assert isinstance(got, tuple) and len(got) == 2
    assert got[0] == pytest.approx(scale, abs=1e-12) and got[1] == pytest.approx(down, abs=1e-12)
    assert tg.warmdown_factor(a, step, elapsed_ms) == pytest.approx(down, abs=1e-12)


def test_late_qat_and_the_lrs_follow_the_warmdown(make_args, train_shard):
    # down(s) = min(1, (6 - s) / 4) = 1, 1, 1, .75, .5, .25
    tr, logs = _trainer(make_args, train_shard, ITERATIONS="6", WARMDOWN_ITERS="4", LATE_QAT_THRESHOLD="0.3")
    seen = _record_steps(tr)
    averager = tg.WeightAverager(tr.params, tr.args, logs.append)
    tr.run(lambda looped: (0.0, 0.0), averager)
    down = [1, 1, 1, 0.75, 0.5, 0.25]
    assert [s[0] for s in seen] == [False] * 5 + [True]
    assert "late_qat:enabled step:5 warmdown:0.2500" in logs
    a = tr.args
    for s, (_, _, lrs) in enumerate(seen):
        f = down[s]
        assert lrs == pytest.approx([a.tied_embed_lr * f, a.scalar_lr * f, a.matrix_lr * f], rel=1e-12), s

# ----------------------------------------------------------------------------- EMA warm-up


def test_weight_averager_warm_up_recursion(make_args):
    a = make_args(EMA_DECAY="0.6")
    p = torch.nn.Parameter(torch.tensor([0.0]))
    avg = tg.WeightAverager([p], a, lambda msg: None)
    values = [float(v * v - 3 * v) for v in range(1, 17)]
    ema, ref = 0.0, []
    for t, v in enumerate(values):
        decay = min(0.6, (1 + t) / (10 + t))  # the cap is reached at t = 13
        ema = decay * ema + (1 - decay) * v
        ref.append(ema)
    got = []
    for t, v in enumerate(values):
        with torch.no_grad():
            p.fill_(v)
        avg.update()
        got.append(avg.ema[0].item())
    assert got[0] == pytest.approx(0.9 * values[0], rel=1e-6)  # decay 0.1 at t = 0
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert avg.load_into_model() == "ema" and p.item() == pytest.approx(ref[-1], rel=1e-5)


def test_ema_decay_zero_is_the_live_weights(make_args):
    a = make_args(EMA_DECAY="0")
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    avg = tg.WeightAverager([p], a, lambda msg: None)
    for v in (5.0, -3.0):
        with torch.no_grad():
            p.fill_(v)
        avg.update()
        assert torch.equal(avg.ema[0], torch.full((2,), v))


def test_trained_model_exports_the_hand_computed_warm_up_ema(make_args, train_shard):
    """A short in-process run: the exported EMA is the warm-up average of the weights after each step."""
    # decay_t = (1+t)/(10+t) until it reaches EMA_DECAY=0.6 at t = 13; no warmdown, so the weights keep moving
    tr, logs = _trainer(make_args, train_shard, ITERATIONS="16", EMA_DECAY="0.6", WARMDOWN_ITERS="0")
    init = [p.detach().double().clone() for p in tr.params]
    averager = tg.WeightAverager(tr.params, tr.args, logs.append)
    snaps, real = [], averager.update

    def update():
        snaps.append([p.detach().double().clone() for p in tr.params])
        real()

    averager.update = update
    tr.run(lambda looped: (0.0, 0.0), averager)
    assert len(snaps) == 16
    ema, const = [t.clone() for t in init], [t.clone() for t in init]
    for t, ps in enumerate(snaps):
        decay = min(0.6, (1 + t) / (10 + t))
        ema = [decay * e + (1 - decay) * q for e, q in zip(ema, ps)]
        const = [0.6 * e + 0.4 * q for e, q in zip(const, ps)]  # what an EMA without warm-up would give
    assert averager.load_into_model() == "ema" and "export_weights:ema" in logs
    worst = max((p.detach().double() - e).abs().max().item() for p, e in zip(tr.params, ema))
    assert worst < 1e-6  # measured ~1e-7 (float32 accumulation)
    # measured: 1.2e-3 from the warm-up EMA without it, 4.5e-2 from the live weights
    assert max((e - c).abs().max().item() for e, c in zip(ema, const)) > 1e-4
    assert max((s - e).abs().max().item() for s, e in zip(snaps[-1], ema)) > 1e-2

# ----------------------------------------------------------------------------- shuffled loader


def _shards(tmp_path, sizes=(1000, 530, 16), sub="data"):
    """Shards whose token values are their position in the concatenation (so a value names shard and offset)."""
    files, base = [], 0
    for i, n in enumerate(sizes):
        files.append(str(H.write_shard(tmp_path / sub / f"fineweb_train_{i:06d}.bin", np.arange(base, base + n))))
        base += n
    return files, np.cumsum((0,) + tuple(sizes))


def _where(first_tokens, bounds):
    shard = np.searchsorted(bounds, first_tokens, side="right") - 1
    return [(int(s), int(v - bounds[s])) for s, v in zip(shard, first_tokens)]


def _check_pair(x, y, L):
    assert x.dtype == torch.int64 and x.shape[1] == L and x.shape == y.shape
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x - x[:, :1], torch.arange(L).expand_as(x)), "a sequence is one contiguous block"


def test_shuffled_loader_reads_each_block_once_per_epoch(tmp_path):
    L, sizes = 16, (1000, 530, 16)
    files, bounds = _shards(tmp_path, sizes)
    loader = tg.ShuffledLoader(files, 0, 1, L, L, CPU, seed=5)  # one sequence per call
    epochs = []
    for _ in range(3):
        x, y = loader.next_batch()
        n = len(loader.plan)  # the epoch just drawn
        got = [(x, y)] + [loader.next_batch() for _ in range(n - 1)]
        for xx, yy in got:
            _check_pair(xx, yy, L)
        epochs.append(_where(np.array([int(xx[0, 0]) for xx, _ in got]), bounds))
    for blocks in epochs:
        assert len(set(blocks)) == len(blocks), "a block read twice in one epoch"
        assert {s for s, _ in blocks} == {0, 1}, "the 16-token shard holds no block of 17 tokens"
        for s in (0, 1):
            offs = [o for sh, o in blocks if sh == s]
            phase = min(offs)
            assert phase < L
            n = (sizes[s] - phase - 1) // L  # every whole block after the phase: full coverage
            assert sorted(offs) == [phase + L * k for k in range(n)]
            idx = [(o - phase) // L for o in offs]  # walked with one stride coprime to n
            strides = {(b - a) % n for a, b in zip(idx, idx[1:])}
            assert len(strides) == 1 and math.gcd(strides.pop(), n) == 1
        first_half = {s for s, _ in blocks[:len(blocks) // 2]}
        assert first_half == {0, 1}, "shards are interleaved, not read one after the other"
    assert epochs[0] != epochs[1] != epochs[2], "a new random order every epoch"


def test_shuffled_loader_rank_slices_and_accumulation_are_one_plan(tmp_path):
    L = 16
    files, bounds = _shards(tmp_path)
    one = tg.ShuffledLoader(files, 0, 1, 4 * L, L, CPU, seed=7)   # 1 rank x accum 1: 4 sequences
    acc = tg.ShuffledLoader(files, 0, 1, 2 * L, L, CPU, seed=7)   # 1 rank x accum 2
    ranks = [tg.ShuffledLoader(files, r, 2, 2 * L, L, CPU, seed=7) for r in range(2)]  # 2 ranks x accum 1
    quads = [tg.ShuffledLoader(files, r, 4, L, L, CPU, seed=7) for r in range(4)]  # 4 ranks x accum 1
    for step in range(40):  # 160 sequences: more than two epochs of ~94
        x1, y1 = one.next_batch()
        _check_pair(x1, y1, L)
        xa = torch.cat([acc.next_batch()[0] for _ in range(2)])
        parts = [r.next_batch() for r in ranks]
        x2 = torch.cat([p[0] for p in parts])
        x4 = torch.cat([q.next_batch()[0] for q in quads])
        assert torch.equal(xa, x1) and torch.equal(x2, x1) and torch.equal(x4, x1), step
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        if step < 20:  # inside the first epoch: the ranks' blocks are disjoint
            a = set(_where(parts[0][0][:, 0].numpy(), bounds))
            b = set(_where(parts[1][0][:, 0].numpy(), bounds))
            assert len(a) == len(b) == 2 and not a & b


def test_shuffled_loader_plan_depends_on_the_seed_only(tmp_path):
    L = 16
    files, _ = _shards(tmp_path)
    moved, _ = _shards(tmp_path, sub="elsewhere/other_name")

    def batches(fs, seed, n=30):
        loader = tg.ShuffledLoader(fs, 0, 1, 2 * L, L, CPU, seed=seed)
        return torch.cat([loader.next_batch()[0] for _ in range(n)])

    ref = batches(files, 1)
    assert torch.equal(batches(files, 1), ref)
    assert torch.equal(batches(moved, 1), ref), "the plan must not depend on path strings"
    assert not torch.equal(batches(files, 2), ref)


def test_shuffled_loader_needs_one_whole_sequence(tmp_path):
    files, _ = _shards(tmp_path, sizes=(16, 10))
    with pytest.raises(ValueError, match="no training shard holds a sequence of 17 tokens"):
        tg.ShuffledLoader(files, 0, 1, 16, 16, CPU, seed=0)  # the first epoch's plan is built at construction


def test_trainer_picks_the_loader_of_train_loader(make_args, train_shard):
    for kind, cls in (("sequential", tg.TrainLoader), ("shuffled", tg.ShuffledLoader)):
        tr, _ = _trainer(make_args, train_shard, TRAIN_LOADER=kind)
        loader = tr.new_loader()
        assert type(loader) is cls
        x, y = loader.next_batch()
        assert x.shape == y.shape == (2, 64)

# ----------------------------------------------------------------------------- end to end: 2 processes vs 1


@pytest.mark.tg_runs("frontier_acc_1p", "frontier_acc_2p")
def test_frontier_two_process_training_matches_grad_accumulation(tg_runs):
    runs = tg_runs("frontier_acc_1p"), tg_runs("frontier_acc_2p")
    for r in runs:
        assert r.rc == 0, r.describe()
    one, two = (r.log for r in runs)
    assert "world_size:1 grad_accum_steps:8" in one and "world_size:2 grad_accum_steps:4" in two
    for log in (one, two):
        lines = log.splitlines()
        assert "recipe:frontier" in lines and "config NUM_LOOPS=2" in lines and "config MUON_NS=polar" in lines
        assert any(line.startswith("train_loader:") and line.endswith("loader:shuffled") for line in lines)
        assert ("layers: plain ([0, 1, 2], [3, 4, 5]) looped ([0, 1, 2, 3, 2], [3, 2, 3, 4, 5]) parallel:[4, 5] "
                "mode:lanes") in lines
        # progress 2/6 >= 0.3 at step 2: the switch happens inside the run, after the warm-up compiled both graphs
        assert "looping:enabled step:2 layers:([0, 1, 2, 3, 2], [3, 2, 3, 4, 5])" in lines
        assert "warmup_step:2/2" in lines and "export_weights:ema" in lines
    v1, l1 = H.assert_same_training(one, two)
    assert abs(l1 - v1[6][0]) > 1e-3, "the exported EMA is not the live weights"
    assert H.exact(two, "final_int6_roundtrip_exact")[0] == pytest.approx(H.exact(one, "final_int6_roundtrip_exact")[0],
                                                                          rel=1e-5)


def test_last_train_step_is_logged_with_eta(make_args, train_shard):
    """ITERATIONS=13, TRAIN_LOG_EVERY=5: steps 1-10 and 13 (the last, not a multiple of 5) get a train line;
    each carries the projected time left."""
    tr, logs = _trainer(make_args, train_shard, ITERATIONS="13", TRAIN_LOG_EVERY="5")
    steps, ms = tr.run(lambda looped: (0.0, 0.0), tg.WeightAverager(tr.params, tr.args, logs.append))
    train = [ln for ln in logs if " train_loss:" in ln]
    assert [int(ln.split("/")[0].split(":")[1]) for ln in train] == list(range(1, 11)) + [13]
    assert steps == 13 and ms > 0
    assert all(re.search(r" eta:\d+s$", ln) for ln in train) and train[-1].endswith(" eta:0s")



def test_progress_follows_whichever_limit_ends_the_run(make_args):
    """ITERATIONS ending a capped run early still drives the warmdown and the recurrence switch to completion."""
    a = make_args(ITERATIONS="100", MAX_WALLCLOCK_SECONDS="600", WARMDOWN_FRAC="0.5", NUM_LOOPS="1",
                  LOOP_START="1", LOOP_END="1", ENABLE_LOOPING_AT="0.35")
    assert tg.run_progress(a, 50, 30_000.0) == 0.5  # steps lead: 50 % of ITERATIONS, 5 % of the wall clock
    assert tg.run_progress(a, 10, 300_000.0) == 0.5  # the clock leads
    assert tg.lr_scale(a, 99, 60_000.0)[1] == pytest.approx(0.02)  # the warmdown reaches ~0 at step 100
    assert tg.run_progress(a, 100, 1.0) == 1.0


def test_first_epoch_is_planned_before_the_timed_run(tmp_path, monkeypatch):
    files, _ = _shards(tmp_path, sizes=(400, 300))
    loader = tg.ShuffledLoader(files, 0, 1, 32, 16, CPU, seed=0)
    assert len(loader.plan) > 0 and loader.cursor == 0
    monkeypatch.setattr(loader, "_new_epoch", lambda: pytest.fail("planned inside next_batch"))
    loader.next_batch()
