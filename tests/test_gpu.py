"""GPU-only checks of the CUDA paths (skipped without a GPU; run them on the device):
FlexAttention document masking against the dense-mask path, late QAT in the compiled forward, phased TTT's
dynamic compiled graph, FA4, the fused training kernels in bf16, and the role balance of the export in bf16."""
from __future__ import annotations

import copy

import pytest
import torch

import tg_helpers as H
import train_gpt as tg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
TINY = dict(RECIPE="frontier", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", VOCAB_SIZE="128",
            LOOP_START="1", LOOP_END="2", PARALLEL_START="3", XSA_LAST_N="4", BIGRAM_VOCAB_SIZE="0",
            TRAIN_SEQ_LEN="256", EVAL_SEQ_LEN="256", COMPILE="1")


def packed_ids(B=2, T=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (B, T), generator=g)
    ids[:, torch.randperm(T, generator=g)[:6]] = tg.BOS_ID
    return ids


def test_flex_attention_matches_dense_mask_forward_and_backward():
    ids = packed_ids().to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(2, 256, h, 64, generator=g, device=CUDA, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    assert not isinstance(tg.document_mask(ids), tg.BlockMask), "an eager caller gets the dense mask"
    outs = {}
    for name, mask, fn in (("flex", tg.document_mask(ids, flex=True), torch.compile(tg.attention)),
                           ("dense", tg.document_mask(ids, flex=False), tg.attention)):
        y = fn(q, k, v, mask)
        y.float().square().sum().backward()
        outs[name] = [y.float()] + [t.grad.float().clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
    for got, want in zip(outs["flex"], outs["dense"]):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_document_masked_model_compiles_and_matches_the_cpu_dense_path(make_args):
    a = make_args(**TINY, DOC_MASK="1")
    torch.manual_seed(0)
    cpu = H.randomize(tg.GPT(a), std=0.05)
    gpu = tg.GPT(a).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    ids = packed_ids(T=257)
    want = cpu(ids[:, :-1], ids[:, 1:])
    want.backward()
    got = torch.compile(gpu, dynamic=False, fullgraph=True)(ids[:, :-1].to(CUDA), ids[:, 1:].to(CUDA))
    got.backward()
    torch.testing.assert_close(got.cpu(), want, atol=2e-3, rtol=2e-3)
    for pc, pg in zip(cpu.banks(), gpu.banks()):
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, atol=2e-3, rtol=2e-2)


QAT_KNOBS = {"r549": dict(VOCAB_SIZE="128", TRAIN_SEQ_LEN="256", EVAL_SEQ_LEN="256", COMPILE="1"),
             "frontier": dict(TINY, SDCLIP_BALANCE_BATCHES="0", SDCLIP_COLUMN_ROLES="none")}


@pytest.mark.parametrize("recipe", ["r549", "frontier"])
def test_compiled_late_qat_matches_the_cpu_fake_quantizer(make_args, recipe):
    """qat=True in the inductor-compiled training forward: the banks on the export grid (r549's clip search, the
    frontier's SDClip steps) at QAT_GRID_MULT with SDCLIP_ROLE_MULT, as the CPU's eager fake quantizer puts them,
    and straight-through gradients to the banks."""
    a = make_args(**{**QAT_KNOBS[recipe], "RECIPE": recipe, "QAT_GRID_MULT": "1.2",
                     "SDCLIP_ROLE_MULT": "q=1.3,v=0.7,down=1.1"})
    torch.manual_seed(0)
    cpu = H.randomize(tg.GPT(a), std=0.05)
    quantized = copy.deepcopy(cpu)
    with torch.no_grad():
        for name, bank, family in zip(tg.BANK_NAMES, quantized.banks(), tg.BANK_FAMILIES):
            bank.copy_(tg.fake_quant(bank, a, name, family))
    gpu = tg.GPT(a).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    ids = packed_ids(T=257)
    quantized(ids[:, :-1], ids[:, 1:]).backward()
    cpu(ids[:, :-1], ids[:, 1:]).backward()
    torch.compile(gpu, dynamic=False, fullgraph=True)(ids[:, :-1].to(CUDA), ids[:, 1:].to(CUDA), True).backward()
    for want, plain, got in zip(quantized.banks(), cpu.banks(), gpu.banks()):  # the gradient at the grid's weights
        scale = want.grad.abs().max()
        torch.testing.assert_close(got.grad.cpu(), want.grad, atol=0.01 * scale, rtol=0)
        assert (plain.grad - want.grad).abs().max() > 0.02 * scale, "the unquantized weights' gradient differs"


def test_document_masked_scoring_without_autograd_matches_dense():
    """Scoring runs without autograd, where the compiled flex forward gave wrong attention on torch 2.11 (at
    B 32, T 2048, 8/4 heads of 64): there the mask is dense, and the compiled scores equal the dense path's."""
    B, T = 32, 2048
    g = torch.Generator(device=CUDA).manual_seed(0)
    ids = torch.randint(2, 8192, (B, T), generator=g, device=CUDA)
    ids[torch.rand(B, T, generator=g, device=CUDA) < 1 / 700] = tg.BOS_ID
    q, k, v = (torch.randn(B, T, h, 64, generator=g, device=CUDA, dtype=torch.bfloat16) for h in (8, 4, 4))
    with torch.no_grad():
        assert not isinstance(tg.document_mask(ids), tg.BlockMask)
        got = torch.compile(lambda *a: tg.attention(*a[1:], tg.document_mask(a[0])), dynamic=False,
                            fullgraph=True)(ids, q, k, v)
        want = tg.attention(q[:4].float(), k[:4].float(), v[:4].float(), tg.document_mask(ids[:4], flex=False))
    torch.testing.assert_close(got[:4].float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("doc_mask,targets", [("0", "q,k,v,o,mlp,head"), ("1", "q,k,v,o,mlp,head"),
                                              ("1", "k,o,mlp,head")])
def test_phased_ttt_compiled_on_gpu_matches_eager(make_args, doc_mask, targets):
    """Compiled on the GPU against eager on the GPU, with LoRA steps; and, without LoRA steps, against eager on
    the CPU (whose generator draws other random adapters; the global SGD phases still train). A LoRA LR of 1e-3
    moves scores by up to 0.7 nats here; at 1e-2 this tiny model's TTT is chaotic (compiled and eager runs on
    the CPU drift apart x3 per step)."""
    knobs = dict(TINY, DOC_MASK=doc_mask, TTT_LORA_TARGETS=targets, EVAL_SEQ_LEN="160", TRAIN_SEQ_LEN="160",
                 TTT_LORA_CHUNK="16", TTT_LORA_RANK="4", TTT_PREFIX_DOCS="4", TTT_PHASES="2", TTT_DOC_BATCH="2",
                 TTT_CHUNK_TOKENS="320", TTT_BATCH_SEQS="4", TTT_PHASE_LR="0.01")
    g = torch.Generator().manual_seed(0)
    val = torch.randint(2, 128, (1500,), generator=g)
    val[torch.randperm(1499, generator=g)[:5] + 1] = tg.BOS_ID

    def scores(device, compile_, lr):
        a = make_args(**{**knobs, "COMPILE": compile_, "TTT_LORA_LR": lr})
        torch.manual_seed(0)
        m = H.randomize(tg.GPT(a), std=0.05).to(device)
        dctx = H.DistStub()
        dctx.device = device
        out, _ = tg.phased_ttt_scores(m, val.to(device), a, dctx, lambda msg: None)
        return {k: v.cpu() for k, v in out.items()}

    for (got, want) in ((scores(CUDA, "1", "0.001"), scores(CUDA, "0", "0.001")),
                        (scores(CUDA, "1", "0"), scores(torch.device("cpu"), "0", "0"))):
        for start, nll in want.items():
            torch.testing.assert_close(got[start], nll, atol=5e-2, rtol=2e-2)  # bf16 autocast on the GPU


def test_fa4_attention_matches_sdpa_forward_and_backward_eager_and_compiled():
    fa4 = tg.load_fa4()
    if fa4 is None:
        pytest.skip("flash-attn-4 is not installed")
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(4, 1024, h, 64, generator=g, device=CUDA, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    results = {}
    for name, fn in (("sdpa", tg.attention), ("fa4", fa4), ("fa4 compiled", torch.compile(fa4, fullgraph=True))):
        y = fn(q, k, v)
        y.float().square().sum().backward()
        results[name] = [y.float()] + [t.grad.float().clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
    for name in ("fa4", "fa4 compiled"):
        for got, want in zip(results[name], results["sdpa"]):
            torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_fused_kernels_in_bf16_are_as_accurate_as_the_eager_ops():
    """The Triton kernels at the training widths (rows not a multiple of the tile), against an fp32 reference:
    their error is at most about that of the eager bf16 ops they replace."""
    if tg.triton is None:
        pytest.skip("triton is not installed")
    import test_kernels as K
    g = torch.Generator(device=CUDA).manual_seed(0)
    x, up, down = (torch.randn(*s, generator=g, device=CUDA) / s[-1] ** 0.25 for s in ((4100, 512), (2048, 512), (512, 2048)))
    logits, targets = torch.randn(4100, 8192, generator=g, device=CUDA) * 8, torch.randint(0, 8192, (4100,), device=CUDA)
    cases = ((lambda a, u, d: tg.leaky_mlp(a, u, d)[0], K.mlp_reference, (x, up, down)),
             (lambda z: tg.softcap_ce(z, targets, 30.0)[0].mean(), lambda z: K.ce_reference(z, targets), (logits,)))
    for fused, eager, inputs in cases:
        exact = K.loss_and_grads(eager, *[t.clone().requires_grad_() for t in inputs])
        errors = {}
        for name, fn in (("fused", fused), ("eager", eager)):
            got = K.loss_and_grads(fn, *[t.bfloat16().requires_grad_() for t in inputs])
            errors[name] = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, exact)]
        assert all(f <= 2 * e + 1e-3 for f, e in zip(errors["fused"], errors["eager"])), errors


def test_role_balance_on_the_gpu_measures_what_the_cpu_does(make_args, tiny_data):
    """SDCLIP_BALANCE_BATCHES on CUDA (bf16 autocast, the fused cross-entropy under no_grad): the weights come back
    bit-exact, and each role's loss increase matches the fp32 CPU measurement of the same model and Hessians."""
    knobs = dict(TINY, VOCAB_SIZE="1024", DATA_PATH=str(tiny_data), QUANT_METHOD="gptq", SDCLIP_BALANCE_BATCHES="2",
                 TRAIN_BATCH_TOKENS="8192", MATRIX_BITS="4", EMBED_BITS="5")
    torch.manual_seed(0)
    cpu = H.randomize(tg.GPT(make_args(**knobs)), std=0.08)
    hess, n = tg.collect_hessians(cpu, make_args(**knobs), H.DistStub(), lambda msg: None, 2)
    gaps = {}
    for where, device in (("cpu", torch.device("cpu")), ("gpu", CUDA)):
        a, logs = make_args(**knobs), []
        model = tg.GPT(a).to(device)
        model.load_state_dict(cpu.state_dict())
        model.act_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        before = {k: v.clone() for k, v in model.state_dict().items()}
        stub = H.DistStub()
        stub.device = device
        tg.balance_roles(model, a, stub, logs.append, {k: h.to(device) for k, h in hess.items()}, n)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), where
        fields = logs[0].split("loss_increase ")[1].split(" SDCLIP")[0].split()
        gaps[where] = {kv.split(":")[0]: float(kv.split(":")[1]) for kv in fields}
    scale = max(abs(g) for g in gaps["cpu"].values())
    assert gaps["gpu"] == pytest.approx(gaps["cpu"], abs=0.1 * scale + 1e-3), gaps
