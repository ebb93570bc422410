"""Evaluation of train_gpt.py (SPEC §2.8-2.9, §8): window plan, plain and sliding eval against independent
references, rank splitting, and the legality and usefulness of score-first TTT."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import tg_helpers as H
import train_gpt as tg

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- window plan and rank split


def scored_spans(total, seq_len, stride):
    starts, first = tg.window_plan(total, seq_len, stride)
    return [(int(s), int(s + f), int(min(s + seq_len, total))) for s, f in zip(starts, first)]


@pytest.mark.parametrize("total, seq_len, stride", [
    (1001, 64, 16), (999, 64, 64), (1023, 32, 7), (4097, 256, 64), (50, 64, 16), (64, 64, 16),
    (65, 64, 1), (131, 16, 5), (2049, 2048, 64), (7, 8, 3),
])
def test_window_plan_scores_every_position_once(total, seq_len, stride):
    counts = torch.zeros(total, dtype=torch.long)
    spans = scored_spans(total, seq_len, stride)
    for i, (ws, lo, hi) in enumerate(spans):
        assert lo < hi, f"window {i} at {ws} scores nothing"
        counts[lo:hi] += 1
        ctx = lo - ws  # tokens of context before the first scored target of this window
        if i == 0:
            assert ws == 0 and lo == 0
        else:
            assert ctx == seq_len - stride and ctx >= seq_len - stride
    assert torch.equal(counts, torch.ones(total, dtype=torch.long))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [0, 1, 5, 8, 17, 969])
def test_rank_slices_cover_windows_once(world, n):
    parts = [tg.rank_slice(n, r, world) for r in range(world)]
    idx = [i for p in parts for i in range(n)[p]]
    assert idx == list(range(n))  # contiguous, in rank order, no overlap, nothing left out
    sizes = [len(range(n)[p]) for p in parts]
    assert max(sizes) - min(sizes) <= 1


# ----------------------------------------------------------------------------- plain and sliding eval


@pytest.fixture(scope="module")
def val_tokens(sp1024):
    docs = H.pydoc_docs()[3:9]
    return torch.from_numpy(H.encode_stream(sp1024, docs)).int()


@pytest.fixture
def eval_model(make_args):
    a = make_args(EVAL_SEQ_LEN="32", TRAIN_SEQ_LEN="32")
    torch.manual_seed(0)
    m = tg.GPT(a)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    m.eval()
    return m, a


@pytest.fixture(scope="module")
def luts(sp1024):
    return tg.byte_luts(sp1024, 1024)


def test_stride_equal_to_window_is_plain_block_eval(eval_model, val_tokens, luts):
    m, a = eval_model
    L = 32
    val = val_tokens[: 10 * L + 1]
    loss, bpb = tg.evaluate(m.forward_logits, val, luts, L, L, 3, H.DistStub())  # 10 windows, batch 3: padding
    x, y = val[:-1].long().view(-1, L), val[1:].long().view(-1, L)
    with torch.no_grad():
        logits = m.forward_logits(x)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").double()
    nbytes = tg.target_bytes(x.reshape(-1), y.reshape(-1), luts).sum().item()
    ref_loss = nll.mean().item()
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert bpb == pytest.approx(ref_loss / math.log(2) * nll.numel() / nbytes, rel=1e-6)


def test_warm_up_compiles_the_graph_the_scoring_loop_uses(make_args, val_tokens, luts, monkeypatch):
    """The warm-up's input has the loop's shape and strides: the timed loop compiles nothing (on a GPU with a
    cold cache, a stride mismatch cost a second ~44 s compile inside each timed evaluation)."""
    a = make_args(EVAL_SEQ_LEN="32", TRAIN_SEQ_LEN="32", EVAL_BATCH_SEQS="3", COMPILE="1")
    counter, real = torch._dynamo.testing.CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=counter, **kw))
    torch._dynamo.reset()
    fn = tg.compiled_logits(tg.GPT(a), a)
    tg.warm_up_scoring(fn, a, CPU)
    assert counter.frame_count == 1
    for stride in (32, 8):
        tg.evaluate(fn, val_tokens[:301], luts, 32, stride, 3, H.DistStub())
    assert counter.frame_count == 1, "the scoring loop recompiled"


def test_window_scorer_compiles_only_for_phases_that_reuse_it(make_args, monkeypatch):
    """The round-trip alone scores eagerly: on a GPU its compile cost more than its few seconds of scoring. A
    stride of EVAL_SEQ_LEN or more (the frontier default, 2048, with a shorter EVAL_SEQ_LEN) runs no sliding phase."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    cases = {("32", "0", "sgd"): False, ("32", "1", "phased"): False, ("2048", "1", "phased"): False,
             ("2048", "0", "sgd"): False, ("8", "0", "sgd"): True,
             ("32", "1", "sgd"): True, ("8", "1", "phased"): True}
    for (stride, ttt, mode), want in cases.items():
        a = make_args(EVAL_SEQ_LEN="32", TRAIN_SEQ_LEN="32", EVAL_STRIDE=stride, TTT_ENABLED=ttt, TTT_MODE=mode, TTT_LORA_CHUNK="16",
                      COMPILE="1")
        m, before = tg.GPT(a), len(compiled)
        fn = tg.window_scorer(m, a)
        assert (len(compiled) > before) == want, (stride, ttt, mode)
        assert want or fn == m.forward_logits


