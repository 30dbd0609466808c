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


# --------------------------------------------------------------------------- padded batches (DPO)

# DPO's batch: chosen answers, then rejected ones, each after its prompt; all open with a system prompt
PAIRS = [(SYSTEM + [20, 21], [30, 31], [40]), (SYSTEM + [22], [32], [41, 42, 43]), (SYSTEM + [20, 21], [33], [44])]


def padded(sequences):
    import torch

    width = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


def dpo_batch():
    return padded([p + c for p, c, _ in PAIRS] + [p + r for p, _, r in PAIRS])


def test_a_padded_batch_packs_each_shared_prefix_once():
    from tunepipe.shared_prefix import pack_padded

    ids, mask = dpo_batch()
    row, positions, gather = pack_padded(ids, mask)
    # 6 sequences of 43 tokens in all; sorted, each shares with its neighbour: 16 distinct tokens
    assert int(mask.sum()) == 43 and row.shape[1] == 16
    flat = row[0].tolist() + [0]
    rebuilt = [flat[i] for i in gather.tolist()]
    assert rebuilt == ids.flatten().tolist()  # every sequence reads back its own tokens (padding 0)
    assert [positions[0, i].item() for i in range(row.shape[1])][:6] == [0, 1, 2, 3, 4, 5]


def test_left_padding_and_single_sequences_are_not_packed():
    import torch

    from tunepipe.shared_prefix import pack_padded

    ids, mask = dpo_batch()
    assert pack_padded(ids, mask.flip(1)) is None
    assert pack_padded(ids[:1], mask[:1]) is None
    assert pack_padded(ids, None) is None
    assert pack_padded(torch.tensor([[5, 6], [5, 7]]), torch.ones(2, 2, dtype=torch.long)) is not None


# a pair whose answers are the same, and one whose chosen answer is all of its rejected one's beginning
# (the packed row then reads the two as one example)
EDGE_PAIRS = [(SYSTEM + [20], [30], [30]), (SYSTEM + [21], [31], [31, 32]), (SYSTEM + [20], [33], [34])]


def distinct_tokens(sequences) -> int:
    """Tokens of the packed row: each distinct prefix once, plus one token per repeated sequence."""
    prefixes = {tuple(s[:i]) for s in sequences for i in range(1, len(s) + 1)}
    return len(prefixes) + len(sequences) - len({tuple(s) for s in sequences})


@pytest.mark.parametrize("pairs", [PAIRS, EDGE_PAIRS], ids=["pairs", "edge_pairs"])
def test_the_body_packs_a_padded_batch_with_the_same_log_probs_and_gradients(tiny_model_dir, pairs):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from tunepipe.attention import use_packed_sdpa
    from tunepipe.shared_prefix import share_prefixes_in_backbone

    def lora_model():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
        add_fused_lm_head(model)  # as DPOTrainer does
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        return model

    sequences = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    ids, mask = padded(sequences)
    labels = ids.masked_fill(mask == 0, -100)
    row_tokens = distinct_tokens(sequences)

    def run(model):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        out.log_probs.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return out.log_probs.detach(), grads

    expected, expected_grads = run(lora_model())
    model = lora_model()
    assert use_packed_sdpa(model.get_base_model()) and share_prefixes_in_backbone(model)
    assert not share_prefixes_in_backbone(model)  # once is enough
    calls = []
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    got, grads = run(model)
    assert calls[0][:2] == (1, row_tokens)  # the body ran one packed row
    assert torch.allclose(got, expected, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected_grads))
    with model.disable_adapter():  # DPO's reference pass: the same body, adapter off
        model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    assert calls[-1][:2] == (1, row_tokens)
