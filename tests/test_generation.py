"""Batched generation equals one-prompt-at-a-time generation, stops per sequence, keeps order."""

from __future__ import annotations

import pytest

from tunepipe.generation import Decoding, encode_prompts, generate

PROMPTS = [
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nReverse the word 'banana' and then tell me a long story about it.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "Hi",
    "<|im_start|>user\nSort: 3, 1, 2<|im_end|>\n<|im_start|>assistant\n",
    "A somewhat longer plain prompt that has no template at all, to vary the padding",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = "<|endoftext|>"  # as the tokenize stage sets it: a pad that is not the EOS
    return model, tok


def one_at_a_time(model, tok, prompt, max_new_tokens, eos):
    import torch

    ids = torch.tensor([encode_prompts(tok, [prompt])[0]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def assert_same_as_one_at_a_time(model, tok, prompts, batch_size):
    batched = generate(model, tok, prompts, Decoding(max_new_tokens=12), batch_size=batch_size)
    for prompt, got in zip(prompts, batched):
        single = one_at_a_time(model, tok, prompt, 12, tok.eos_token_id)
        assert got.text == tok.decode(single, skip_special_tokens=True)
        assert got.n_new_tokens == len(single)


def test_greedy_batched_matches_single_prompt_generation(tiny):
    model, tok = tiny
    assert_same_as_one_at_a_time(model, tok, PROMPTS, batch_size=3)


def test_each_sequence_stops_at_its_own_eos(tiny):
    model, tok = tiny
    # A random model rarely emits the real EOS, so make a token it does emit the stop token:
    # the 4th greedy token of the first prompt.
    free = [one_at_a_time(model, tok, p, 10, tok.eos_token_id) for p in PROMPTS]
    stop_id = free[0][3]
    out = generate(model, tok, PROMPTS, Decoding(max_new_tokens=10), batch_size=len(PROMPTS),
                   eos_token_ids=[stop_id])
    for prompt, got, unstopped in zip(PROMPTS, out, free):
        expected = one_at_a_time(model, tok, prompt, 10, stop_id)
        if stop_id in unstopped:
            cut = unstopped.index(stop_id)
            assert got.stopped_at_eos and not got.truncated
            assert got.n_new_tokens == cut + 1 == len(expected)
            assert got.text == tok.decode(unstopped[:cut], skip_special_tokens=True)
        else:
            assert not got.stopped_at_eos and got.truncated and got.n_new_tokens == 10
    assert out[0].stopped_at_eos and out[0].n_new_tokens <= 4


def test_order_is_restored_and_batch_size_does_not_matter(tiny):
    model, tok = tiny
    decoding = Decoding(max_new_tokens=6)
    by_one = generate(model, tok, PROMPTS, decoding, batch_size=1)
    by_all = generate(model, tok, PROMPTS, decoding, batch_size=len(PROMPTS))
    reversed_ = generate(model, tok, PROMPTS[::-1], decoding, batch_size=2)
    assert by_one == by_all == reversed_[::-1]


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    from transformers import set_seed

    model, tok = tiny
    sampling = Decoding(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=1.0, top_k=0)
    set_seed(0)
    first = generate(model, tok, PROMPTS, sampling)
    set_seed(0)
    second = generate(model, tok, PROMPTS, sampling)
    greedy = generate(model, tok, PROMPTS, Decoding(max_new_tokens=8))
    assert first == second
    assert [g.text for g in first] != [g.text for g in greedy]


def test_no_prompts_gives_no_generations(tiny):
    model, tok = tiny
    assert generate(model, tok, [], Decoding()) == []


SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
SHARED = [SYSTEM + q + "<|im_end|>\n<|im_start|>assistant\n"
          for q in ("What is 2 + 3?", "Sort: 3, 1, 2", "Reverse the word 'banana', then tell a long story", "Hi")]


def test_shared_prefix_runs_once_and_changes_no_token(tiny):
    from tunepipe.generation import shared_prefix_cache

    model, tok = tiny
    rows = encode_prompts(tok, SHARED)
    cache, shared = shared_prefix_cache(model, rows, "cpu")
    assert shared >= len(tok(SYSTEM)["input_ids"]) - 1  # the system prompt and the user header
    assert cache.get_seq_length() == shared and cache.layers[0].keys.shape[0] == len(rows)
    assert_same_as_one_at_a_time(model, tok, SHARED, batch_size=len(SHARED))


def test_no_shared_prefix_for_unrelated_prompts(tiny):
    from tunepipe.generation import shared_prefix_cache

    model, tok = tiny
    assert shared_prefix_cache(model, encode_prompts(tok, ["Hi", "A different prompt"]), "cpu") == (None, 0)


def test_sampling_from_the_top_token_only_is_greedy(tiny):
    model, tok = tiny
    top1 = generate(model, tok, SHARED, Decoding(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=1))
    nucleus = generate(model, tok, SHARED, Decoding(max_new_tokens=8, do_sample=True, top_k=0, top_p=1e-6))
    assert top1 == nucleus == generate(model, tok, SHARED, Decoding(max_new_tokens=8))


def test_the_lm_head_gets_contiguous_inputs_while_generating_and_its_hooks_are_restored(tiny):
    # transformers slices the last position for the head: with a frozen bf16 weight torch's linear
    # copied the whole head per row on a strided input (evaluate@sft ran 3.4x slower than final)
    model, tok = tiny
    head = model.get_output_embeddings()
    seen = []
    recorder = head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    try:
        generate(model, tok, PROMPTS, Decoding(max_new_tokens=3), batch_size=4)
    finally:
        recorder.remove()
    assert seen and all(seen)
    assert not head._forward_pre_hooks  # removed once generation ends
