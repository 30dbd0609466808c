"""Sending the prefix every example shares once: which tokens go, and that loss and gradients stay."""

from __future__ import annotations

import pytest

IGNORE = -100


def packed(examples, train_on_prompt=False):
    """TRL's padding-free collator on (prompt ids, answer ids) pairs: one row, labels on the answers."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [{"input_ids": p + a, "labels": (p if train_on_prompt else [IGNORE] * len(p)) + a} for p, a in examples]
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)


SYSTEM = [11, 12, 13, 14]
EXAMPLES = [(SYSTEM + [20, 21], [30, 31]), (SYSTEM + [22], [32]), (SYSTEM + [20, 23, 24], [33, 34, 35])]


def test_the_common_prompt_prefix_stays_in_the_first_example_only():
    from tunepipe.shared_prefix import share_prefix

    batch = share_prefix(packed(EXAMPLES))
    assert batch["input_ids"][0].tolist() == [11, 12, 13, 14, 20, 21, 30, 31, 22, 32, 20, 23, 24, 33, 34, 35]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 4, 5, 6, 7, 8, 9]
    # every answer token keeps its label; the first kept token of each example has none
    assert [t for t in batch["labels"][0].tolist() if t != IGNORE] == [30, 31, 32, 33, 34, 35]
    assert batch["labels"][0].tolist()[8] == IGNORE and "cu_seq_lens_q" not in batch


def test_the_token_before_an_answer_stays_with_its_example():
    from tunepipe.shared_prefix import share_prefix

    # the second prompt is all prefix: its last token must still predict its answer in its own row
    batch = share_prefix(packed([(SYSTEM + [20], [30]), (SYSTEM, [31])]))
    assert batch["input_ids"][0].tolist() == [11, 12, 13, 14, 20, 30, 14, 31]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]


@pytest.mark.parametrize("examples, train_on_prompt", [
    ([([11, 12], [30]), ([13, 12], [31])], False),  # nothing in common
    (EXAMPLES, True),                               # the prompt is trained on: sharing would drop its loss
])
def test_batches_without_a_shareable_prefix_are_left_alone(examples, train_on_prompt):
    from tunepipe.shared_prefix import share_prefix

    before = packed(examples, train_on_prompt)
    after = share_prefix(dict(before))
    assert after["input_ids"].tolist() == before["input_ids"].tolist() and "cu_seq_lens_q" in after


def test_loss_and_gradients_equal_the_unshared_batch(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.attention import use_packed_sdpa
    from tunepipe.shared_prefix import share_prefix

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    assert use_packed_sdpa(model)
    full = packed(EXAMPLES)

    def run(batch):
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    use_cache=False)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = run(full)
    shared = share_prefix(full)
    assert shared["input_ids"].shape[1] == full["input_ids"].shape[1] - 8
    shared_loss, shared_grads = run(shared)
    assert torch.allclose(shared_loss, loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(shared_grads, grads))
