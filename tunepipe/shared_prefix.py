"""Send the tokens that every example of a padding-free batch begins with only once.

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
"""

from __future__ import annotations

# keys TRL's padding-free collator derives from the row's layout (for varlen kernels); sharing changes
# the layout, and packed SDPA reads the position ids alone
LAYOUT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
IGNORE = -100


def use_shared_prefix(trainer) -> bool:
    """Wrap the trainer's (padding-free) collator in :class:`SharedPrefixCollator`; True when it did."""
    trainer.data_collator = SharedPrefixCollator(trainer.data_collator)
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
