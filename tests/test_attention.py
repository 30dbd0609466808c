"""Packed-aware SDPA: which rows it unpacks, and that it changes no number."""

from __future__ import annotations

import pytest


def layout(positions, heads=2, dim=4):
    import torch

    from tunepipe.attention import packed_layout

    pos = torch.tensor([positions])
    q = torch.zeros(1, heads, len(positions), dim)
    return packed_layout(pos, q, q)


def test_layout_of_a_packed_row():
    dest, n, width = layout([0, 1, 2, 0, 1, 0, 1, 2, 3])
    assert (n, width) == (3, 4)
    assert dest.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]


@pytest.mark.parametrize("positions", [[0, 1, 2, 3], [3, 4, 5], [0, 1, 3, 0, 1], [0, 2, 0, 1]])
def test_rows_that_are_not_packed_examples_keep_the_usual_path(positions):
    assert layout(positions) is None


def test_packed_attention_equals_the_block_diagonal_mask_forward_and_backward(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.attention import use_packed_sdpa

    lengths = [5, 9, 3, 7]
    ids = torch.randint(10, 1000, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]

    def run(model):
        model.zero_grad()
        out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    assert model.config._attn_implementation == "sdpa"
    masked_logits, masked_grad = run(model)
    assert use_packed_sdpa(model) and model.config._attn_implementation == "sdpa_packed"
    packed_logits, packed_grad = run(model)
    assert torch.allclose(packed_logits, masked_logits, atol=1e-5)
    assert torch.allclose(packed_grad, masked_grad, atol=1e-5)
    assert not use_packed_sdpa(model)  # already switched: nothing to do
