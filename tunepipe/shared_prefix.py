"""Compute the tokens that several examples of a batch begin with only once.

In the default data every prompt opens with the same system prompt, about a third
of each example's tokens: a batch of 8 computed it 8 times, forward and backward.
This collator keeps it in the batch's first example only and starts the others
after it, at position p (not 0); tunepipe.attention's packed SDPA sees the gap and
lets them attend to the first example's copy. Logits, loss and gradients are those
of the unshared batch (within float rounding), since a causal prefix does not
depend on what follows it; only LoRA dropout draws one mask for the shared tokens
instead of one per example.

Only prompt tokens are shared: a prefix stops before the last token in front of any
example's first label, which must predict that label from its own example. So with
``train_on_prompt`` nothing is shared.

    from tunepipe.shared_prefix import use_shared_prefix
    use_shared_prefix(trainer)   # a padding-free trainer whose model runs tunepipe.attention's packed SDPA

A padded batch, such as DPO's (each prompt twice), is packed into such a row inside
the model instead: ``share_prefixes_in_backbone`` (below).
"""

from __future__ import annotations

from typing import Sequence

# keys TRL's padding-free collator derives from the row's layout (for varlen kernels); sharing changes
# the layout, and packed SDPA reads the position ids alone
LAYOUT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
IGNORE = -100


def use_shared_prefix(trainer) -> bool:
    """Wrap the trainer's (padding-free) collator in :class:`SharedPrefixCollator`; True when it did.

    The trainer's count of input tokens (the stage's ``trained_tokens``, ``tokens_per_second``)
    goes on counting every example's tokens, the prefix sent once included, so it does not
    depend on how the batch was split (across processes, say)."""
    trainer.data_collator = SharedPrefixCollator(trainer.data_collator)
    count_row_tokens = trainer._track_num_input_tokens

    def count_example_tokens(inputs):
        import torch

        count_row_tokens(inputs)
        pos = inputs.get("position_ids")
        if pos is None or trainer.args.include_num_input_tokens_seen == "no":
            return
        # an example that starts at position p left its first p tokens to the one before it
        continues = pos[0, 1:] != pos[0, :-1] + 1
        sent_once = torch.as_tensor(pos[0, 1:][continues].sum(), dtype=torch.int64, device=trainer.args.device)
        trainer.state.num_input_tokens_seen += trainer.accelerator.gather(sent_once).sum().item()

    trainer._track_num_input_tokens = count_example_tokens
    return True


class SharedPrefixCollator:
    """Wraps a padding-free collator (one row, positions restarting at 0) with :func:`share_prefix`."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        return share_prefix(self.collator(examples))


def share_prefix(batch: dict) -> dict:
    """``batch`` with the prompt prefix its examples share kept in the first example only."""
    import torch

    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return batch
    bounds = list(zip(starts, starts[1:] + [len(ids)]))
    shared = min(_shareable(ids[a:b], labels[a:b], ids[:bounds[0][1]]) for a, b in bounds)
    if shared < 1:
        return batch
    keep = torch.ones(len(ids), dtype=torch.bool)
    for a, _ in bounds[1:]:
        keep[a:a + shared] = False
    out = {k: v for k, v in batch.items() if k not in LAYOUT_KEYS}
    out.update(input_ids=ids[keep][None], labels=labels[keep][None], position_ids=pos[keep][None])
    return out


def _shareable(ids, labels, first) -> int:
    """How many leading tokens of this example can be left to the first example's copy."""
    import torch

    n = min(len(ids), len(first))
    differs = (ids[:n] != first[:n]).nonzero()
    common = int(differs[0]) if len(differs) else n
    labelled = (labels != IGNORE).nonzero()
    # the token before the first label predicts it in this example's own row; keep at least one token
    before_label = int(labelled[0]) - 1 if len(labelled) else len(ids) - 1
    return max(0, min(common, before_label, len(ids) - 1))


# --------------------------------------------------------------------------- padded batches (DPO)


def share_prefixes_in_backbone(model) -> bool:
    """Make the transformer body of ``model`` (under PEFT too) run a right-padded batch as one packed
    row in which every prefix its sequences share is computed once; True when it did.

    DPO's batch is each prompt twice (chosen, rejected), all opening with the same system
    prompt, padded to the longest: in the default data (100 random batches of 4 pairs) the
    packed row holds 31% of the padded batch's tokens, 44% of its non-padding ones.
    The sequences are packed sorted by their tokens, so that each shares with its neighbour,
    and the body's output is gathered back into the padded shape (zeros at padding), so the LM
    head, the losses and the reference pass see what they saw before. Other calls (a KV cache,
    left padding in generation, position ids given) run the body as it was.
    """
    import functools

    import torch

    from tunepipe.attention import PACKED_SDPA

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = inner.base_model
    # only the packed SDPA reads a continuation's positions as "attend to the one before"
    if body is inner or hasattr(body.forward, "plain") or inner.config._attn_implementation != PACKED_SDPA:
        return False
    original = body.forward

    @functools.wraps(original)
    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                **kwargs):
        plan = None
        if (use_cache is False and past_key_values is None and position_ids is None and input_ids is not None
                and not kwargs.get("output_hidden_states") and not kwargs.get("output_attentions")):
            plan = pack_padded(input_ids, attention_mask)
        if plan is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        row_ids, row_positions, gather = plan
        out = original(input_ids=row_ids, position_ids=row_positions, use_cache=False, **kwargs)
        hidden = out.last_hidden_state[0]
        hidden = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[-1])]).index_select(0, gather)
        out.last_hidden_state = hidden.view(*input_ids.shape, hidden.shape[-1])
        return out

    forward.plain = original
    body.forward = forward
    return True


def pack_padded(input_ids, attention_mask):
    """(row ids [1, N], row positions [1, N], for each padded slot the row token it reads, N for
    padding) for a right-padded batch of several sequences; None for any other batch."""
    import torch

    if attention_mask is None or attention_mask.dim() != 2 or len(input_ids) < 2:
        return None
    lengths = attention_mask.sum(1)
    width = input_ids.shape[1]
    right_padded = attention_mask.bool() == (torch.arange(width, device=lengths.device)[None] < lengths[:, None])
    if int(lengths.min()) == 0 or not bool(right_padded.all()):
        return None
    seqs = [row[:n].tolist() for row, n in zip(input_ids, lengths.tolist())]
    ids: list[int] = []
    positions: list[int] = []
    chains: dict[int, list[int]] = {}  # each sequence's tokens as row indices
    previous = None
    for b in sorted(range(len(seqs)), key=lambda b: seqs[b]):  # neighbours share the longest prefixes
        x = seqs[b]
        shared = 0 if previous is None else min(common_prefix_length(x, seqs[previous]), len(x) - 1)
        chains[b] = (chains[previous][:shared] if shared else []) + list(range(len(ids), len(ids) + len(x) - shared))
        ids += x[shared:]
        positions += range(shared, len(x))
        previous = b
    gather = torch.full((len(seqs), width), len(ids), dtype=torch.long)
    for b, chain in chains.items():
        gather[b, :len(chain)] = torch.tensor(chain)
    device = input_ids.device
    return (torch.tensor([ids], device=device), torch.tensor([positions], device=device),
            gather.flatten().to(device))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