@pytest.mark.parametrize("L, stride, n", [(32, 8, 301), (32, 32, 300), (16, 5, 203)])
def test_sliding_eval_matches_per_position_reference(eval_model, val_tokens, luts, L, stride, n):
    m, _ = eval_model
    val = val_tokens[: n + 1]
    total = n
    loss, bpb = tg.evaluate(m.forward_logits, val, luts, L, stride, 4, H.DistStub())
    # reference: target p is predicted in the window that starts at 0 if p < L, else at the multiple of
    # `stride` that puts p among that window's last `stride` positions (SPEC §2.9, tail fixed)
    by_window = {}
    for p in range(total):
        ws = 0 if p < L else stride * ((p - L) // stride + 1)
        assert ws + L - stride <= p < ws + L or ws == 0
        by_window.setdefault(ws, []).append(p)
    nll_sum, nbytes = 0.0, 0.0
    with torch.no_grad():
        for ws, ps in by_window.items():
            end = min(ws + L, total)
            x = val[ws:end].long()[None]
            y = val[ws + 1:end + 1].long()
            logits = m.forward_logits(x)[0]
            off = torch.tensor(ps) - ws
            nll_sum += F.cross_entropy(logits[off], y[off], reduction="sum").double().item()
            nbytes += tg.target_bytes(x[0][off], y[off], luts).sum().item()
    ref = nll_sum / total
    assert loss == pytest.approx(ref, rel=2e-6)
    assert bpb == pytest.approx(ref / math.log(2) * total / nbytes, rel=2e-6)


class RecordingDist(H.DistStub):
    def __init__(self, rank, world, sink):
        super().__init__(rank, world)
        self.sink = sink

    def all_reduce(self, t, op=None):
        self.sink.append(t.clone())
        return t


@pytest.mark.parametrize("world", [2, 3, 8])
def test_sliding_eval_rank_parts_add_up(eval_model, val_tokens, luts, world):
    m, _ = eval_model
    val = val_tokens[: 257]
    one = tg.evaluate(m.forward_logits, val, luts, 32, 8, 4, H.DistStub())
    sums = []
    for r in range(world):
        tg.evaluate(m.forward_logits, val, luts, 32, 8, 4, RecordingDist(r, world, sums))
    total = torch.stack(sums).sum(0)
    assert total[1].item() == 256  # every target scored once across ranks
    loss, bpb = tg.bpb_from(total)
    assert loss == pytest.approx(one[0], rel=1e-9) and bpb == pytest.approx(one[1], rel=1e-9)


# ----------------------------------------------------------------------------- TTT


def ttt_args(make_args, **knobs):
    base = dict(NUM_LAYERS="2", VE_LAYERS="1", EVAL_SEQ_LEN="32", EVAL_STRIDE="16", TTT_CHUNK_TOKENS="128",
                TTT_BATCH_SEQS="2", TTT_EPOCHS="2", TTT_LR="0.05")
    base.update(knobs)
    return make_args(**base)


def fresh_model(a, seed=0):
    torch.manual_seed(seed)
    return tg.GPT(a)


def run_ttt(model, a, val, luts, monkeypatch, chunk_sums=None, trained=None, preds=None):
    """tg.ttt_evaluate with probes: `chunk_sums` gets each chunk's (NLL, tokens, bytes) as scored; `preds`
    maps every scored target position to the logits it was scored with (recomputed with the model state
    of that moment); `trained` gets (targets scored so far, target tokens) for every TTT training batch."""
    real_score = tg.score_windows
    total = val.numel() - 1

    def score(logits_fn, val_, luts_, starts, first, seq_len, batch, device):
        out = real_score(logits_fn, val_, luts_, starts, first, seq_len, batch, device)
        if chunk_sums is not None:
            chunk_sums.append(out.clone())
        if preds is not None:
            with torch.no_grad():
                for ws, lo in zip(starts.tolist(), first.tolist()):
                    x = val_[(ws + torch.arange(seq_len)).clamp_max(total)].long()[None]
                    logits = logits_fn(x)[0]
                    for j in range(lo, seq_len):
                        if ws + j < total:
                            assert ws + j not in preds, "position scored twice"
                            preds[ws + j] = logits[j].clone()
        return out

    loss_fn = model
    if trained is not None:
        def loss_fn(x, y):
            trained.append((sum(int(s[1]) for s in chunk_sums), y.clone()))
            return model(x, y)
    logs = []
    with monkeypatch.context() as mp:
        mp.setattr(tg, "score_windows", score)
        result = tg.ttt_evaluate(model, model.forward_logits, loss_fn, val, luts, a, H.DistStub(), logs.append)
    assert result[2]["loop_s"] > 0  # what ttt_apart replaces when the chunks were probed
    return tuple(result[:2]), logs  # (val_loss, val_bpb[, compile warm-up seconds])


def test_ttt_scores_never_depend_on_later_tokens(make_args, luts, monkeypatch):
    a = ttt_args(make_args)
    C, total, k = 128, 768, 2
    g = torch.Generator().manual_seed(7)
    val1 = torch.randint(2, 1024, (total + 1,), generator=g, dtype=torch.int32)
    val2 = val1.clone()
    q = (k + 1) * C  # the streams agree on val[0..q]: all targets of chunks 0..k, and the input of target q
    val2[q + 1:] = torch.randint(2, 1024, (total - q,), generator=g, dtype=torch.int32)
    assert not torch.equal(val1[q + 1:q + 2], val2[q + 1:q + 2])
    sums1, sums2, preds1, preds2 = [], [], {}, {}
    run_ttt(fresh_model(a), a, val1, luts, monkeypatch, sums1, preds=preds1)
    run_ttt(fresh_model(a), a, val2, luts, monkeypatch, sums2, preds=preds2)
    assert len(sums1) == len(sums2) == total // C  # one scoring call per chunk
    assert sorted(preds1) == list(range(total))
    for c in range(k + 1):
        assert torch.equal(sums1[c], sums2[c]), f"chunk {c} score changed when only tokens after chunk {k} did"
    assert not torch.equal(sums1[k + 1], sums2[k + 1])
    # the prediction for target p may use val[0..p] only: identical wherever the streams agree that far,
    # including p = q, the first target of chunk k+1 (a model that peeked at chunk k+1 would differ there)
    for p in range(q + 1):
        assert torch.equal(preds1[p], preds2[p]), f"prediction at position {p} saw later tokens"
    assert any(not torch.equal(preds1[p], preds2[p]) for p in range(q + 1, total))
    assert sum(int(s[1]) for s in sums1) == total  # the chunks' scored counts tile the stream


def test_ttt_trains_only_on_already_scored_targets(make_args, luts, monkeypatch):
    a = ttt_args(make_args, TTT_CHUNK_TOKENS="100")  # not a multiple of the stride: spans straddle chunk ends
    total = 703
    val = torch.arange(total + 1, dtype=torch.int32) % 1024  # token value = its position (+1 for targets)
    assert total < 1024
    sums, trained = [], []
    model = fresh_model(a)
    untouched = copy.deepcopy(model)
    (loss, bpb), logs = run_ttt(model, a, val, luts, monkeypatch, sums, trained)
    n_chunks = math.ceil(total / 100)
    assert len(sums) == n_chunks
    # forward/backward calls before the first scoring (a compile warm-up on random tokens) must not move the
    # weights: chunk 0 is scored exactly as by the untouched model
    early = [y for scored, y in trained if scored == 0]
    assert len(early) <= 1
    starts, first = tg.window_plan(total, 32, 16)
    chunk0 = (starts + first) // 100 == 0
    ref = tg.score_windows(untouched.forward_logits, val, luts, starts[chunk0], first[chunk0], 32, 2, CPU)
    assert torch.equal(sums[0], ref)
    trained = [(scored, y) for scored, y in trained if scored > 0]
    assert trained, "TTT must train on something"
    for scored_prefix, y in trained:
        # target token values are positions + 1; every trained target lies in the scored prefix
        assert int(y.max()) <= scored_prefix
    last_scored_before_final = sum(int(s[1]) for s in sums[:-1])
    assert max(int(y.max()) for _, y in trained) <= last_scored_before_final  # the last chunk is never trained on
    assert any(line.startswith("ttt_sliding:done") for line in logs)


@pytest.mark.parametrize("world", [2, 3])
def test_ttt_steps_do_not_depend_on_the_number_of_ranks(make_args, world):
    """TTT_BATCH_SEQS sequences per SGD step over all ranks: on any number of ranks the same steps, each of the
    same sequences (every rank a share of each step), in SGD TTT and the global phases alike."""
    a = make_args(TTT_BATCH_SEQS="4", TTT_EPOCHS="1")
    L, n_seq = a.eval_seq_len, 10
    val = torch.arange(n_seq * L + 1)

    def steps_on(world, rank):
        steps = []

        class Opt:
            param_groups = [{}]

            def zero_grad(self, set_to_none):
                steps.append([])

            def step(self):
                pass

        def loss_fn(x, y):
            steps[-1].extend((x[:, 0] // L).tolist())  # each sequence by its index
            return torch.zeros((), requires_grad=True)

        tg.ttt_train_chunk(None, loss_fn, Opt(), [], val, 0, n_seq * L, 0.1, a, H.DistStub(rank, world))
        return steps

    one = steps_on(1, 0)
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    ranks = [steps_on(world, r) for r in range(world)]
    assert [sorted(sum(shares, [])) for shares in zip(*ranks)] == one


def test_ttt_lowers_loss_on_repetitive_stream(make_args, monkeypatch):
    a = ttt_args(make_args, VOCAB_SIZE="64", TTT_LR="0.1", TTT_BATCH_SEQS="4")
    g = torch.Generator().manual_seed(1)
    pattern = torch.randint(4, 64, (24,), generator=g)
    val = pattern.repeat(40)[:769].int()
    luts = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))
    model = fresh_model(a)
    plain_loss, _ = tg.evaluate(model.forward_logits, val, luts, 32, 16, 8, H.DistStub())
    (ttt_loss, ttt_bpb), _ = run_ttt(copy.deepcopy(model), a, val, luts, monkeypatch, [])
    assert ttt_loss < plain_loss - 0.5, (ttt_loss, plain_loss)
    assert ttt_bpb == pytest.approx(ttt_loss / math.log(2), rel=1e-9)  # one byte per token here
    # without training (lr 0) TTT is exactly the sliding eval
    b = ttt_args(make_args, VOCAB_SIZE="64", TTT_LR="0", TTT_BATCH_SEQS="4", TTT_MOMENTUM="0", TTT_GRAD_CLIP="0")
    (zero_loss, _), _ = run_ttt(copy.deepcopy(model), b, val, luts, monkeypatch, [])
    assert zero_loss == pytest.approx(plain_loss, rel=1e-9)


# ----------------------------------------------------------------------------- evaluation-time budget


def test_eval_budget_scales_loops_not_warm_ups_and_counts_everything():
    logs = []
    b = tg.EvalBudget(logs.append, tokens=1000, world_size=1, full_tokens=4000)  # a quarter of val, 1 GPU
    assert b.scale == pytest.approx(4 / 8)
    b.add("load", 3.0, 3.0)
    b.add("roundtrip", 12.0, 2.0)  # 10 s of loop -> 5 s on 8 GPUs, the 2 s warm-up stays
    b.add("legal_ttt", 50.0, 10.0, apart=(30.0, 290.0))  # 10 s scale linearly, a latency-bound 30 s -> 290 s
    total = b.close(budget_s=310.0)
    assert total == pytest.approx(3.0 + 7.0 + 10.0 + 5.0 + 290.0)
    assert logs[1].endswith("projected_8gpu_full_val_s:7.0 warmup_s:2.0")
    assert logs[-1] == "eval_projection total_8gpu_full_val_s:315.0 budget_s:310 fits:False compile_cache:unchecked"
    assert logs[-2].split()[1:4] == ["total", "65.0", "315.0"], "the table's total row: measured and projected"
    b.close(budget_s=400.0, cache="warm")
    assert logs[-1].endswith("fits:True compile_cache:warm")


def test_compile_cache_state_reads_torchs_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert tg.compile_cache_state() == "cold"  # a fresh machine: no cache yet (torch creates the directory empty)
    (tmp_path / "inductor" / "fxgraph").mkdir()  # what torch.compile leaves there
    assert tg.compile_cache_state() == "warm"


def test_projection_counts_the_full_fineweb_split_of_the_runs_tokenizer(make_args, luts):
    val = torch.randint(0, 64, (5001,), generator=torch.Generator().manual_seed(0))
    for name, want in (("fineweb_1024_bpe.model", 62_021_632), ("fineweb_8192_bpe.model", 40_540_160)):
        assert tg.fineweb_val_tokens(make_args(TOKENIZER_PATH=f"/x/{name}"), val, luts) == (want, f"logged for {name}")
    tokens, source = tg.fineweb_val_tokens(make_args(TOKENIZER_PATH="/x/own.model"), val, luts)
    nbytes = tg.target_bytes(val[:-1], val[1:], luts).sum().item()
    assert source.startswith("estimated") and tokens == round(tg.FINEWEB_VAL_BYTES / (nbytes / 5000))


def test_sgd_ttt_projection_counts_chunks_at_the_rank_shape(make_args):
    a, logs = make_args(TTT_CHUNK_TOKENS="32768"), []
    chunks, val = math.ceil(40_000_000 / 32768), torch.zeros(10)
    timing = {"warm_s": 5.0, "loop_s": 60.0, "chunk8_s": 0.1}
    assert tg.ttt_apart(None, val, timing, a, H.DistStub(), 40_000_000, logs.append) == pytest.approx((60.0, 0.1 * chunks))
    assert logs == [f"eval_projection rank_shape steps:{chunks} step_s:0.1000 projected_8gpu_s:{0.1 * chunks:.1f} "
                    "in_place_of_measured_s:60.0"]
    timing = {"warm_s": 5.0, "loop_s": 60.0}  # not probed (8 ranks, or no compile): linear
    assert tg.ttt_apart(None, val, timing, a, H.DistStub(), 40_000_000, logs.append) == (0.0, 0.0)


def test_phase_projection_reads_the_prefix_share_off_the_queue(make_args):
    """On FineWeb itself (50,000 documents) the phases' steps are the real prefix's; on a smaller set, the
    prefix's share of documents picks the share of tokens."""
    a = make_args(TTT_DOC_BATCH="64", TTT_PREFIX_DOCS="2500", TTT_PHASES="3", TTT_CHUNK_TOKENS="32768")
    fineweb = sorted(torch.randint(100, 3000, (50_000,), generator=torch.Generator().manual_seed(0)).tolist())[::-1]
    total = sum(fineweb)
    want = sum(int(sum(fineweb[:end * 64]) / total * total) // 32768 for end in (14, 27, 40))  # ceil(2500 k/3/64)
    assert tg.fineweb_phase_chunks(fineweb, a, total) == want
    small = [1000] * 100 + [10] * 900
    # 896, 1,728 and 2,560 of 50,000 documents -> the first 18, 35 and 52 of these 1,000: 18,000, 35,000 and
    # 52,000 of their 109,000 tokens -> 6,605,504, 12,844,036 and 19,082,568 of 40 M -> 201 + 391 + 582 steps
    assert tg.fineweb_phase_chunks(small, a, 40_000_000) == 1174
    assert tg.fineweb_phase_chunks(small, make_args(TTT_PREFIX_DOCS="0"), 40_000_000) == 0


def test_phase_probe_changes_nothing(make_args):
    a = ttt_args(make_args, TTT_CHUNK_TOKENS="512")
    model = fresh_model(a)
    before = copy.deepcopy(model.state_dict())
    val = torch.randint(0, a.vocab_size, (2000,), generator=torch.Generator().manual_seed(0))
    model.blocks[0].requires_grad_(False)  # the flags it found are restored
    flags = [p.requires_grad for p in model.parameters()]
    secs = tg.rank_shape_phase_chunk_s(model, val, a, CPU)
    assert secs > 0 and all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and not all(flags)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_rank_shape_probe_changes_nothing(make_args, luts):
    a = ttt_args(make_args, TTT_CHUNK_TOKENS="512")
    model = fresh_model(a)
    before = copy.deepcopy(model.state_dict())
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=a.ttt_lr, momentum=0.9)
    for p in params:
        p.grad = torch.zeros_like(p)
    val = torch.randint(0, a.vocab_size, (2000,), generator=torch.Generator().manual_seed(0))
    secs = tg.rank_shape_chunk_s(model, model.forward_logits, opt, val, luts, a, CPU, reps=2)
    assert secs > 0 and opt.state == {} and all(g["lr"] == a.ttt_lr for g in opt.param_groups)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ttt_warm_up_trains_on_a_ranks_share_of_a_step(make_args, luts):
    """The compile warm-up runs the shape this rank trains on: its share of a chunk's first SGD step. 16
    sequences a chunk in steps of 4 over 8 ranks: rank 7 takes 1 (its share of the whole chunk would be 2)."""
    a = ttt_args(make_args, TTT_CHUNK_TOKENS="512", TTT_BATCH_SEQS="4")
    rows = []

    def loss_fn(x, y):
        rows.append(x.shape[0])
        raise KeyboardInterrupt  # the warm-up's shape is all this test reads

    model = fresh_model(a)
    val = torch.randint(0, a.vocab_size, (2000,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(KeyboardInterrupt):
        tg.ttt_evaluate(model, model.forward_logits, loss_fn, val, luts, a, H.DistStub(7, 8), lambda msg: None)
    assert rows == [1]


def test_rank_shape_probe_takes_the_steps_of_one_rank_of_8(make_args, luts):
    """A chunk of 16 sequences in steps of TTT_BATCH_SEQS=2 over all ranks: 8 steps an epoch, and one rank of 8
    trains on its share of each step (at least a sequence)."""
    a = ttt_args(make_args, TTT_CHUNK_TOKENS="512")
    model = fresh_model(a)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=a.ttt_lr)
    for p in params:
        p.grad = torch.zeros_like(p)
    rows = []

    def loss_fn(x, y):
        rows.append(x.shape[0])
        return model(x, y)

    val = torch.randint(0, a.vocab_size, (2000,), generator=torch.Generator().manual_seed(0))
    tg.rank_shape_chunk_s(loss_fn, model.forward_logits, opt, val, luts, a, CPU, reps=2)
    assert rows == [1] * (3 * a.ttt_epochs * 8), "the untimed call and 2 timed ones, 2 epochs of 8 steps each"
