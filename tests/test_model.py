"""Model and optimizer of train_gpt.py: partial RoPE + NTK, XSA, SmearGate, causality, U-Net skips, value
embeddings, parameter count, Newton-Schulz, a learning check with the real optimizers, and QAT under
torch.compile (SPEC §3, §4, §6)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tg_helpers as H
import train_gpt as tg

CPU = torch.device("cpu")


randomize = H.randomize


def tiny_model(make_args, seed=0, **knobs):
    a = make_args(**knobs)
    torch.manual_seed(seed)
    return randomize(tg.GPT(a), seed=seed), a


def rand_ids(vocab, shape, seed=0, low=2):
    return torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- RoPE


def test_partial_rope_rotates_only_the_first_dims():
    T, Hh, D, R, base = 12, 3, 16, 8, 10000.0
    cos, sin = tg.rope_tables(T, R, base, 1024, CPU)
    assert cos.shape == sin.shape == (1, T, 1, R // 2)
    x = torch.randn(2, T, Hh, D, generator=torch.Generator().manual_seed(0))
    y = tg.apply_rope(x, cos, sin)
    assert torch.equal(y[..., R:], x[..., R:]), "dims past ROPE_DIMS must pass through untouched"
    h = R // 2
    x1, x2, y1, y2 = x[..., :h], x[..., h:R], y[..., :h], y[..., h:R]
    torch.testing.assert_close(y1 ** 2 + y2 ** 2, x1 ** 2 + x2 ** 2)  # each (j, j + R/2) pair keeps its norm
    torch.testing.assert_close(y[:, 0], x[:, 0])  # angle 0 at position 0
    assert (y[:, 1:, :, :R] - x[:, 1:, :, :R]).abs().amax() > 0.1
    # closed form: theta_{t,j} = t * base^(-2j/R); x1' = x1 cos + x2 sin, x2' = x2 cos - x1 sin
    theta = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-2 * torch.arange(h, dtype=torch.float64) / R)
    c, s = theta.cos()[None, :, None, :].float(), theta.sin()[None, :, None, :].float()
    torch.testing.assert_close(y1, x1 * c + x2 * s)
    torch.testing.assert_close(y2, x2 * c - x1 * s)


def test_rope_scores_depend_only_on_relative_position():
    T, D, R = 10, 16, 16
    cos, sin = tg.rope_tables(T, R, 10000.0, 1024, CPU)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, D, generator=g).expand(1, T, 1, D)
    k = torch.randn(1, 1, 1, D, generator=g).expand(1, T, 1, D)
    scores = tg.apply_rope(q, cos, sin)[0, :, 0] @ tg.apply_rope(k, cos, sin)[0, :, 0].T
    for d in range(-3, 4):
        diag = torch.diagonal(scores, d)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_len, train_len", [(8, 16), (16, 16), (32, 16), (2048, 1024)])
def test_ntk_rescaling_only_beyond_rope_train_seq_len(seq_len, train_len):
    R, base = 16, 10000.0
    cos, sin = tg.rope_tables(seq_len, R, base, train_len, CPU)
    eff = base * (seq_len / train_len) ** (R / (R - 2)) if seq_len > train_len else base
    inv_freq = eff ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    theta = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq
    torch.testing.assert_close(cos[0, :, 0].double(), theta.cos(), atol=2e-4, rtol=0)
    torch.testing.assert_close(sin[0, :, 0].double(), theta.sin(), atol=2e-4, rtol=0)
    # the base actually used, read back from the slowest-but-one frequency at t = 1
    used = float(torch.atan2(sin[0, 1, 0, 1], cos[0, 1, 0, 1])) ** (-R / 2)
    assert used == pytest.approx(eff, rel=1e-4)
    if (seq_len, train_len) == (2048, 1024):
        assert used == pytest.approx(22081.8, rel=1e-4)  # the record's effective base (SPEC §3.7)


def test_model_uses_rope_train_seq_len(make_args):
    ids = rand_ids(1024, (1, 64))  # TRAIN_SEQ_LEN = EVAL_SEQ_LEN = 64
    out = {}
    for train_len in (1024, 64, 32):
        m, _ = tiny_model(make_args, ROPE_TRAIN_SEQ_LEN=str(train_len))
        with torch.no_grad():
            out[train_len] = m.forward_logits(ids)
    assert torch.equal(out[1024], out[64]), "no rescaling while seq_len <= ROPE_TRAIN_SEQ_LEN"
    assert (out[1024] - out[32]).abs().amax() > 1e-4, "seq_len 64 > 32 must rescale the base"


def test_a_position_scores_the_same_in_any_window_that_holds_it(make_args):
    """With the base rescaled (ROPE_TRAIN_SEQ_LEN < TRAIN_SEQ_LEN, as r549), a shorter window (phased TTT pads
    each batch to its longest document) uses the trained length's angles: its logits are those of the full
    window at the same positions."""
    m, a = tiny_model(make_args, ROPE_TRAIN_SEQ_LEN="16")
    ids = rand_ids(a.vocab_size, (2, 64))
    with torch.no_grad():
        full = m.forward_logits(ids)
        for T in (40, 17, 8):
            torch.testing.assert_close(m.forward_logits(ids[:, :T]), full[:, :T], rtol=0, atol=1e-5)


def test_cached_rope_tables_match_and_are_used(make_args):
    # the lengths in use (here 64 and 48 > 32, NTK-rescaled) get their own tables; a shorter window reads the
    # prefix of the shortest table that holds it; a longer one gets its own
    m, a = tiny_model(make_args, TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="48", ROPE_TRAIN_SEQ_LEN="32")
    for T in (64, 48):
        cos, sin = tg.rope_tables(T, m.rot_dims, a.rope_base, 32, CPU)
        assert torch.equal(getattr(m, f"rope_cos_{T}"), cos) and torch.equal(getattr(m, f"rope_sin_{T}"), sin)
    for T, table in ((1, 48), (20, 48), (48, 48), (49, 64), (80, 80)):
        cos, sin = tg.rope_tables(table, m.rot_dims, a.rope_base, 32, CPU)
        got = m.rope(T, CPU)
        assert torch.equal(got[0], cos[:, :T]) and torch.equal(got[1], sin[:, :T]), T
    assert not any(k.startswith("rope_") for k in m.state_dict()), "RoPE tables must not enter the artifact"
    # poison the cached tables: a forward at a cached length (or a prefix of one) must read them, others not
    ids = rand_ids(a.vocab_size, (1, 64))
    with torch.no_grad():
        ref64, ref56, ref20 = m.forward_logits(ids), m.forward_logits(ids[:, :56]), m.forward_logits(ids[:, :20])
        getattr(m, "rope_cos_48").zero_()
        assert torch.equal(m.forward_logits(ids), ref64) and torch.equal(m.forward_logits(ids[:, :56]), ref56)
        assert not torch.allclose(m.forward_logits(ids[:, :20]), ref20)
        getattr(m, "rope_cos_64").zero_()
        assert not torch.allclose(m.forward_logits(ids[:, :56]), ref56)


# ----------------------------------------------------------------------------- XSA


@pytest.mark.parametrize("heads, kv", [(4, 2), (4, 1), (2, 2), (6, 3)])
def test_xsa_removes_own_value_direction_per_kv_group(heads, kv):
    g = torch.Generator().manual_seed(heads * 10 + kv)
    B, T, D = 2, 5, 8
    y = torch.randn(B, T, heads, D, generator=g)
    v = torch.randn(B, T, kv, D, generator=g)
    out = tg.exclusive_self_attention(y, v)
    assert out.shape == y.shape
    group = heads // kv
    for h in range(heads):
        vh = F.normalize(v[:, :, h // group], dim=-1)
        along = (out[:, :, h] * vh).sum(-1)
        assert along.abs().amax() < 1e-5
        ref = y[:, :, h] - (y[:, :, h] * vh).sum(-1, keepdim=True) * vh
        torch.testing.assert_close(out[:, :, h], ref)
        if kv > 1:  # the direction of another group's value is not removed
            other = F.normalize(v[:, :, (h // group + 1) % kv], dim=-1)
            assert (out[:, :, h] * other).sum(-1).abs().amax() > 1e-2


def test_xsa_groups_match_attention_gqa_groups():
    # tg.attention maps query head h to KV head h // (H / KV); XSA must use the same grouping
    B, T, Hh, KV, D = 1, 4, 4, 2, 8
    q = torch.randn(B, T, Hh, D)
    k = torch.randn(B, T, KV, D)
    v = torch.zeros(B, T, KV, D)
    v[:, :, 0] = 1.0
    y = tg.attention(q, k, v)
    torch.testing.assert_close(y[:, :, :2], torch.ones(B, T, 2, D))
    torch.testing.assert_close(y[:, :, 2:], torch.zeros(B, T, 2, D))
    out = tg.exclusive_self_attention(y, v)
    torch.testing.assert_close(out[:, :, :2], torch.zeros(B, T, 2, D), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [0, 1, 2, 4, 9])
def test_xsa_flags_follow_xsa_last_n(make_args, monkeypatch, n):
    L = 4
    m, _ = tiny_model(make_args, NUM_LAYERS=str(L), VE_LAYERS="3", XSA_LAST_N=str(n))
    assert [b.xsa for b in m.blocks] == [i >= L - n for i in range(L)]
    calls = []
    real = tg.exclusive_self_attention
    monkeypatch.setattr(tg, "exclusive_self_attention", lambda y, v: calls.append(1) or real(y, v))
    with torch.no_grad():
        m.forward_logits(rand_ids(1024, (1, 8)))
    assert len(calls) == min(n, L)


# ----------------------------------------------------------------------------- SmearGate and causality


def test_smeargate_never_mixes_across_bos():
    d, T, p = 16, 12, 7
    g = torch.Generator().manual_seed(0)
    sg = tg.SmearGate(d)
    with torch.no_grad():
        sg.gate.copy_(torch.randn(d, generator=g))
    x = torch.randn(2, T, d, generator=g)
    ids = torch.randint(2, 100, (2, T), generator=g)
    ids[:, p] = H.BOS
    ids[1, 0] = H.BOS
    out = sg(x, ids)
    assert torch.equal(out[:, p], x[:, p]), "BOS keeps its own embedding"
    assert torch.equal(out[1, 0], x[1, 0])
    # elsewhere: x_t + sigmoid(g) * (x_{t-1} - x_t), with zeros before position 0
    gate = torch.sigmoid(sg.gate)
    prev = F.pad(x[:, :-1], (0, 0, 1, 0))
    ref = x + gate * (prev - x)
    mask = ids != H.BOS
    torch.testing.assert_close(out[mask], ref[mask])
    # changing everything before the BOS changes nothing from the BOS on
    x2, ids2 = x.clone(), ids.clone()
    x2[:, :p] = torch.randn(2, p, d, generator=g)
    ids2[:, :p] = torch.randint(2, 100, (2, p), generator=g)
    out2 = sg(x2, ids2)
    assert torch.equal(out2[:, p:], out[:, p:])
    # ...whereas without the BOS the previous position leaks in
    ids3 = ids.clone()
    ids3[:, p] = 5
    assert not torch.allclose(sg(x2, ids3)[:, p], sg(x, ids3)[:, p])


def test_model_is_causal(make_args):
    m, a = tiny_model(make_args)
    T = 24
    ids = rand_ids(a.vocab_size, (2, T), seed=3)
    with torch.no_grad():
        ref = m.forward_logits(ids)
        for t in (1, 9, 17, 23):
            ids2 = ids.clone()
            ids2[:, t:] = rand_ids(a.vocab_size, (2, T - t), seed=100 + t)
            assert not torch.equal(ids2[:, t], ids[:, t])
            out = m.forward_logits(ids2)
            torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-6, rtol=1e-6)
            assert (out[:, t] - ref[:, t]).abs().amax() > 1e-3, "a position must depend on its own token"


def test_block_matches_spec_reference(make_args):
    """One block by the formulas of SPEC §3.6-3.9 with separate Q/K/V/O bank slices (GQA, VE, XSA)."""
    m, a = tiny_model(make_args, NUM_LAYERS="4", NUM_HEADS="4", NUM_KV_HEADS="2", VE_LAYERS="3", XSA_LAST_N="1",
                      ROPE_DIMS="8")
    L, d, Hh, KV, hd = 4, 64, 4, 2, 16
    g = torch.Generator().manual_seed(9)
    B, T = 2, 12
    x, x0 = torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)
    ve = torch.randn(B, T, KV * hd, generator=g)
    cos, sin = tg.rope_tables(T, 8, a.rope_base, a.rope_train_seq_len, CPU)
    for i in (2, 3):
        blk = m.blocks[i]
        w = {"q": m.qo_bank[i], "o": m.qo_bank[L + i], "k": m.kv_bank[i], "v": m.kv_bank[L + i],
             "up": m.mlp_up_bank[i], "down": m.mlp_down_bank[i]}
        with torch.no_grad():
            got = blk(x, x0, w, ve, cos, sin)
            f = 1 / math.sqrt(i + 1)
            xin = blk.resid_mix[0] * x + blk.resid_mix[1] * x0
            u = F.rms_norm(xin, (d,)) * f
            q = (u @ m.qo_bank[i].T).view(B, T, Hh, hd)
            k = (u @ m.kv_bank[i].T).view(B, T, KV, hd)
            v = (u @ m.kv_bank[L + i].T + ve).view(B, T, KV, hd)
            q = tg.apply_rope(F.rms_norm(q, (hd,)), cos, sin) * blk.q_gain[:, None]
            k = tg.apply_rope(F.rms_norm(k, (hd,)), cos, sin)
            kk, vv = k.repeat_interleave(Hh // KV, dim=2), v.repeat_interleave(Hh // KV, dim=2)
            att = (q.transpose(1, 2) @ kk.transpose(1, 2).mT) / math.sqrt(hd)
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            y = (att @ vv.transpose(1, 2)).transpose(1, 2)
            if i == 3:  # XSA on the last layer
                vh = F.normalize(vv, dim=-1)
                y = y - (y * vh).sum(-1, keepdim=True) * vh
            xmid = xin + blk.attn_scale * (y.reshape(B, T, d) @ m.qo_bank[L + i].T)
            h = F.leaky_relu(F.rms_norm(xmid, (d,)) * f @ m.mlp_up_bank[i].T, 0.5).square()
            ref = xmid + blk.mlp_scale * (h @ m.mlp_down_bank[i].T)
        assert blk.xsa == (i == 3)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- U-Net skips and value embeddings


def _record_blocks(model):
    ins, outs, ves = {}, {}, {}
    handles = []
    for i, b in enumerate(model.blocks):
        def pre(mod, args, i=i):
            ins[i], ves[i] = args[0].detach().clone(), args[3]
        def post(mod, args, out, i=i):
            outs[i] = out.detach().clone()
        handles.append(b.register_forward_pre_hook(pre))
        handles.append(b.register_forward_hook(post))
    return ins, outs, ves, handles


@pytest.mark.parametrize("L", [4, 5, 11])
def test_unet_skips_are_lifo(make_args, L):
    m, a = tiny_model(make_args, NUM_LAYERS=str(L), VE_LAYERS=str(L - 1), MODEL_DIM="32")
    E = L // 2
    assert m.schedules[False] == m.schedules[True] == (list(range(E)), list(range(E, L)))  # NUM_LOOPS=0
    assert m.skip_weights.shape == (min(E, L - E), 32) and m.skip_gates is None
    ins, outs, _, handles = _record_blocks(m)
    with torch.no_grad():
        m.forward_logits(rand_ids(a.vocab_size, (1, 10)))
    for h in handles:
        h.remove()
    sources = {}
    for i in range(1, L):
        j = i - E
        if 0 <= j < m.skip_weights.size(0):
            src = E - 1 - j  # decoder layer E + j receives encoder layer E - 1 - j
            sources[i] = src
            with torch.no_grad():
                expected = outs[i - 1] + m.skip_weights[j] * outs[src]
            torch.testing.assert_close(ins[i], expected)
            assert (ins[i] - outs[i - 1]).abs().amax() > 1e-3
        else:
            assert torch.equal(ins[i], outs[i - 1]), f"layer {i} must get no skip"
    assert sources == {E + j: E - 1 - j for j in range(min(E, L - E))}
    if L == 11:  # SPEC §3.3: 5 <- 4, 6 <- 3, 7 <- 2, 8 <- 1, 9 <- 0, layer 10 none
        assert sources == {5: 4, 6: 3, 7: 2, 8: 1, 9: 0}


def test_value_embeddings_only_in_ve_layers(make_args):
    m, a = tiny_model(make_args, NUM_LAYERS="4", VE_LAYERS="0,2")
    with torch.no_grad():
        m.ve_layer_scales[0].fill_(0.7)
        m.ve_layer_scales[1].fill_(-1.3)
    ids = rand_ids(a.vocab_size, (1, 10))
    _, outs, ves, handles = _record_blocks(m)
    with torch.no_grad():
        m.forward_logits(ids)
        base = m.ve_shared(ids)
    assert ves[1] is None and ves[3] is None
    torch.testing.assert_close(ves[0], base * 0.7)
    torch.testing.assert_close(ves[2], base * -1.3)
    # changing layer 2's VE scale leaves blocks 0-1 alone and changes block 2
    before = dict(outs)
    with torch.no_grad():
        m.ve_layer_scales[1].fill_(0.0)
        m.forward_logits(ids)
    for h in handles:
        h.remove()
    assert torch.equal(outs[0], before[0]) and torch.equal(outs[1], before[1])
    assert (outs[2] - before[2]).abs().amax() > 1e-3


def test_ve_disabled_injects_nothing(make_args):
    m, a = tiny_model(make_args, NUM_LAYERS="4", VE_LAYERS="0,2", VE_ENABLED="0")
    assert m.ve_shared is None and len(m.ve_layer_scales) == 0
    _, _, ves, handles = _record_blocks(m)
    with torch.no_grad():
        m.forward_logits(rand_ids(a.vocab_size, (1, 6)))
    assert all(v is None for v in ves.values()) and len(ves) == 4


# ----------------------------------------------------------------------------- parameter count


@pytest.mark.parametrize("buckets, expected", [("1536", 26_928_220), ("2048", 26_993_756)])
def test_default_parameter_count(make_args, buckets, expected):
    a = make_args(_tiny=False, RECIPE="r549", BIGRAM_VOCAB_SIZE=buckets)
    with torch.device("meta"):
        m = tg.GPT(a)
    assert sum(p.numel() for p in m.parameters()) == expected  # SPEC §3.1 / Appendix B
    assert H.param_count(a) == expected
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["qo_bank"] == (22, 512, 512) and shapes["kv_bank"] == (22, 256, 512)
    assert shapes["mlp_up_bank"] == (11, 1536, 512) and shapes["mlp_down_bank"] == (11, 512, 1536)
    assert shapes["skip_weights"] == (5, 512) and shapes["ve_shared.proj.weight"] == (256, 128)


@pytest.mark.parametrize("knobs", [
    dict(),
    dict(NUM_LAYERS="5", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="3", VE_LAYERS="0,3,4"),
    dict(NUM_LAYERS="1", VE_LAYERS="0", BIGRAM_VOCAB_SIZE="0"),
    dict(VE_ENABLED="0", SMEAR_ENABLED="0", MLP_MULT="1.5", VOCAB_SIZE="300"),
])
def test_tiny_parameter_count_formula(make_args, knobs):
    a = make_args(**knobs)
    m = tg.GPT(a)
    assert sum(p.numel() for p in m.parameters()) == H.param_count(a)


def test_optimizer_groups_partition_parameters(make_args):
    m, a = tiny_model(make_args)
    adam, muon = tg.build_optimizers(m, a, fused=False)
    assert isinstance(muon, tg.Muon) and [p for g in muon.param_groups for p in g["params"]] == m.banks()
    tables, scalars = adam.param_groups
    assert {id(p) for p in tables["params"]} == {id(m.tok_emb.weight), id(m.bigram.embed.weight),
                                                   id(m.ve_shared.embed.weight)}
    assert tables["lr"] == a.tied_embed_lr and scalars["lr"] == a.scalar_lr
    assert muon.param_groups[0]["lr"] == a.matrix_lr
    all_ids = [id(p) for o in (adam, muon) for g in o.param_groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in m.parameters())  # each parameter exactly once


# ----------------------------------------------------------------------------- Newton-Schulz / Muon


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (4, 48, 96), (3, 96, 40), (2, 128, 128)])
def test_newton_schulz_is_close_to_orthogonal(shape):
    g = torch.Generator().manual_seed(sum(shape))
    G = torch.randn(shape, generator=g)
    if shape[-1] == shape[-2]:  # square Gaussians have near-zero singular values; use a conditioned one
        U, _, V = torch.linalg.svd(G)
        G = U @ torch.diag_embed(torch.linspace(0.05, 3.0, shape[-1]).expand(shape[:-1])) @ V
    X = tg.newton_schulz(G, 5)
    assert X.shape == G.shape and X.dtype == G.dtype
    s_in, s = torch.linalg.svdvals(G), torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())
    assert (s.amax(-1) / s.amin(-1)).max() < 2.0 < (s_in.amax(-1) / s_in.amin(-1)).min()
    # same singular vectors as G: G^T X = V f(S) V^T is symmetric positive semi-definite
    M = G.mT @ X
    torch.testing.assert_close(M, M.mT, atol=1e-3, rtol=1e-3)
    assert torch.linalg.eigvalsh((M + M.mT) / 2).min() > -1e-3


def test_loss_falls_with_real_optimizers(make_args):
    a = make_args(VOCAB_SIZE="64", NUM_LAYERS="2", VE_LAYERS="1", TRAIN_SEQ_LEN="32")
    torch.manual_seed(0)
    m = tg.GPT(a)
    optimizers = tg.build_optimizers(m, a, fused=False)
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(2, 64, (13,), generator=g)  # period 13: learnable from context
    stream = pattern.repeat(40)
    params = list(m.parameters())
    losses = []
    for step in range(30):
        offs = torch.randint(0, len(stream) - 33, (4,), generator=g)
        tok = torch.stack([stream[o:o + 33] for o in offs])
        loss = m(tok[:, :-1], tok[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(64), abs=0.05)  # zero output projections at init
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0], losses
    L = a.num_layers
    assert m.qo_bank[L:].abs().amax() > 0 and m.mlp_down_bank.abs().amax() > 0  # zero-init banks moved (Muon)


def test_muon_first_step_closed_form():
    # SPEC §4.2: buf = g; U = g + mu*buf; W <- W(1 - lr*wd) - lr*max(1, rows/cols)^0.5 * NS5(U)
    g = torch.Generator().manual_seed(5)
    for shape in [(3, 48, 16), (2, 16, 48)]:
        w0 = torch.randn(shape, generator=g)
        grad = torch.randn(shape, generator=g)
        p = torch.nn.Parameter(w0.clone())
        opt = tg.Muon([p], lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1)
        p.grad = grad.clone()
        opt.step()
        k = max(1.0, shape[-2] / shape[-1]) ** 0.5
        expected = w0 * (1 - 0.05 * 0.1) - 0.05 * k * tg.newton_schulz(grad * 1.9, 5)
        torch.testing.assert_close(p.detach(), expected)
        # second step: buf = 0.9*g1 + g2, U = g2 + 0.9*buf
        w1, g2 = p.detach().clone(), torch.randn(shape, generator=g)
        p.grad = g2.clone()
        opt.step()
        buf = 0.9 * grad + g2
        expected = w1 * (1 - 0.05 * 0.1) - 0.05 * k * tg.newton_schulz(g2 + 0.9 * buf, 5)
        torch.testing.assert_close(p.detach(), expected)


# ----------------------------------------------------------------------------- QAT under torch.compile


def test_qat_switch_is_live_in_compiled_forward(make_args):
    """qat=True runs the banks on the export grid, with straight-through gradients to them."""
    torch._dynamo.reset()
    m, a = tiny_model(make_args, VOCAB_SIZE="128", seed=1)
    ids = rand_ids(128, (2, 32), seed=1)
    tgt = rand_ids(128, (2, 32), seed=2)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
    plain_c = compiled(ids, tgt, False)
    qat_c = compiled(ids, tgt, True)  # after the switch: must not reuse the qat=False graph
    fq = copy.deepcopy(m)
    with torch.no_grad():
        for name, bank, family in zip(tg.BANK_NAMES, fq.banks(), tg.BANK_FAMILIES):
            bank.copy_(tg.fake_quant(bank, a, name, family))
        plain_e, qat_e = m(ids, tgt, False), fq(ids, tgt, False)
    torch.testing.assert_close(plain_c, plain_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qat_c, qat_e, atol=1e-5, rtol=1e-5)
    assert (qat_c - plain_c).abs() > 1e-3
    # straight-through: the compiled QAT gradient reaches the banks
    qat_c = compiled(ids, tgt, True)
    qat_c.backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in m.banks())
    assert m.tok_emb.weight.grad.abs().sum() > 0
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- document masking (DOC_MASK)


@pytest.mark.parametrize("recipe", ["r549", "frontier"])
def test_document_mask_makes_packed_documents_independent(make_args, recipe):
    """DOC_MASK=1: the logits of a document packed after others equal those of the document alone (attention
    stays inside BOS-to-BOS spans; RoPE is relative; SmearGate never crosses a BOS). Without the mask they do not."""
    knobs = dict(RECIPE=recipe, BIGRAM_VOCAB_SIZE="0", VE_ENABLED="0", NUM_LAYERS="4", XSA_LAST_N="2")
    if recipe == "frontier":
        knobs.update(LOOP_START="1", LOOP_END="2", PARALLEL_START="3")
    a, plain = make_args(**knobs, DOC_MASK="1"), make_args(**knobs, DOC_MASK="0")
    torch.manual_seed(0)
    m = H.randomize(tg.GPT(a), std=0.05)
    m_plain = tg.GPT(plain)
    m_plain.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(2, a.vocab_size, (n,), generator=g) for n in (9, 14, 7)]
    for d in docs:
        d[0] = tg.BOS_ID
    head = torch.randint(2, a.vocab_size, (5,), generator=g)  # the tail of a document that began earlier
    row = torch.cat([head] + docs)[None]
    with torch.no_grad():
        packed, unmasked = m.forward_logits(row)[0], m_plain.forward_logits(row)[0]
        pos = len(head)
        for d in docs:
            alone = m.forward_logits(d[None])[0]
            torch.testing.assert_close(packed[pos:pos + len(d)], alone, atol=2e-5, rtol=1e-5)
            pos += len(d)
        last = docs[-1]
        assert (unmasked[-len(last):] - m.forward_logits(last[None])[0]).abs().max() > 1e-3
        torch.testing.assert_close(packed[:len(head)], unmasked[:len(head)], atol=2e-5, rtol=1e-5)
    assert "doc_mask" in tg.ARCH_KEYS, "the artifact records it: an eval-only run masks as training did"


def test_document_mask_compiles_in_one_graph_and_trains(make_args):
    a = make_args(DOC_MASK="1", BIGRAM_VOCAB_SIZE="0", VE_ENABLED="0")
    torch.manual_seed(0)
    m = H.randomize(tg.GPT(a), std=0.05)
    ids = torch.randint(2, a.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ids[:, [0, 11, 20]] = tg.BOS_ID
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
    loss = compiled(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(loss, m(ids[:, :-1], ids[:, 1:]), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in m.banks())


def test_flex_document_mask_equals_the_dense_mask(monkeypatch, recwarn):
    """The FlexAttention block mask (the CUDA path; forward only on CPU) gives the dense-mask attention, through
    the fused (compiled) kernel even when the caller runs eagerly."""
    monkeypatch.setattr(torch.nn.attention.flex_attention, "_WARNINGS_SHOWN", set())  # it warns once a process
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 50, (2, 300), generator=g)
    ids[0, [0, 40, 41, 250]] = tg.BOS_ID
    ids[1, [130]] = tg.BOS_ID
    q = torch.randn(2, 300, 4, 8, generator=g)
    k, v = torch.randn(2, 300, 2, 8, generator=g), torch.randn(2, 300, 2, 8, generator=g)
    dense, flex = tg.document_mask(ids, flex=False), tg.document_mask(ids, flex=True)
    assert isinstance(flex, tg.BlockMask) and dense.shape == (2, 1, 300, 300)
    torch.testing.assert_close(tg.attention(q, k, v, flex), tg.attention(q, k, v, dense), atol=1e-5, rtol=1e-5)
    causal = tg.attention(q, k, v)
    assert (tg.attention(q, k, v, flex)[0, 40:] - causal[0, 40:]).abs().max() > 1e-3, "documents are masked"
    assert not [w for w in recwarn if "without torch.compile" in str(w.message)], "the unfused flex kernel ran"
