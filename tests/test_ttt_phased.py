"""Phased score-first TTT (TTT_MODE=phased, SPEC §10.6): per-document LoRA in the one forward, document spans,
chunked score-then-step order, global SGD phases, and the legality properties: every target scored once, no
score depends on a later token of its document or on a document scored after it, LoRA reset per batch (A kept
within a phase with TTT_WARM_START_A), and 2 ranks equal 1."""
from __future__ import annotations

import re
import time

import pytest
import torch
import torch._dynamo.testing

import tg_helpers as H
import train_gpt as tg

BOS = 1
TINY = dict(RECIPE="frontier", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", VOCAB_SIZE="128",
            LOOP_START="1", LOOP_END="2", PARALLEL_START="3", XSA_LAST_N="4", BIGRAM_VOCAB_SIZE="0",
            EVAL_SEQ_LEN="32", TRAIN_SEQ_LEN="32", TTT_DOC_BATCH="3", TTT_LORA_CHUNK="8", TTT_LORA_RANK="4",
            TTT_LORA_LR="0.01", TTT_PREFIX_DOCS="5", TTT_PHASES="2", TTT_CHUNK_TOKENS="64", TTT_BATCH_SEQS="2",
            TTT_PHASE_LR="0.01", COMPILE="0")


def stream(n=700, docs=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    val = torch.randint(2, 128, (n,), generator=g)
    val[torch.randperm(n - 1, generator=g)[:docs] + 1] = BOS  # position 0 is no BOS: a leading partial document
    return val


def setup(make_args, **knobs):
    a = make_args(**{**TINY, **knobs})
    torch.manual_seed(0)
    return a, H.randomize(tg.GPT(a), std=0.05)


def scores(make_args, val, **knobs):
    a, m = setup(make_args, **knobs)
    logs = []
    out, timing = tg.phased_ttt_scores(m, val, a, H.DistStub(), logs.append)
    assert timing["warm_s"] < 0.01  # COMPILE=0: nothing to warm up
    return out, logs, a


def token_scores(out):
    """Stream position of each target -> its NLL."""
    return {s + 1 + i: v for s, nll in out.items() for i, v in enumerate(nll.tolist())}


def test_document_spans_cover_every_target_once():
    val = stream()
    spans = tg.document_spans(val)
    assert spans[0][0] == 0 and val[0] != BOS, "a stream that does not start with BOS gets a leading document"
    assert all(val[s] == BOS for s, _ in spans[1:])
    targets = [s + 1 + i for s, n in spans for i in range(n)]
    assert targets == list(range(1, val.numel())), "each target in exactly one document, in order"
    assert all(val[s + n] == BOS for s, n in spans[:-1]), "a document's last target is the next BOS"


def test_every_target_is_scored_once_and_the_sums_are_consistent(make_args):
    val = stream()
    out, logs, a = scores(make_args, val)
    assert sorted(token_scores(out)) == list(range(1, val.numel()))
    luts = (torch.arange(128, dtype=torch.int16) % 3 + 1, torch.zeros(128, dtype=torch.bool),
            torch.zeros(128, dtype=torch.bool))
    _, m = setup(make_args)
    loss, bpb, _ = tg.phased_ttt_evaluate(m, val, luts, a, H.DistStub(), logs.append)
    nll = torch.cat(list(out.values()))
    assert loss == pytest.approx(nll.mean().item(), rel=1e-6)
    nbytes = tg.target_bytes(val[:-1], val[1:], luts).sum().item()
    assert bpb == pytest.approx(nll.sum().item() / nbytes / torch.log(torch.tensor(2.0)).item(), rel=1e-6)


def test_without_steps_each_document_is_scored_alone_with_full_softmax(make_args):
    """LoRA LR 0 and no phases: every score is -log softmax over the whole vocabulary of the base model on the
    document's own tokens: the window of a chunk ends at the chunk's end and reaches back at most EVAL_SEQ_LEN."""
    val = stream()
    out, _, a = scores(make_args, val, TTT_LORA_LR="0", TTT_PREFIX_DOCS="0")
    _, m = setup(make_args)
    L, C = a.eval_seq_len, a.ttt_lora_chunk
    for s, n in tg.document_spans(val):
        for p in (0, n // 2, n - 1):
            lo = max(0, min((p // C + 1) * C, n) - L)
            with torch.no_grad():
                logits = m.forward_logits(val[s + lo:s + p + 1][None].long())[0, -1]
            want = -torch.log_softmax(logits.double(), -1)[val[s + p + 1]].item()
            assert out[s][p].item() == pytest.approx(want, abs=2e-5), (s, p)


def test_past_the_deadline_batches_are_scored_without_adapting(make_args):
    """TTT_DEADLINE_SECONDS: once the deadline has passed, a rank's remaining batches take no LoRA step and
    score EVAL_SEQ_LEN predictions per forward: for documents that fit one window that is exactly the score
    without adaptation; the phases still run, and a deadline not reached changes nothing."""
    val = stream(n=500, docs=0)
    val[torch.arange(0, 500, 25)] = BOS  # documents of 25 predictions: each fits one window of 32
    frozen, _, _ = scores(make_args, val, TTT_LORA_LR="0", TTT_PREFIX_DOCS="0")
    adapted, _, _ = scores(make_args, val, TTT_PREFIX_DOCS="0")
    assert any(not torch.allclose(adapted[k], frozen[k]) for k in frozen), "LoRA steps change some scores"
    a, m = setup(make_args, TTT_PREFIX_DOCS="0")
    logs = []
    late, timing = tg.phased_ttt_scores(m, val, a, H.DistStub(), logs.append, deadline=0.0)
    assert any(ln.startswith("ttt_phased:deadline reached at batch 1/") for ln in logs), logs
    assert timing["unadapted_docs"] == len(frozen)
    for k in frozen:
        torch.testing.assert_close(late[k], frozen[k], rtol=1e-5, atol=1e-5)
    a, m = setup(make_args)
    with_phases, _, _ = scores(make_args, val)
    logs = []
    on_time, timing = tg.phased_ttt_scores(m, val, a, H.DistStub(), logs.append, deadline=time.perf_counter() + 3600)
    assert not any("deadline" in ln for ln in logs) and timing["unadapted_docs"] == 0
    for k in with_phases:
        torch.testing.assert_close(on_time[k], with_phases[k], rtol=0, atol=0)


def test_the_deadline_applies_on_eight_gpus_only(make_args):
    dctx = H.DistStub()
    for world, seconds, want in ((8, "540", 1540.0), (1, "540", None), (2, "540", None), (8, "0", None)):
        dctx.world_size = world
        assert tg.ttt_deadline(make_args(**TINY, TTT_DEADLINE_SECONDS=seconds), dctx, 1000.0) == want


@pytest.mark.tg_runs("smoke")
def test_the_deadline_clock_starts_before_the_work_after_the_training_cap(tg_runs, make_args, monkeypatch):
    """The diagnostic, the checkpoint write and the export run after the training cap, before the evaluation
    proper: the deadline's clock starts before them."""
    run = tg_runs("smoke")
    knobs = {k: v for k, v in run.env.items() if k in H.KNOBS}
    a = make_args(**dict(knobs, EVAL_ONLY_PATH=str(run.artifact), TTT_MODE="phased", EVAL_STRIDE="64"))
    val, luts = tg.load_eval_data(a, H.DistStub(), lambda msg: None)
    seen = {}

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tg, "ttt_deadline", lambda args, dctx, start: seen.setdefault("start", start))
    monkeypatch.setattr(tg, "phased_ttt_evaluate", stop)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        tg.final_evaluation(a, H.DistStub(), lambda msg: None, val, luts,
                            {"diagnostic_s": 100.0, "checkpoint_s": 20.0, "export_s": 3.0})
    assert t0 - 123.0 <= seen["start"] <= time.perf_counter() - 123.0


@pytest.mark.parametrize("prefix", ["0", "5"])
def test_no_score_depends_on_a_later_token_or_a_later_document(make_args, prefix):
    """Change one token: scores of every document processed before its document are unchanged, and so are the
    scores of its own document's earlier targets (across LoRA steps and, with a prefix, global phases)."""
    val = stream()
    base, _, a = scores(make_args, val, TTT_PREFIX_DOCS=prefix)
    order = sorted(tg.document_spans(val), key=lambda d: -d[1])  # the queue: longest first
    per = a.ttt_doc_batch
    for k in (1, 4, len(order) - 2):
        s, n = order[k]
        t = s + 1 + n // 2  # a token inside document k
        changed = val.clone()
        changed[t] = 2 + (changed[t] - 1) % 126
        if changed[t] == BOS or val[t] == BOS:
            continue
        again, _, _ = scores(make_args, changed, TTT_PREFIX_DOCS=prefix)
        for j, (s2, n2) in enumerate(order):
            if j // per < k // per or (j // per == k // per and j != k):  # before it, or in its batch (independent)
                assert torch.equal(again[s2], base[s2]), (k, j)
        assert torch.equal(again[s][:t - s - 1], base[s][:t - s - 1]), "earlier targets of the same document"
        assert not torch.equal(again[s], base[s])


def changed_first_document(val):
    """The queue's first (longest) document with every token but its BOS tokens changed."""
    order = sorted(tg.document_spans(val), key=lambda d: -d[1])
    s0, n0 = order[0]
    changed = val.clone()
    changed[s0 + 1:s0 + n0] = torch.where(changed[s0 + 1:s0 + n0] == BOS, BOS, 2 + (changed[s0 + 1:s0 + n0] % 120))
    return order, changed


def test_lora_is_reset_between_document_batches(make_args):
    """Without phases and warm start, a batch's scores do not depend on any other batch (the adapters and
    AdamW state start fresh); with LoRA steps, later chunks of a document do change."""
    val = stream()
    base, _, a = scores(make_args, val, TTT_PREFIX_DOCS="0", TTT_WARM_START_A="0")
    order, changed = changed_first_document(val)
    s0, n0 = order[0]
    again, _, _ = scores(make_args, changed, TTT_PREFIX_DOCS="0", TTT_WARM_START_A="0")
    for s, n in order[a.ttt_doc_batch:]:
        assert torch.equal(again[s], base[s])
    frozen, _, _ = scores(make_args, val, TTT_PREFIX_DOCS="0", TTT_LORA_LR="0")
    assert torch.equal(frozen[s0][:a.ttt_lora_chunk], base[s0][:a.ttt_lora_chunk]), "first chunk: no step yet"
    assert not torch.equal(frozen[s0], base[s0]), "the LoRA steps change later chunks"


def test_warm_start_keeps_a_and_zeroes_b(make_args):
    a, _ = setup(make_args)
    lora = tg.LoRA(a, 2, 3)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(1.0)
    A = {k: v.clone() for k, v in lora.A.items()}
    lora.reset(7, warm=True)
    assert all(torch.equal(lora.A[k], A[k]) for k in A) and all(not b.any() for b in lora.B.values())
    lora.reset(7)
    assert all(not torch.equal(lora.A[k], A[k]) for k in A)


def test_warm_a_carries_over_within_a_phase_only(make_args):
    """TTT_WARM_START_A=1: a rank's later batches learn from the A its earlier batches trained (so their scores
    depend on the first batch's document), unless a phase lies between them (A is drawn afresh there)."""
    val = stream()
    order, changed = changed_first_document(val)
    per = int(TINY["TTT_DOC_BATCH"])
    for prefix, phase_between in (("0", False), (str(per), True)):
        knobs = dict(TTT_PREFIX_DOCS=prefix, TTT_PHASES="1", TTT_PHASE_LR="0")  # a phase that moves no weight
        base, _, _ = scores(make_args, val, **knobs)
        again, _, _ = scores(make_args, changed, **knobs)
        moved = [not torch.equal(again[s], base[s]) for s, _ in order[per:]]  # the same slot's A: some move
        assert not any(moved) if phase_between else any(moved), prefix


def test_phases_are_timed_apart_and_probed_at_one_rank_of_8(make_args):
    """The global phases' seconds are timed apart; on fewer than 8 ranks the projection (ttt_apart) replaces
    them by FineWeb's phase steps at the step time probed at one rank of 8, and logs it; no phase, no probe."""
    val = stream()
    for prefix in ("5", "0"):
        a, m = setup(make_args, TTT_PREFIX_DOCS=prefix)
        _, timing = tg.phased_ttt_scores(m, val, a, H.DistStub(), [].append)
        assert timing["loop_s"] >= timing["phase_s"] and (timing["phase_s"] > 0) == (prefix != "0")
        logs = []
        measured, projected = tg.ttt_apart(m, val, timing, a, H.DistStub(), 10 ** 6, logs.append)
        assert measured == timing["phase_s"] and (projected > 0) == (prefix != "0") == bool(logs)
        if logs:
            steps = tg.fineweb_phase_chunks(sorted((n for _, n in tg.document_spans(val)), reverse=True), a, 10 ** 6)
            assert re.match(rf"eval_projection rank_shape steps:{steps} step_s:\S+ projected_8gpu_s:", logs[0])
        assert tg.ttt_apart(m, val, timing, a, H.DistStub(world_size=8), 10 ** 6, logs.append) == (0.0, 0.0)


def test_phases_fall_after_the_prefix_parts(make_args):
    val = stream(docs=20)
    _, logs, a = scores(make_args, val, TTT_PREFIX_DOCS="7", TTT_PHASES="2", TTT_DOC_BATCH="3")
    start = next(ln for ln in logs if ln.startswith("ttt_phased:start"))
    assert "prefix_docs=7 phase_ends_batches=[2, 3]" in start  # 3.5 docs -> batch 2 (6 docs), 7 docs -> batch 3
    assert tg.phase_ends(20, a) == [2, 3] and tg.phase_ends(7, a) == [2], "none after the last batch"
    phases = [int(re.search(r"docs=(\d+)", ln)[1]) for ln in logs if ln.startswith("ttt_phase: ")]
    assert phases == [6, 9], "global SGD on every document scored so far"
    progress = [ln.split("]")[0] for ln in logs if ln.startswith("  ttt_phased [")]
    assert progress == ["  ttt_phased [2/7", "  ttt_phased [3/7", "  ttt_phased [7/7"]
    batches = [re.search(r"batches:(\d+)/7 elapsed:[\d.]+s eta:[\d.]+s$", ln)[1] for ln in logs
               if ln.startswith("eval_progress phase:ttt_phased ")]
    assert batches == [str(b) for b in range(1, 8)], "a progress line with ETA after every batch (7 < 20)"


def test_phases_train_the_base_model_between_batches(make_args):
    val = stream()
    no_phase, _, _ = scores(make_args, val, TTT_PREFIX_DOCS="0", TTT_LORA_LR="0")
    phased, _, a = scores(make_args, val, TTT_PREFIX_DOCS="3", TTT_PHASES="1", TTT_LORA_LR="0")
    order = sorted(tg.document_spans(val), key=lambda d: -d[1])
    for j, (s, n) in enumerate(order):
        same = torch.equal(phased[s], no_phase[s])
        assert same == (j < a.ttt_doc_batch), j  # the first batch precedes the phase; all later ones follow it


def test_a_phase_trains_only_on_scored_targets_of_its_documents(make_args, monkeypatch):
    """The phase's stream: its targets are the documents' targets, in queue order, each once (none is a
    document's leading BOS, which the document before it scores, or the set's first token, which nothing
    scores), and each input the document's own, except that the leading document without a BOS reads its first
    target after the BOS that ends the document before it."""
    val = stream()
    a, m = setup(make_args)
    order = sorted(tg.document_spans(val), key=lambda d: -d[1])
    whole = [d for d in order if d[0] != 0]
    docs = whole[:4] + [(0, tg.document_spans(val)[0][1])] + whole[4:6]
    seen = []
    monkeypatch.setattr(tg, "ttt_train_chunk", lambda model, loss_fn, opt, params, stream, *rest, **kw:
                        seen.append(stream))
    tg.ttt_phase(m, val, docs, a, H.DistStub(), lambda msg: None)
    pairs = list(zip(seen[0][:-1].tolist(), seen[0][1:].tolist()))
    own = [(int(val[s + i]), int(val[s + i + 1])) for s, n in docs for i in range(n)]
    assert len(pairs) == len(own) and val[0] != BOS
    lead = sum(n for _, n in docs[:4])
    assert [i for i, (p, o) in enumerate(zip(pairs, own)) if p != o] == [lead] and pairs[lead] == (BOS, own[lead][1])


def test_scoring_rows_build_no_document_mask(make_args, monkeypatch):
    """A scored row holds one document (from its BOS, padded after its end), so with DOC_MASK=1 the causal mask
    is already the document mask: scoring builds none (a block mask of each window shape would reach the compiled
    blocks) and scores as DOC_MASK=0 does."""
    val = stream(n=500, docs=6)
    plain, _, _ = scores(make_args, val, TTT_PREFIX_DOCS="0")
    built, real = [], tg.document_mask
    monkeypatch.setattr(tg, "document_mask", lambda ids, flex=None: built.append(ids.shape) or real(ids, flex))
    masked, _, _ = scores(make_args, val, TTT_PREFIX_DOCS="0", DOC_MASK="1")
    assert built == [] and masked.keys() == plain.keys()
    assert all(torch.equal(masked[k], plain[k]) for k in plain)


def test_lora_delta_is_per_document_and_starts_at_zero(make_args):
    a, m = setup(make_args)
    lora = tg.LoRA(a, 2, 7)
    lora.reset(0)
    x = torch.randn(2, 5, a.model_dim)
    assert torch.equal(tg.lora_delta(x, lora.adapter("q3", 2)), torch.zeros(2, 5, a.model_dim))
    with torch.no_grad():
        lora.B["q3"][1].normal_()
    d = tg.lora_delta(x, lora.adapter("q3", 2))
    assert torch.equal(d[0], torch.zeros(5, a.model_dim)) and d[1].abs().sum() > 0
    ids = torch.randint(2, 128, (2, 16))
    fresh = tg.LoRA(a, 2, len(sum(m.schedules[True], [])))
    fresh.reset(1)
    with torch.no_grad():
        assert torch.equal(m.forward_logits(ids, lora=fresh), m.forward_logits(ids)), "B = 0: no change"


def test_lora_targets_choose_the_adapted_matrices(make_args):
    """TTT_LORA_TARGETS=k,o: adapters on k and o only, each of them changes the forward once B is nonzero, and
    TTT with them adapts (scores differ from no steps and from all targets); a wrong name is refused."""
    a, m = setup(make_args, TTT_LORA_TARGETS="k,o")
    layers = len(sum(m.schedules[True], []))
    lora = tg.LoRA(a, 2, layers)
    assert sorted(lora.A) == sorted(f"{n}{j}" for n in "ko" for j in range(layers))
    assert lora.adapter("head", 2) is None and set(lora.layer(0, 2)) == {"k", "o"}
    ids = torch.randint(2, 128, (2, 16))
    with torch.no_grad():
        base = m.forward_logits(ids, lora=lora)
        assert torch.equal(base, m.forward_logits(ids))
        for key in ("k1", "o1"):
            lora.B[key].normal_()
            assert not torch.equal(m.forward_logits(ids, lora=lora), base), key
            lora.B[key].zero_()
    val = stream()
    pick = lambda out: torch.cat([out[k] for k in sorted(out)])
    ko = pick(scores(make_args, val, TTT_LORA_TARGETS="k,o", TTT_PREFIX_DOCS="0")[0])
    frozen = pick(scores(make_args, val, TTT_LORA_TARGETS="k,o", TTT_PREFIX_DOCS="0", TTT_LORA_LR="0")[0])
    every = pick(scores(make_args, val, TTT_PREFIX_DOCS="0")[0])
    assert not torch.equal(ko, frozen) and not torch.equal(ko, every)
    with pytest.raises(SystemExit, match="TTT_LORA_TARGETS must name some of q,k,v,o,mlp,head"):
        make_args(**{**TINY, "TTT_LORA_TARGETS": "k,up"})


@pytest.mark.tg_runs("phased_1p", "phased_2p")
def _claim_worker(rank, port, out):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dctx = tg.Dist()
    mine = []
    for start, end in ((0, 40), (40, 45), (45, 45)):
        for i in dctx.claim(start, end):
            mine.append(i)
            time.sleep(0.02 if rank == 0 else 0.002)  # rank 0's work items are slower
        torch.distributed.barrier()
    torch.save(mine, f"{out}/{rank}.pt")
    dctx.close()


def test_claimed_batches_go_to_exactly_one_rank_and_free_ranks_take_more(tmp_path):
    """Dist.claim: each index of each range to exactly one rank, whichever asks first (a counter in the process
    group's store), so the faster rank scores more batches; ranges claimed one after another do not mix."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_claim_worker, args=(port, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert sorted(a + b) == list(range(45)) and not set(a) & set(b)
    assert len(b) > 2 * len(a), (a, b)


def test_two_process_phased_ttt_matches_one_process(tg_runs):
    one, two = tg_runs("phased_1p"), tg_runs("phased_2p")
    for r in (one, two):
        assert r.rc == 0, r.describe()
        assert "ttt_phased:start" in r.log and "ttt_phase: docs=" in r.log
    v1, v2 = H.exact(one.log, "legal_ttt_exact"), H.exact(two.log, "legal_ttt_exact")
    assert v2[0] == pytest.approx(v1[0], rel=1e-5) and v2[1] == pytest.approx(v1[1], rel=1e-5)


@pytest.fixture
def compile_counters(monkeypatch):
    """torch.compile counting the graphs each compiled function builds (one counter per call, in order)."""
    counters, real = [], torch.compile

    def counted(fn, **kw):
        counters.append(torch._dynamo.testing.CompileCounter())
        return real(fn, backend=counters[-1], **kw)

    monkeypatch.setattr(torch, "compile", counted)
    torch._dynamo.reset()
    tg.compiled_block_forwards.cache_clear()
    yield counters
    tg.compiled_block_forwards.cache_clear()


def test_window_lengths_are_multiples_of_64_that_fit():
    assert [tg.window_bucket(n, 2048) for n in (1, 64, 65, 300, 1025, 2048)] == [64, 64, 128, 320, 1088, 2048]
    assert tg.window_bucket(90, 96) == 96


def test_compiled_blocks_serve_every_window_length(make_args, compile_counters):
    """COMPILE=1: the warm-up compiles the block graphs, dynamic in the window length and the number of rows
    (a graph per length, or one of the whole model, cost minutes on a GPU); nothing compiles in the loop (the global SGD phases run
    eager), and the scores equal the eager ones."""
    knobs = dict(EVAL_SEQ_LEN="160", TTT_LORA_CHUNK="16", TTT_PREFIX_DOCS="8", TTT_PHASES="2", TTT_DOC_BATCH="4",
                 TTT_CHUNK_TOKENS="320", TTT_BATCH_SEQS="4")
    val = stream(n=1500, docs=9)
    lens = sorted((n for _, n in tg.document_spans(val)), reverse=True)
    rows = {max(2, sum(m > c for m in lens[b:b + 4])) for b in range(0, len(lens), 4) for c in range(0, lens[b], 16)}
    assert len(rows) == 3, f"batches run 2, 3 and 4 rows (unfinished documents): {rows}"
    eager, _, _ = scores(make_args, val, **knobs)
    a, m = setup(make_args, COMPILE="1", **knobs)
    logs = []
    got, _ = tg.phased_ttt_scores(m, val, a, H.DistStub(), logs.append)
    lengths = {tg.window_bucket(min(c + 16, n), 160) for _, n in tg.document_spans(val) for c in range(0, n, 16)}
    assert len(lengths) >= 3, lengths
    phases = [ln for ln in logs if ln.startswith("ttt_phase: ")]
    assert len(phases) == 2 and all("chunks=1 " not in ln for ln in phases), phases  # phases of several chunks
    # regional compilation: Block.forward and Block.forward_lanes, each with at most two input variants (the
    # first layer's input needs no grad; the first lanes layer gets one tensor for both lanes), dynamic at once
    assert len(compile_counters) == 2 and all(1 <= c.frame_count <= 2 for c in compile_counters), \
        f"graphs {[c.frame_count for c in compile_counters]} for window lengths {sorted(lengths)}, rows {rows}"
    assert not any({"forward", "forward_lanes"} & set(b.__dict__) for b in m.blocks), "blocks eager after scoring"
    assert "ttt_phased:graphs_compiled_in_loop=0" in logs, "the log says that nothing compiled in the timed loop"
    assert got.keys() == eager.keys()
    for k in got:
        torch.testing.assert_close(got[k], eager[k], rtol=1e-4, atol=1e-4)


def test_a_chunk_runs_only_the_rows_of_unfinished_documents(make_args):
    """Batches are longest first, so a chunk's unfinished documents are a prefix of the batch: only those rows
    (at least 2) go through the forward, and scores do not depend on the finished rows."""
    a, m = setup(make_args, TTT_DOC_BATCH="4", TTT_PREFIX_DOCS="0", TTT_LORA_CHUNK="8")
    val = stream(n=900, docs=11)
    rows, forward = [], m.forward_logits

    def recording(ids, **kw):
        rows.append(ids.size(0))
        return forward(ids, **kw)

    m.forward_logits = recording
    out, _ = tg.phased_ttt_scores(m, val, a, H.DistStub(), lambda msg: None)
    lens = sorted((n for _, n in tg.document_spans(val)), reverse=True)
    want = [max(2, sum(n > c for n in lens[b:b + 4])) for b in range(0, len(lens), 4) for c in range(0, lens[b], 8)]
    assert rows == want and min(rows) == 2 and max(rows) == 4
    assert sum(v.numel() for v in out.values()) == val.numel() - 1


def test_logits_of_selected_positions_equal_the_full_logits_there(make_args):
    a, m = setup(make_args)
    x = torch.randint(2, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    sel = torch.tensor([[0, 5, 39], [1, 1, 2], [38, 0, 7]])
    with torch.no_grad():
        full, part = m.forward_logits(x), m.forward_logits(x, select=sel)
    assert part.shape == (3, 3, a.vocab_size)
    torch.testing.assert_close(part, full.gather(1, sel[..., None].expand(-1, -1, a.vocab_size)))


def test_compiled_lora_forward_matches_eager(make_args):
    """The phased scorer compiles the one forward with the adapters as an argument (fullgraph): same logits
    and the same adapter gradients as eager."""
    a, m = setup(make_args)
    for p in m.parameters():
        p.requires_grad_(False)
    lora = tg.LoRA(a, 3, len(sum(m.schedules[True], [])))
    lora.reset(0)
    with torch.no_grad():
        for B in lora.B.values():
            B.normal_(std=0.02)
    x = torch.randint(2, 128, (3, 64), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(m.forward_logits, backend="aot_eager", fullgraph=True, dynamic=False)
    eager = m.forward_logits(x, lora=lora)
    eager.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in lora.named_parameters()}
    lora.zero_grad()
    got = compiled(x, lora=lora)
    got.square().mean().backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for k, p in lora.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6)


def test_lora_chunk_longer_than_the_window_is_refused(make_args):
    with pytest.raises(SystemExit, match="TTT_LORA_CHUNK must be <= EVAL_SEQ_LEN"):
        make_args(**{**TINY, "TTT_MODE": "phased", "TTT_LORA_CHUNK": "40"})


@pytest.mark.tg_runs("phased_train", "phased_train_eval")
def test_eval_only_reproduces_the_in_run_phased_ttt_score(tg_runs):
    run, again = tg_runs("phased_train"), tg_runs("phased_train_eval")
    assert run.rc == 0 and again.rc == 0, again.describe()
    assert "config TTT_MODE=phased" in run.log.splitlines() and "eval_only:" in again.log
    assert H.exact(again.log, "legal_ttt_exact") == H.exact(run.log, "legal_ttt_exact")
    assert "summary score val_bpb:" in run.log and "phase:legal_ttt" in run.log
