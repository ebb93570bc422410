"""The fused training kernels (FUSED_CE, FUSED_MLP): their custom ops' forward and hand-written backward against
the eager ops they replace, eager and compiled; the model's loss and gradients with and without them; and the
Triton kernels themselves, run by Triton's CPU interpreter (their bf16 GPU runs are in test_gpu.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tg_helpers as H
import train_gpt as tg


def ce_reference(logits, targets, cap=30.0):
    return F.cross_entropy(cap * torch.tanh(logits.float() / cap), targets)


def mlp_reference(x, up, down):
    return F.linear(F.leaky_relu(F.linear(x, up), 0.5).square(), down)


def loss_and_grads(fn, *inputs):
    out = fn(*inputs)
    loss = out if out.dim() == 0 else (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum()
    return [out.detach(), *torch.autograd.grad(loss, inputs)]


def ce_case(n=37, v=300, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 40).to(dtype).requires_grad_()  # 40: the softcap bends
    return logits, torch.randint(0, v, (n,), generator=g)


def mlp_case(m=70, d=48, hidden=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_() for shape in ((m, d), (hidden, d), (d, hidden))]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_ce_op_equals_cross_entropy_of_softcapped_logits(compiled, dtype):
    logits, targets = ce_case(dtype=dtype)
    fused = lambda z: tg.softcap_ce(z, targets, 30.0)[0].mean()  # noqa: E731
    got = loss_and_grads(torch.compile(fused, fullgraph=True) if compiled else fused, logits)
    want = loss_and_grads(lambda z: ce_reference(z, targets), logits)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[1].dtype == dtype


@pytest.mark.parametrize("compiled", [False, True])
def test_leaky_mlp_op_equals_the_eager_mlp(compiled):
    fused = lambda x, u, d: tg.leaky_mlp(x, u, d)[0]  # noqa: E731
    got = loss_and_grads(torch.compile(fused, fullgraph=True) if compiled else fused, *mlp_case())
    want = loss_and_grads(mlp_reference, *mlp_case())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_model_loss_and_gradients_are_the_same_with_and_without_fused_kernels(make_args):
    knobs = dict(RECIPE="frontier", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1",
                 VOCAB_SIZE="128", LOOP_START="1", LOOP_END="2", PARALLEL_START="3", BIGRAM_VOCAB_SIZE="0")
    ids = torch.randint(0, 128, (2, 65), generator=torch.Generator().manual_seed(0))
    results, calls = {}, {}
    for fused in ("0", "1"):
        torch.manual_seed(0)
        model = H.randomize(tg.GPT(make_args(**knobs, FUSED_CE=fused, FUSED_MLP=fused)), std=0.05)
        with torch.profiler.profile() as prof:
            loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
        calls[fused] = {e.key for e in prof.key_averages()}
        results[fused] = [loss.detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(results["1"], results["0"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert {"pgolf::softcap_ce", "pgolf::leaky_mlp", "pgolf::leaky_mlp_bwd", "pgolf::softcap_ce_bwd"} <= calls["1"]
    assert not any(k.startswith("pgolf::") for k in calls["0"])


def test_fused_mlp_is_training_only_so_calibration_and_scoring_see_the_eager_mlp(make_args):
    """Under no_grad (scoring) or with a Hessian store (GPTQ calibration taps the MLP's inputs) the eager MLP runs."""
    knobs = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", VOCAB_SIZE="128", BIGRAM_VOCAB_SIZE="0",
                 VE_ENABLED="0", XSA_LAST_N="2")
    model = H.randomize(tg.GPT(make_args(**knobs)), std=0.05)
    ids = torch.randint(0, 128, (1, 32))
    store = {}
    model.set_hessian_store(store)
    with torch.profiler.profile() as prof:
        model.hidden(ids)
        with torch.no_grad():
            model.set_hessian_store(None)
            model.forward_logits(ids)
    assert "up.0" in store and "down.1" in store
    assert not any(e.key.startswith("pgolf::leaky_mlp") for e in prof.key_averages())


INTERPRETED = r"""
import sys, torch, torch.nn.functional as F
sys.path[:0] = sys.argv[1:3]
import train_gpt as tg, test_kernels as K
assert tg.use_triton(torch.zeros(1))  # the ops below run the Triton kernels, interpreted on the CPU
for n, v in ((37, 300), (5, 1024)):  # a partial and a full block of the vocabulary
    logits, targets = K.ce_case(n, v)
    got = K.loss_and_grads(lambda z: tg.softcap_ce(z, targets, 30.0)[0].mean(), logits)
    want = K.loss_and_grads(lambda z: K.ce_reference(z, targets), logits)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
for m, d, hidden in ((70, 48, 160), (128, 64, 256), (3, 64, 130)):  # partial tiles along every dim; whole tiles
    got = K.loss_and_grads(lambda x, u, w: tg.leaky_mlp(x, u, w)[0], *K.mlp_case(m, d, hidden))
    want = K.loss_and_grads(K.mlp_reference, *K.mlp_case(m, d, hidden))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
wide, targets = K.ce_case(37, 400)  # strided inputs: a column slice of logits, a transposed MLP input
got = K.loss_and_grads(lambda z: tg.softcap_ce(z[:, :300], targets % 300, 30.0)[0].mean(), wide)
want = K.loss_and_grads(lambda z: K.ce_reference(z[:, :300], targets % 300), wide)
for a, b in zip(got, want):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
x, u, w = K.mlp_case(48, 70, 160)
got = K.loss_and_grads(lambda x, u, w: tg.leaky_mlp(x.T, u, w)[0], x.detach().T.contiguous().requires_grad_(), u, w)
want = K.loss_and_grads(lambda x, u, w: K.mlp_reference(x.T, u, w), x.detach().T.contiguous().requires_grad_(), u, w)
for a, b in zip(got, want):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
print("kernels ok")
"""


def test_triton_kernels_equal_the_eager_ops_in_the_cpu_interpreter():
    pytest.importorskip("triton")
    env = {**H.clean_env(), "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", INTERPRETED, str(H.REPO), os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "kernels ok" in out.stdout, out.stderr[-3000:]
