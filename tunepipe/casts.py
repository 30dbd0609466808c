"""Frozen weights cast to the compute dtype once a run, not at every use.

Under bf16 autocast every ``F.linear`` casts its fp32 weight to bf16. Autocast keeps
such casts only for weights that train; a LoRA run's frozen base weights (nearly all
of them) were cast again at every forward: 7% of a bf16 SFT step on a 2-core AMD
EPYC, and the LM head's 28M values took 95 ms a cast. Here the cast is kept on the
weight itself and made again only when the weight changes (its version counter).

    from tunepipe.casts import cast_kept, frozen_linear
    w16 = cast_kept(layer.weight, torch.bfloat16)   # the same tensor until the weight changes
    y = frozen_linear(layer, x)                     # layer(x) under autocast, the weight's cast kept

The numbers are autocast's: the same ``weight.to(dtype)``, made fewer times. A kept
cast costs memory: half the fp32 weights' size for bf16.
"""

from __future__ import annotations

import torch

ATTRIBUTE = "_tunepipe_kept_casts"  # on the weight: {dtype: (its version then, the cast)}


def may_keep(weight: torch.Tensor) -> bool:
    """Whether a cast of ``weight`` is worth keeping: it is frozen (benchmarks.sft switches this off)."""
    return not weight.requires_grad


def cast_kept(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, the same tensor while ``weight`` is unchanged (a frozen weight: a run long)."""
    if weight.dtype == dtype:
        return weight
    if not may_keep(weight):
        return weight.detach().to(dtype)
    kept = weight.__dict__.setdefault(ATTRIBUTE, {})
    version, cast = kept.get(dtype, (None, None))
    if version != weight._version:
        # a normal tensor even when first made under inference_mode (TRL's reference pass): an
        # inference tensor cannot be saved for a later backward
        with torch.inference_mode(False):
            cast = weight.detach().to(dtype)
        kept[dtype] = (weight._version, cast)
    return cast


def frozen_linear(layer: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``layer(x)``; for a plain ``nn.Linear`` under autocast, with its weight's autocast cast kept."""
    device = x.device.type
    if type(layer) is not torch.nn.Linear or args or kwargs or not torch.is_autocast_enabled(device):
        return layer(x, *args, **kwargs)
    return torch.nn.functional.linear(x, cast_kept(layer.weight, torch.get_autocast_dtype(device)), layer.bias)
