"""tunepipe.lm_head: the same log-probs, entropy, top-1 flags and gradients as TRL's chunked LM head."""

import pytest
import torch

import tunepipe.lm_head as lm_head

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what TRL's DPO asks for


def inputs(n=150, hidden=24, vocab=700, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    b = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::3] = (h @ w.t() + (0 if b is None else b)).argmax(-1)[::3]  # some predicted right: is_top1 True
    return h, w, b, targets


def run(fn, h, w, b, targets, entropy_weight=0.3):
    """Outputs and the gradients of a loss that uses both the log-probs and the entropy."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (h, w, b)]
    out = fn(*leaves, targets)
    loss = -out[0].mean() + (entropy_weight * out[1].mean() if entropy_weight else 0)
    loss.backward()
    return out, [t.grad if t is not None else None for t in leaves]


def trl(h, w, b, targets):
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(h, w, b, targets, 1.0, 256, None, 1.0, OUTPUTS)


def ours(h, w, b, targets):
    return lm_head.TiledLogProbs.apply(h, w, b, targets, OUTPUTS)


@pytest.mark.parametrize("bias", [False, True])
def test_outputs_and_gradients_match_trls_over_several_tiles(monkeypatch, bias):
    monkeypatch.setattr(lm_head, "TOKENS", 64)  # 150 tokens: three tiles, the last one short
    h, w, b, targets = inputs(bias=bias)
    (lp, ent, _, mean, top1), grads = run(ours, h, w, b, targets)
    (lp_t, ent_t, _, mean_t, top1_t), grads_t = run(trl, h, w, b, targets)
    assert torch.allclose(lp, lp_t, atol=1e-5) and torch.allclose(ent, ent_t, atol=1e-5)
    assert torch.allclose(mean, mean_t, atol=1e-5) and not mean.requires_grad
    assert torch.equal(top1, top1_t) and top1.any()
    for ours_grad, trl_grad in zip(grads, grads_t):
        if trl_grad is not None:
            assert torch.allclose(ours_grad, trl_grad, atol=1e-6)
    # and against plain autograd over the whole logits
    logits = h @ w.t() + (b if bias else 0)
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0], atol=1e-5)


def test_log_probs_alone_give_the_gradient_of_the_log_probs():
    h, w, b, targets = inputs()
    _, grads = run(lambda *a: lm_head.TiledLogProbs.apply(*a, ("log_probs",)), h, w, b, targets, entropy_weight=0)
    leaf = h.clone().requires_grad_()
    (-torch.log_softmax(leaf @ w.t(), -1).gather(-1, targets[:, None]).mean()).backward()
    assert torch.allclose(grads[0], leaf.grad, atol=1e-6)


def test_top1_counts_only_the_first_of_tied_maxima():
    h = torch.eye(2, 4)[[0, 0]]
    w = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 0]])  # tokens 0 and 1 tie for the top
    top1 = lm_head.TiledLogProbs.apply(h, w, None, torch.tensor([0, 1]), OUTPUTS)[4]
    assert top1.tolist() == [True, False]


def test_under_bf16_autocast_it_stays_close_to_trls():
    h, w, b, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (lp, ent, *_), grads = run(ours, h, w, b, targets)
        (lp_t, ent_t, *_), grads_t = run(trl, h, w, b, targets)
    assert lp.dtype == torch.float32 and grads[0].dtype == torch.float32
    assert torch.allclose(lp, lp_t, atol=2e-2) and torch.allclose(ent, ent_t, atol=2e-2)
    assert torch.allclose(grads[0], grads_t[0], atol=1e-3, rtol=0.05)


def test_use_tiled_log_probs_routes_only_what_it_computes(monkeypatch):
    from trl.trainer import utils

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", utils._ChunkedLogProbFunction)
    calls = []
    monkeypatch.setattr(lm_head.TiledLogProbs, "apply", staticmethod(lambda *a: calls.append("ours")))
    lm_head.use_tiled_log_probs()
    lm_head.use_tiled_log_probs()  # idempotent: one wrapper
    dispatch = utils._ChunkedLogProbFunction
    assert dispatch.tiled and not getattr(dispatch.plain, "tiled", False)
    h, w, b, targets = inputs(n=4)
    dispatch.apply(h, w, b, targets, 1.0, 256, None, 1.0, OUTPUTS)
    assert calls == ["ours"]
    for temperature, softcap, outputs in [(0.7, None, OUTPUTS), (1.0, 30.0, OUTPUTS), (1.0, None, ("log_sum_sq_probs",))]:
        out = dispatch.apply(h, w, b, targets, temperature, 256, softcap, 1.0, outputs)
        assert out[0].shape == (4,)  # TRL's own function answered
    assert calls == ["ours"]


def test_a_model_with_trls_fused_head_gets_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    from trl.trainer import utils

    from tests.conftest import fused_head_step

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", utils._ChunkedLogProbFunction)
    _, step = fused_head_step(tiny_model_dir, unlabelled=5)
    plain, plain_grad = step()
    lm_head.use_tiled_log_probs()
    tiled, tiled_grad = step()
    assert torch.allclose(tiled.loss, plain.loss, atol=1e-6)
    assert torch.allclose(tiled.entropy, plain.entropy, atol=1e-5)
    assert torch.equal(tiled.is_top1, plain.is_top1)
    assert torch.allclose(tiled_grad, plain_grad, atol=1e-6)


def test_a_batch_without_labels_gives_empty_outputs_and_zero_gradients():
    h, w, b, targets = inputs(n=0)
    (lp, ent, _, _, top1), grads = run(ours, h, w, b, targets)
    assert lp.shape == ent.shape == top1.shape == (0,)
    assert grads[0].shape == (0, 24) and not grads[1].any()
