"""Metrics against answers worked out by hand: ROUGE, BLEU, perplexity, preferences, health, accuracy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tunepipe import metrics
from tunepipe.generation import Generation

# --------------------------------------------------------------------------- ROUGE / BLEU


def test_rouge_worked_example():
    # pred and ref share 5 of 6 unigrams, 3 of 5 bigrams, and an LCS of 5 words
    summary, items = metrics.rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    assert summary["rouge1"] == pytest.approx(5 / 6)
    assert summary["rouge2"] == pytest.approx(3 / 5)
    assert summary["rougeL"] == pytest.approx(5 / 6)
    assert items[0]["rougeL"] == pytest.approx(5 / 6)


def test_rouge_averages_items_and_lsum_uses_lines():
    summary, _ = metrics.rouge(["a b\nc d", "x y"], ["c d\na b", "x y"])
    # item 1: the LCS of "a b c d" and "c d a b" is 2 of 4 words; sentence-wise (Lsum) all match
    assert summary["rougeL"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["rougeLsum"] == pytest.approx(1.0)
    assert summary["rouge1"] == pytest.approx(1.0)


def test_rouge_of_empty_prediction_is_zero():
    summary, _ = metrics.rouge([""], ["some reference"])
    assert summary["rouge1"] == 0.0


def test_bleu_identical_disjoint_and_worked_example():
    refs = ["the cat sat on a mat", "one two three four five"]
    assert metrics.bleu(refs, refs) == pytest.approx(1.0)
    assert metrics.bleu(["alpha beta gamma delta", "zeta eta theta iota"], refs) == 0.0
    # p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, same length so no brevity penalty
    got = metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_bleu_brevity_penalty():
    # a 4-word prefix of a 6-word reference: every n-gram precision is 1, only the brevity penalty bites
    full = metrics.bleu(["a b c d e f"], ["a b c d e f"])
    short = metrics.bleu(["a b c d"], ["a b c d e f"])
    assert short == pytest.approx(full * math.exp(1 - 6 / 4))


def test_bleu_smoothing_keeps_score_when_no_4gram_matches():
    # 3 words: no 4-grams at all; method3 smooths the empty order instead of returning 0
    got = metrics.bleu(["x y z"], ["x y z"])
    assert 0 < got < 1


# --------------------------------------------------------------------------- health


def gen(text, n=5, eos=True, truncated=False):
    return Generation(text=text, n_new_tokens=n, stopped_at_eos=eos, truncated=truncated)


def test_repeated_ngram_on_crafted_strings():
    assert metrics.has_repeated_ngram("the cat sat, the cat sat", 3)
    assert not metrics.has_repeated_ngram("the cat sat on the mat", 3)  # "the" repeats, no 3-gram does
    assert metrics.has_repeated_ngram("the cat sat on the mat", 1)
    assert metrics.has_repeated_ngram("Yes yes YES yes", 2)  # case-insensitive
    assert not metrics.has_repeated_ngram("a b", 3)


def test_health_rates():
    gens = [gen("fine answer", n=3), gen("loop loop loop loop loop", n=10, eos=False, truncated=True),
            gen("ok", n=1), gen("stopped early without eos", n=7, eos=False)]
    h = metrics.health(gens, repeat_ngram=3)
    assert h == {"mean_new_tokens": pytest.approx(21 / 4), "eos_rate": 0.5, "repeat_rate": 0.25,
                 "truncated_rate": 0.25}
    assert metrics.health([], 3) == {}


def test_failure_kinds_on_crafted_answers():
    ref = "42"
    assert metrics.failure_kinds(None, gen("42"), ref, 3) == []
    assert metrics.failure_kinds("wrong_answer", gen("41"), ref, 3) == ["wrong_answer"]
    rambling = " ".join(f"word{i}" for i in range(40))
    assert metrics.failure_kinds(None, gen(rambling), ref, 3) == ["too_long"]
    looping = gen("42 is it. 42 is it. 42 is it.", eos=False, truncated=True)
    assert metrics.failure_kinds("constraint_broken", looping, ref, 3) == \
        ["constraint_broken", "repetitive", "truncated"]


def test_an_answer_cut_by_the_limit_is_truncated_not_no_stop():
    ref = "42"
    assert metrics.failure_kinds(None, gen("42 and", eos=False, truncated=True), ref, 3) == ["truncated"]
    # no EOS and under the limit (a stop id the loop does not know): that is "no_stop"
    assert metrics.failure_kinds(None, gen("42 and", eos=False, truncated=False), ref, 3) == ["no_stop"]


# --------------------------------------------------------------------------- task accuracy


def test_task_accuracy_per_family_with_a_checker():
    metas = [{"family": "arithmetic", "check": {"answer": "5"}},
             {"family": "arithmetic", "check": {"answer": "7"}},
             {"family": "text", "check": {"answer": "ab"}},
             {"family": "text"}]  # no checker: not counted

    def check(meta, output):
        return None if output == meta["check"]["answer"] else "wrong_answer"

    results = metrics.task_results(metas, ["5", "8", "ab", "whatever"], check=check)
    assert results == ["pass", "wrong_answer", "pass", None]
    acc = metrics.task_accuracy(metas, results)
    assert acc == {"task_accuracy": pytest.approx(2 / 3), "acc_arithmetic": 0.5, "acc_text": 1.0}
    assert metrics.task_accuracy(metas[3:], [None]) == {}


# --------------------------------------------------------------------------- likelihoods


class FixedLM(torch.nn.Module):
    """A 'model' whose next-token distribution is the same fixed p at every position."""

    def __init__(self, log_p):
        super().__init__()
        self.log_p = torch.nn.Parameter(log_p.clone(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.log_p.expand(b, t, -1))


def favouring(tokenizer, favoured_ids, weight=50.0):
    """log p over the vocabulary with ``favoured_ids`` `weight` times likelier than other tokens."""
    w = torch.ones(len(tokenizer))
    w[list(favoured_ids)] = weight
    return torch.log(w / w.sum())


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_model_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    with torch.no_grad():  # zero embeddings (tied with the head): zero hidden states, zero logits
        model.get_input_embeddings().weight.zero_()
    scores = metrics.completion_logprobs(model, smol_tokenizer, ["Q: 2+2?\nA:", "Say hi"], [" 4", "hi there"])
    n_tokens = [len(smol_tokenizer(c, add_special_tokens=False).input_ids) + 1 for c in [" 4", "hi there"]]
    assert [n for _, n in scores] == n_tokens
    ppl = metrics.perplexity(scores)
    assert ppl["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-4)
    assert ppl["nll"] == pytest.approx(math.log(model.config.vocab_size), rel=1e-4)


def test_perplexity_counts_completion_tokens_only(smol_tokenizer):
    tok = smol_tokenizer
    answer_ids = tok(" Paris", add_special_tokens=False).input_ids
    log_p = favouring(tok, answer_ids + [tok.eos_token_id])
    model = FixedLM(log_p)
    # the prompt is long and made of unfavoured tokens: counting it would raise the perplexity
    scores = metrics.completion_logprobs(model, tok, ["The capital of France, a long question, is"], [" Paris"],
                                         batch_size=1)
    expected = [float(log_p[i]) for i in answer_ids + [tok.eos_token_id]]
    assert scores[0][1] == len(expected)
    assert scores[0][0] == pytest.approx(sum(expected), abs=1e-3)  # float32 log-softmax
    assert metrics.perplexity(scores)["perplexity"] == pytest.approx(math.exp(-sum(expected) / len(expected)),
                                                                     rel=1e-4)


def test_scores_do_not_depend_on_batching_or_padding(tiny_model_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    prompts = ["short", "a much longer prompt with many more tokens in it", "mid length prompt"]
    completions = ["one", "two three four", "five six"]
    one = metrics.completion_logprobs(model, smol_tokenizer, prompts, completions, batch_size=1)
    all_ = metrics.completion_logprobs(model, smol_tokenizer, prompts, completions, batch_size=3)
    for (a, n), (b, m) in zip(one, all_):
        assert n == m and a == pytest.approx(b, abs=1e-4)


def test_preference_accuracy_on_a_model_that_must_prefer_chosen(smol_tokenizer):
    tok = smol_tokenizer
    yes = tok("yes", add_special_tokens=False).input_ids
    no = tok("no", add_special_tokens=False).input_ids
    log_p = favouring(tok, yes)
    model = FixedLM(log_p)
    prompts = ["Is water wet?", "Is fire hot?", "Is ice cold?"]
    chosen = metrics.completion_logprobs(model, tok, prompts, ["yes"] * 3)
    rejected = metrics.completion_logprobs(model, tok, prompts, ["no"] * 3)
    margin = float(sum(log_p[yes]) - sum(log_p[no]))  # the shared EOS cancels
    assert margin > 0
    pref = metrics.preference(chosen, rejected)
    assert pref["pref_accuracy"] == 1.0
    assert pref["pref_margin"] == pytest.approx(margin, rel=1e-4)
    swapped = metrics.preference(rejected, chosen)
    assert swapped["pref_accuracy"] == 0.0 and swapped["pref_margin"] == pytest.approx(-margin, rel=1e-4)
    assert metrics.preference(chosen, chosen)["pref_accuracy"] == 0.0  # ties are not wins


def direct_logprob(model, tok, prompt, completion):
    """log p(completion + EOS | prompt) from one unpadded forward pass and full logits."""
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
    return sum(float(full[len(p) - 1 + j, t]) for j, t in enumerate(c)), len(c)


PAIR_PROMPTS = ["Name a colour.", "A longer prompt: name two animals, please.", "Hi"]
PAIRS = [["red", "the colour of the sky on a clear day"], ["cat and dog", "no"], ["hello there", "hi"]]


def test_scores_match_a_direct_computation(tiny_model_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    got = metrics.completion_logprobs(model, smol_tokenizer, PAIR_PROMPTS, [c for c, _ in PAIRS], batch_size=3)
    for prompt, (completion, _), (logp, n) in zip(PAIR_PROMPTS, PAIRS, got):
        expected, length = direct_logprob(model, smol_tokenizer, prompt, completion)
        assert n == length and logp == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("batch_size", [2, 6])
def test_pairs_share_the_prompt_and_match_a_direct_computation(tiny_model_dir, smol_tokenizer, batch_size):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    got = metrics.completion_set_logprobs(model, smol_tokenizer, PAIR_PROMPTS, PAIRS, batch_size=batch_size)
    for prompt, pair, scores in zip(PAIR_PROMPTS, PAIRS, got):
        assert len(scores) == 2
        for completion, (logp, n) in zip(pair, scores):
            expected, length = direct_logprob(model, smol_tokenizer, prompt, completion)
            assert n == length and logp == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 6])
def test_packed_pairs_under_a_shared_system_prompt_match_a_direct_computation(tiny_model_dir, smol_tokenizer,
                                                                               batch_size):
    from transformers import AutoModelForCausalLM

    from tunepipe.attention import use_packed_sdpa

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    assert use_packed_sdpa(model)  # as evaluate loads it: pairs are packed in rows
    prompts = [f"System: be brief and kind.\nUser: {p}" for p in PAIR_PROMPTS]
    got = metrics.completion_set_logprobs(model, smol_tokenizer, prompts, PAIRS, batch_size=batch_size)
    for prompt, pair, scores in zip(prompts, PAIRS, got):
        for completion, (logp, n) in zip(pair, scores):
            expected, length = direct_logprob(model, smol_tokenizer, prompt, completion)
            assert n == length and logp == pytest.approx(expected, abs=1e-4)


def test_pairs_without_a_kv_cache_are_scored_one_by_one(smol_tokenizer):
    tok = smol_tokenizer
    model = FixedLM(favouring(tok, tok("red", add_special_tokens=False).input_ids))
    pairs = metrics.completion_set_logprobs(model, tok, PAIR_PROMPTS, PAIRS)
    singles = [metrics.completion_logprobs(model, tok, PAIR_PROMPTS, [p[i] for p in PAIRS]) for i in (0, 1)]
    assert [[s for s in pair] for pair in pairs] == [list(x) for x in zip(*singles)]
    with pytest.raises(ValueError, match="same number of completions"):
        metrics.completion_set_logprobs(model, tok, ["a", "b"], [["x"], ["y", "z"]])


# --------------------------------------------------------------------------- BLEU from per-item counts


def test_bleu_from_summed_item_stats_equals_corpus_bleu():
    import random

    import numpy as np

    rng = random.Random(0)
    vocab = "the cat sat on a mat dog 1 2 3 , .".split()
    for _ in range(200):  # random corpora: empty answers, no 4-gram matches, short and long hypotheses
        n = rng.randint(1, 5)
        preds = [" ".join(rng.choices(vocab, k=rng.randint(0, 9))) for _ in range(n)]
        refs = [" ".join(rng.choices(vocab, k=rng.randint(1, 9))) for _ in range(n)]
        totals = np.sum(metrics.bleu_item_stats(preds, refs), axis=0)
        assert metrics.bleu_from_stats(totals) == pytest.approx(metrics.bleu(preds, refs), abs=1e-12)


def test_bleu_item_stats_worked_example_and_batches():
    import numpy as np

    # "the cat sat on the mat" vs "the cat sat on a mat": 5/6 unigrams, 3/5 bigrams, 2/4, 1/3; 6 and 6 words
    (row,) = metrics.bleu_item_stats(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert row == [5, 3, 2, 1, 6, 5, 4, 3, 6, 6]
    both = np.array([row, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]], dtype=float)  # one resample per row
    got = metrics.bleu_from_stats(both)
    assert got[0] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25) and got[1] == 0.0


def test_preference_per_token_ignores_length():
    # a long rejected answer: lower summed log-prob (-20 < -5), higher per token (-0.5 > -1)
    assert not metrics.prefers_per_token(-5.0, 5, -20.0, 40)
    assert metrics.prefers_per_token(-5.0, 5, -12.0, 6)
    assert not metrics.prefers_per_token(-4.0, 4, -2.0, 2)  # a tie is not a preference
