"""tunepipe.casts: a frozen weight's cast made once, with autocast's numbers."""

import torch

from tunepipe import casts


def test_a_frozen_weights_cast_is_kept_while_the_weight_is_unchanged():
    w = torch.randn(40, 8)
    cast = casts.cast_kept(w, torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, w.to(torch.bfloat16))
    assert casts.cast_kept(w, torch.bfloat16) is cast
    assert casts.cast_kept(w, torch.float32) is w
    w.mul_(2)  # changed in place (an optimizer step): cast anew
    assert torch.equal(casts.cast_kept(w, torch.bfloat16), w.to(torch.bfloat16))
    other = w.clone()
    assert casts.cast_kept(other, torch.bfloat16) is not casts.cast_kept(w, torch.bfloat16)


def test_a_cast_first_made_under_inference_mode_serves_a_backward_later():
    # train-dpo: TRL's reference pass (inference_mode) comes before the policy's forward and backward
    layer = torch.nn.Linear(8, 4).requires_grad_(False)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.inference_mode():
            casts.frozen_linear(layer, x.detach())
        casts.frozen_linear(layer, x).float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_trained_weight_is_cast_at_every_use_and_keeps_nothing():
    w = torch.nn.Parameter(torch.randn(40, 8))
    assert casts.cast_kept(w, torch.bfloat16) is not casts.cast_kept(w, torch.bfloat16)
    assert casts.ATTRIBUTE not in w.__dict__


def test_frozen_linear_gives_autocasts_numbers_and_gradients_with_the_cast_made_once(monkeypatch):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8).requires_grad_(False)
    made = []
    monkeypatch.setattr(casts, "may_keep", lambda w: made.append(w) or True)

    def run(forward):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x)
        y.float().square().sum().backward()
        return y, x.grad

    (y, grad), (expected, expected_grad) = run(lambda x: casts.frozen_linear(layer, x)), run(layer)
    assert y.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(y, expected) and torch.equal(grad, expected_grad)
    cast = layer.weight.__dict__[casts.ATTRIBUTE][torch.bfloat16][1]
    run(lambda x: casts.frozen_linear(layer, x))
    assert layer.weight.__dict__[casts.ATTRIBUTE][torch.bfloat16][1] is cast  # not cast again
    assert len(made) == 2
    assert casts.frozen_linear(layer, torch.ones(1, 16)).dtype == torch.float32  # outside autocast: layer(x)
