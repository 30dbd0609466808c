"""Each multiple-choice context computed once: lm-eval's numbers, from fewer tokens."""

from __future__ import annotations

# (context, continuation) token ids: contexts shared by 4, 3 and 1 continuations, one-token
# continuations among them (their only predictor is the context's last token), and contexts that
# begin like others (as chat prompts share a system prompt)
REQUESTS = [([5, 17, 29, 41], [50, 51]), ([5, 17, 29, 41], [52]), ([5, 17, 29, 41], [53, 54, 55]),
            ([5, 17, 29, 41], [56, 57]), ([9, 8], [60, 61, 62]), ([9, 8], [63]), ([9, 8], [64, 65]),
            ([7, 6, 5, 4, 3, 2], [70]), ([5, 17], [29, 41]), ([5, 17, 29, 99], [71, 72]), ([5, 17, 30], [73]),
            # one-token continuations only, then a context extending it: the row reads as one example
            ([3, 4], [5]), ([3, 4], [6]), ([3, 4, 5, 6], [7, 8])]


def lms(tiny_model_dir):
    from lm_eval.models.huggingface import HFLM

    from tunepipe import forgetting
    from tunepipe.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    plain = HFLM(pretrained=load_model(tiny_model_dir).eval(), tokenizer=tokenizer, batch_size=4)
    shared = forgetting.wrap_model(load_model(tiny_model_dir).eval(), tokenizer, batch_size=4)
    return plain, shared


def test_loglikelihoods_equal_lm_evals_own(tiny_model_dir, monkeypatch):
    from tunepipe import continuations

    plain, shared = lms(tiny_model_dir)
    assert type(shared).__name__ == "SharedContextHFLM"
    requests = [(("ctx", "cont"), ctx, cont) for ctx, cont in REQUESTS]
    expected = plain._loglikelihood_tokens(requests, disable_tqdm=True)
    monkeypatch.setattr(continuations, "TOKENS_PER_BATCH_ITEM", 3)  # rows of 12 tokens: several rows, one context each
    for got in (shared._loglikelihood_tokens(requests, disable_tqdm=True), continuations.score(
            shared.model, REQUESTS, tokens_per_row=10**6)):  # ... and all contexts in one row
        assert [g for _, g in got] == [g for _, g in expected]
        assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(got, expected))


def test_a_greedy_continuation_is_recognised(tiny_model_dir):
    import torch

    from tunepipe import continuations

    _, shared = lms(tiny_model_dir)
    ctx = [5, 17, 29]
    with torch.no_grad():  # the model's own greedy continuation of ctx, two tokens
        first = int(shared.model(torch.tensor([ctx])).logits[0, -1].argmax())
        second = int(shared.model(torch.tensor([ctx + [first]])).logits[0, -1].argmax())
    got = continuations.score(shared.model, [(ctx, [first, second]), (ctx, [first + 1, second])],
                              tokens_per_row=100)
    assert [g for _, g in got] == [True, False] and got[0][0] > got[1][0]
