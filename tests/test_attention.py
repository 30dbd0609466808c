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
    dest, source, n, width = layout([0, 1, 2, 0, 1, 0, 1, 2, 3])
    assert (n, width) == (3, 4)
    assert dest.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]
    pad = 9
    assert source.tolist() == [0, 1, 2, pad, 3, 4, pad, pad, 5, 6, 7, 8]


def test_layout_of_examples_that_continue_the_one_before():
    # the first example holds positions 0-3; the second continues its first 2 positions, the third
    # the second's first 3 (two of them the first example's)
    dest, source, n, width = layout([0, 1, 2, 3, 2, 3, 3, 4])
    assert (n, width) == (3, 5)
    assert dest.tolist() == [0, 1, 2, 3, 7, 8, 13, 14]
    pad = 8
    assert source.tolist() == [0, 1, 2, 3, pad, 0, 1, 4, 5, pad, 0, 1, 4, 6, 7]


def test_continuations_of_a_context_skip_back_to_it():
    # two contexts, each with a second continuation: [0 1 2 | 2] and [0 1 | 1 | 1]
    dest, source, n, width = layout([0, 1, 2, 2, 0, 1, 1, 1])
    assert (n, width) == (5, 3)
    pad = 8
    assert source.tolist() == [0, 1, 2, 0, 1, 3, 4, 5, pad, 4, 6, pad, 4, 7, pad]


@pytest.mark.parametrize("positions", [[0, 1, 2, 3], [3, 4, 5]])
def test_rows_that_are_not_packed_examples_keep_the_usual_path(positions):
    assert layout(positions) is None


@pytest.mark.parametrize("positions", [[0, 1, 3, 0, 1], [0, 2, 0, 1], [0, 1, 3, 4]])
def test_an_example_that_continues_nothing_is_an_error_not_a_silent_mask(positions):
    # transformers' mask would run it without the prefix it claims to continue
    with pytest.raises(ValueError, match="continues nothing"):
        layout(positions)


def test_a_position_tensor_written_in_place_is_laid_out_again():
    import torch

    from tunepipe.attention import packed_layout

    pos = torch.tensor([[0, 1, 2, 0, 1]])
    q = torch.zeros(1, 2, 5, 4)
    assert packed_layout(pos, q, q)[2] == 2
    pos[0, 2] = 0  # now three examples
    assert packed_layout(pos, q, q)[2] == 3


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


def test_a_sliding_window_model_keeps_transformers_attention():
    from transformers import MistralConfig, MistralForCausalLM

    from tunepipe.attention import use_packed_sdpa

    config = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    config._attn_implementation = "sdpa"
    model = MistralForCausalLM(config)
    assert not use_packed_sdpa(model) and model.config._attn_implementation == "sdpa"
    model.config.sliding_window = None  # a Mistral without a window packs like a Llama
    assert use_packed_sdpa(model)


def _packed_row(lengths, heads=2, dim=8, dtype=None):
    """q, k, v of one packed row ([1, heads, tokens, dim]) and its position ids."""
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, sum(lengths), dim, generator=g, dtype=dtype) for _ in range(3))
    return q, k, v, torch.cat([torch.arange(n) for n in lengths])[None]


def _per_example(q, k, v, lengths):
    """Each example's causal attention on its own, in the inputs' dtype: [1, tokens, heads, dim]."""
    import torch
    import torch.nn.functional as F

    outs, start = [], 0
    for n in lengths:
        part = [t[:, :, start:start + n] for t in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*part, is_causal=True).transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


def test_under_bf16_autocast_attention_runs_in_fp32_and_returns_bf16():
    # the CPU's bf16 SDPA backward is slower than fp32's; the output is what autocast's call would give,
    # in dtype, and the fp32 result rounded once
    import types

    import torch

    from tunepipe.attention import attend_in_fp32, packed_sdpa_attention

    lengths = [5, 9, 3]
    q, k, v, pos = _packed_row(lengths)
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attend_in_fp32(q)
        out, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=pos)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _per_example(q, k, v, lengths).to(torch.bfloat16))


def test_without_autocast_a_bf16_model_keeps_bf16_attention():
    # evaluation and generation load the model in bf16: no casts there
    import types

    import torch

    from tunepipe.attention import attend_in_fp32, packed_sdpa_attention

    lengths = [4, 6]
    q, k, v, pos = _packed_row(lengths, dtype=torch.bfloat16)
    assert not attend_in_fp32(q)
    out, _ = packed_sdpa_attention(types.SimpleNamespace(is_causal=True, num_key_value_groups=1),
                                   q, k, v, None, position_ids=pos)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), _per_example(q, k, v, lengths).float(), atol=1e-2)
