"""Attention for padding-free batches: each packed example attends only to itself, at its own cost.

A padding-free SFT batch is one row holding several examples, with position ids
restarting at 0 for each. transformers keeps them apart on SDPA with a
block-diagonal mask over the whole row, so SDPA computes (and backpropagates)
every score of the row: with 8 examples, 7/8 of that work is masked away. This
implementation lays the examples out as rows of a padded batch, runs one causal
SDPA call on it (right padding needs no mask under a causal mask), and packs the
result back: the same numbers, a fraction of the attention work.

An example may also start at position p > 0: it then continues the first p positions
of the example before it (a prefix they share, sent once: tunepipe.shared_prefix),
and its row of the layout begins with them, so it attends to them as if it held
its own copy; their gradients add up from every example, as the copies' would.

    from tunepipe.attention import use_packed_sdpa
    use_packed_sdpa(model)     # before training; a no-op unless the model runs on "sdpa"

Anything that is not such a packed row (a padded batch with a mask, generation
with a KV cache) goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

PACKED_SDPA = "sdpa_packed"


def use_packed_sdpa(model) -> bool:
    """Switch a model that uses SDPA to the packed-aware SDPA; True if it did. Not a model with a
    sliding window (Mistral, Gemma's local layers): the packed path attends to the whole example."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
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
    """transformers' SDPA attention, with packed rows (batch 1, restarting positions) unpacked first; in
    fp32 where ``attend_in_fp32`` says so (the output then in autocast's dtype, as autocast's would be)."""
    import torch

    if attend_in_fp32(query):
        with torch.autocast("cpu", enabled=False):  # else autocast casts the inputs back to bf16
            out, weights = _packed_sdpa(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        return out.to(torch.get_autocast_dtype("cpu")), weights
    return _packed_sdpa(module, query, key, value, attention_mask, **kwargs)


def attend_in_fp32(query) -> bool:
    """Whether attention runs under CPU autocast (bf16 training), where it is better done in fp32:
    torch's CPU SDPA backward in bf16 took 4x as long as in fp32 at SmolLM2's shapes (13.5 vs 3.4 ms a
    layer in a train-sft step on an AMD EPYC with AVX512-BF16), more than the step's bf16 matmuls saved.
    It covers DPO's reference pass (under autocast too), so policy and reference attend alike. A model
    loaded in bf16 without autocast (evaluation, generation) keeps bf16 attention."""
    import torch

    return query.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def _packed_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = packed_layout(kwargs.get("position_ids"), query, key)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dest, source, n, width = layout
    rows = [_to_rows(t, source, n, width) for t in (query, key, value)]
    out, _ = sdpa_attention_forward(module, *rows, None, **kwargs)  # [n, width, heads, dim]
    return out.reshape(n * width, *out.shape[2:]).index_select(0, dest)[None], None


def packed_layout(position_ids, query, key):
    """How a single row packing several examples maps onto an [n x width] right-padded layout, or None
    when the row is not such a packing.

    Each example's positions count up by one, from 0; or from some p > 0 when it continues the
    first p positions of the example before it (a prefix they share, sent once:
    tunepipe.shared_prefix). Those come from the nearest earlier example that starts below p,
    and from its own predecessors below its start: examples sorted by their tokens send a shared
    prefix of any depth once. Returns (dest, source, n, width): ``dest``, the slot of each token;
    ``source``, the token that fills each slot (``len(pos)`` pads). A row whose example continues
    positions no earlier example holds raises ValueError.
    """
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    # the version changes if the tensor is written in place (inference tensors keep none)
    key = (position_ids, None if position_ids.is_inference() else position_ids._version)
    if _last_layout[0] is not key[0] or _last_layout[1] != key[1]:  # every layer gets the same tensor: once
        _last_layout[:] = [*key, _layout(position_ids[0])]
    return _last_layout[2]


_last_layout: list = [None, None, None]  # (position ids, their version, their layout)


def _layout(pos):
    import torch

    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    first = starts.nonzero().flatten().tolist()  # where each example begins in the row
    shared = pos[first].tolist()                # how many positions it continues
    if len(first) == 1 or shared[0] != 0:
        return None
    width = int(pos.max()) + 1
    ends = first[1:] + [len(pos)]
    chains: list[list[int]] = []  # each example's tokens at positions 0, 1, ...: what its row holds
    stack: list[int] = []         # earlier examples whose start is below every later one's so far
    for k, (a, b) in enumerate(zip(first, ends)):
        while stack and shared[stack[-1]] >= shared[k]:
            stack.pop()
        if shared[k] and (not stack or len(chains[stack[-1]]) < shared[k]):
            # transformers' mask would cut this example off from its prefix: wrong numbers, silently
            raise ValueError(f"packed row: an example starts at position {shared[k]}, beyond the example "
                             "before it; it continues nothing")
        chains.append((chains[stack[-1]][:shared[k]] if shared[k] else []) + list(range(a, b)))
        stack.append(k)
    source = torch.full((len(first), width), len(pos), dtype=torch.long)
    for k, chain in enumerate(chains):
        source[k, :len(chain)] = torch.tensor(chain)
    dest = (starts.cumsum(0) - 1) * width + pos
    return dest, source.flatten().to(pos.device), len(first), width


def _to_rows(x, source, n: int, width: int):
    """[1, heads, tokens, dim] -> [n, heads, width, dim]: slot i holds token source[i] (zeros past the end)."""
    import torch

    flat = x[0].transpose(0, 1)
    flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
    return flat.index_select(0, source).view(n, width, *flat.shape[1:]).transpose(1, 2)
