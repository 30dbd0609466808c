"""Attention for padding-free batches: each packed example attends only to itself, at its own cost.

A padding-free SFT batch is one row holding several examples, with position ids
restarting at 0 for each. transformers keeps them apart on SDPA with a
block-diagonal mask over the whole row, so SDPA computes (and backpropagates)
every score of the row: with 8 examples, 7/8 of that work is masked away. This
implementation lays the examples out as rows of a padded batch, runs one causal
SDPA call on it (right padding needs no mask under a causal mask), and packs the
result back: the same numbers, a fraction of the attention work.

    from tunepipe.attention import use_packed_sdpa
    use_packed_sdpa(model)     # before training; a no-op unless the model runs on "sdpa"

Anything that is not such a packed row (a padded batch with a mask, generation
with a KV cache) goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

PACKED_SDPA = "sdpa_packed"


def use_packed_sdpa(model) -> bool:
    """Switch a model that uses SDPA to the packed-aware SDPA; True if it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register_packed_sdpa()
    model.set_attn_implementation(PACKED_SDPA)
    return True


def register_packed_sdpa() -> None:
    """Make ``PACKED_SDPA`` an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # padded batches still get their usual mask


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with packed rows (batch 1, restarting positions) unpacked first."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = packed_layout(kwargs.get("position_ids"), query, key)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dest, n, width = layout
    rows = [_to_rows(t, dest, n, width) for t in (query, key, value)]
    out, _ = sdpa_attention_forward(module, *rows, None, **kwargs)  # [n, width, heads, dim]
    return out.reshape(n * width, *out.shape[2:]).index_select(0, dest)[None], None


def packed_layout(position_ids, query, key):
    """(slot of each token in an [n x width] padded layout, n, width) when the single row packs
    several examples whose positions each count 0, 1, 2, ...; else None."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    pos = position_ids[0]
    starts = pos == 0
    # each example starts at 0 and counts up by one; anything else keeps transformers' mask
    if not bool(starts[0]) or not bool(((pos[1:] != pos[:-1] + 1) == starts[1:]).all()):
        return None
    example = starts.cumsum(0) - 1
    n, width = int(example[-1]) + 1, int(pos.max()) + 1
    if n == 1:
        return None
    return example * width + pos, n, width


def _to_rows(x, dest, n: int, width: int):
    """[1, heads, tokens, dim] -> [n, heads, width, dim], each example in its own row, right-padded."""
    flat = x[0].transpose(0, 1)
    rows = flat.new_zeros(n * width, *flat.shape[1:]).index_copy(0, dest, flat)
    return rows.view(n, width, *flat.shape[1:]).transpose(1, 2)
