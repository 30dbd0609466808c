"""LoRA dropout on a CPU without drawing one random number per element.

PEFT drops the input of every LoRA layer with ``nn.Dropout``, and on a CPU torch
draws that mask element by element from one serial generator: in a train-sft step
of the default run (SmolLM2-135M, 210 LoRA layers, ~480 tokens) the draws took
0.7 s of 5.7 (``aten::bernoulli_``, 12%) on a 2-core AVX2-only EPYC, more than the
attention. This dropout draws 64 random bits at a time and cuts each into four
16-bit uniforms, so it draws a quarter as often; an element is kept when its
uniform is at or above ``round(p * 65536)`` (the drop rate is p to within
1/131072), and kept elements are scaled by the exact inverse of the keep rate, so
the output's expectation is the input, as with ``nn.Dropout``. The mask is saved
for backward as booleans (1 byte an element, not 4).

The masks come from torch's default generator, so ``set_seed`` fixes them; they
differ from PEFT's (other draws), hence the loss of a run differs within noise.
Off a CPU (where the draw is one fast kernel) and in eval mode it is ``nn.Dropout``.

    from tunepipe.dropout import use_fast_lora_dropout
    use_fast_lora_dropout(trainer.model)   # after PEFT wrapped the model (the trainer does it)
"""

from __future__ import annotations

import torch
from torch import nn

RESOLUTION = 1 << 16  # uniforms of 16 bits: four from every 64-bit draw


def use_fast_lora_dropout(model) -> int:
    """Replace each LoRA layer's ``nn.Dropout`` (p > 0) with :class:`FastDropout`; returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            # Rates that round to 0 or 1 in 1/65536ths stay exact with nn.Dropout.
            if type(dropout) is nn.Dropout and 0 < round(dropout.p * RESOLUTION) < RESOLUTION:
                dropouts[name] = FastDropout(dropout.p)
                replaced += 1
    return replaced


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with :func:`keep_mask` for its mask on a CPU (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep, scale = keep_mask(x.shape, self.p)
        return _KeepAndScale.apply(x, keep, scale)


def keep_mask(shape, p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask keeping each element with probability ~1-p, and the scale that keeps the mean."""
    threshold = round(p * RESOLUTION)
    n = shape.numel() if isinstance(shape, torch.Size) else torch.Size(shape).numel()
    # From the int64 minimum with no upper bound torch draws all 64 bits (no modulo),
    # so every one of the four 16-bit pieces is exactly uniform.
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
    uniforms = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    keep = uniforms >= threshold - RESOLUTION // 2
    return keep, RESOLUTION / (RESOLUTION - threshold)


class _KeepAndScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None
