"""Evaluation metrics: text overlap, likelihoods, preferences, generation health, task accuracy.

Text metrics (no model):
    rouge(preds, refs)            -> ({"rouge1", "rouge2", "rougeL", "rougeLsum"}, per-item scores)
    bleu(preds, refs)             -> corpus BLEU in [0, 1]
    bleu_item_stats(preds, refs)  -> per-item n-gram counts; bleu_from_stats(their sum) == bleu(...),
                                     so a bootstrap can resample items without re-tokenizing
    health(generations, n)        -> mean length, EOS / repeat / truncation rates
    failure_kinds(verdict, gen, ref, n) -> e.g. ["wrong_answer", "truncated"]
    task_accuracy(metas, results) -> overall and per-family accuracy from tasks.check

Model scores (torch imported on use):
    completion_logprobs(model, tok, prompts, completions)   -> [(summed log-prob, n tokens)]
    completion_set_logprobs(model, tok, prompts, [[chosen, rejected], ...]) -> the same, per pair
    perplexity(scores)            -> exp(mean token NLL) over completion tokens only
    preference(chosen, rejected)  -> share of pairs preferring chosen, mean margin
    prefers_per_token(c_logp, c_n, r_logp, r_n) -> the same verdict on mean log-prob per token

All rates and scores are in [0, 1] (BLEU too, not sacreBLEU's 0-100).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Optional, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# An answer is "too long" (rambling) when it has more than this many words for
# each word of the reference, plus TOO_LONG_SLACK words so short references
# (a number, one word) leave room for a short sentence around the answer.
TOO_LONG_FACTOR = 3.0
TOO_LONG_SLACK = 12

# Failure kinds, in the order the report lists them. CHECKER_KINDS come from
# tasks.check; the others from the generation itself. "truncated": cut by
# max_new_tokens (a limit too low for the answers, or a model that rambles on);
# "no_stop": ended without EOS before the limit (Generation.truncated is False).
CHECKER_KINDS = ("wrong_answer", "constraint_broken")
FAILURE_KINDS = CHECKER_KINDS + ("too_long", "repetitive", "truncated", "no_stop")


# --------------------------------------------------------------------------- text overlap


def rouge(predictions: Sequence[str], references: Sequence[str]) -> tuple[dict, list[dict]]:
    """Mean ROUGE F1 (Lin 2004) with Porter stemming, and each item's scores.

    rougeLsum splits texts into sentences at newlines (as the rouge-score
    package and the summarization literature do), so multi-line answers get the
    union-LCS score; on single-line texts it equals rougeL.
    """
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    items = []
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction)
        items.append({k: scores[k].fmeasure for k in ROUGE_TYPES})
    n = max(len(items), 1)
    return {k: sum(item[k] for item in items) / n for k in ROUGE_TYPES}, items


_WORDS = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: the tokens BLEU and the
    repetition check count (independent of any model's tokenizer)."""
    return _WORDS.findall(text.lower())


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) over ``words()``, one reference each.

    Smoothing: NLTK's method3, the NIST geometric sequence ("exp" in sacreBLEU,
    its default for corpus BLEU): an n-gram order with no match counts as
    1/2^k instead of zeroing the whole score, which matters for small test
    sets of short answers. When every order has a match it changes nothing.
    """
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    _same_length(predictions, references)
    hyps = [words(p) for p in predictions]
    refs = [[words(r)] for r in references]
    if not any(hyps):
        return 0.0
    return float(corpus_bleu(refs, hyps, smoothing_function=SmoothingFunction().method3))


# Columns of bleu_item_stats: matched n-grams (orders 1-4), hypothesis n-grams (orders 1-4,
# at least 1 each, as NLTK counts them), hypothesis length, reference length.
BLEU_STATS = 10


def bleu_item_stats(predictions: Sequence[str], references: Sequence[str]) -> list[list[int]]:
    """The counts corpus BLEU sums over items, one row per item (see BLEU_STATS).

    Corpus BLEU is a function of these sums only, so the BLEU of any resample of
    the items is ``bleu_from_stats`` of its rows' sum: cheap enough to bootstrap.
    """
    from nltk.translate.bleu_score import modified_precision

    _same_length(predictions, references)
    rows = []
    for pred, ref in zip(predictions, references):
        hyp, refw = words(pred), words(ref)
        # Fractions built unnormalised, as corpus_bleu sums them: numerator and denominator as counted
        precisions = [modified_precision([refw], hyp, n) for n in range(1, 5)]
        rows.append([p.numerator for p in precisions] + [p.denominator for p in precisions] + [len(hyp), len(refw)])
    return rows


def bleu_from_stats(totals):
    """Corpus BLEU-4 with method3 smoothing (as ``bleu``) from summed ``bleu_item_stats``.

    ``totals``: shape (BLEU_STATS,) or (k, BLEU_STATS) for k resamples at once; returns a
    float or an array of k. Mirrors NLTK's corpus_bleu: 0 without a unigram match or
    without any hypothesis word; an order with no match counts as 1 / (2^k * its count).
    """
    import numpy as np

    t = np.atleast_2d(np.asarray(totals, dtype=float))
    matches, counts, hyp_len, ref_len = t[:, 0:4], t[:, 4:8], t[:, 8], t[:, 9]
    zero = matches == 0
    nth_zero = np.cumsum(zero, axis=1)  # k of the k-th order without a match
    precision = np.where(zero, 1.0 / (2.0 ** nth_zero * counts), matches / counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        brevity = np.where(hyp_len > ref_len, 1.0, np.exp(1 - ref_len / np.maximum(hyp_len, 1)))
        score = brevity * np.exp(np.log(precision).mean(axis=1))
    score = np.where((matches[:, 0] == 0) | (hyp_len == 0), 0.0, score)
    return float(score[0]) if np.ndim(totals) == 1 else score


# --------------------------------------------------------------------------- generation health


def has_repeated_ngram(text: str, n: int) -> bool:
    """True when some run of n words occurs twice or more (a looping answer)."""
    toks = words(text)
    grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    return any(c > 1 for c in grams.values())


def is_too_long(text: str, reference: str) -> bool:
    return len(words(text)) > TOO_LONG_FACTOR * len(words(reference)) + TOO_LONG_SLACK


def failure_kinds(task_result: Optional[str], gen, reference: str, repeat_ngram: int) -> list[str]:
    """Every failure of one answer, in FAILURE_KINDS order.

    ``task_result`` is tasks.check's verdict (None: passed or no checker);
    ``gen`` a generation.Generation.
    """
    found = {task_result} if task_result else set()
    if is_too_long(gen.text, reference):
        found.add("too_long")
    if has_repeated_ngram(gen.text, repeat_ngram):
        found.add("repetitive")
    if gen.truncated:
        found.add("truncated")
    elif not gen.stopped_at_eos:
        found.add("no_stop")
    return [k for k in FAILURE_KINDS if k in found] + sorted(found - set(FAILURE_KINDS))


def health(generations: Sequence, repeat_ngram: int) -> dict:
    """Mean new tokens, and the shares that stopped at EOS, repeat an n-gram, hit the length limit."""
    n = len(generations)
    if n == 0:
        return {}
    return {
        "mean_new_tokens": sum(g.n_new_tokens for g in generations) / n,
        "eos_rate": sum(g.stopped_at_eos for g in generations) / n,
        "repeat_rate": sum(has_repeated_ngram(g.text, repeat_ngram) for g in generations) / n,
        "truncated_rate": sum(g.truncated for g in generations) / n,
    }


# --------------------------------------------------------------------------- task accuracy


def task_results(metas: Sequence[dict], outputs: Sequence[str],
                 check: Optional[Callable[[dict, str], Optional[str]]] = None) -> list[Optional[str]]:
    """Per item: "pass", a failure kind from ``check``, or None when the record has no checker."""
    if check is None:
        from tunepipe.tasks import check
    _same_length(metas, outputs)
    return [None if not (meta or {}).get("check") else (check(meta, out) or "pass")
            for meta, out in zip(metas, outputs)]


def task_accuracy(metas: Sequence[dict], results: Sequence[Optional[str]]) -> dict:
    """``task_accuracy`` over checkable items and ``acc_<family>`` per skill family.

    Empty when no item has a checker (Hub data): there is no accuracy to report.
    """
    per_family: dict[str, list[bool]] = {}
    for meta, result in zip(metas, results):
        if result is None:
            continue
        family = str((meta or {}).get("family") or "other")
        per_family.setdefault(family, []).append(result == "pass")
    if not per_family:
        return {}
    every = [ok for oks in per_family.values() for ok in oks]
    out = {"task_accuracy": sum(every) / len(every)}
    out.update({f"acc_{fam}": sum(oks) / len(oks) for fam, oks in sorted(per_family.items())})
    return out


# --------------------------------------------------------------------------- likelihoods


def completion_logprobs(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                        batch_size: int = 8, append_eos: bool = True,
                        desc: str = "score") -> list[tuple[float, int]]:
    """Summed log-probability of each completion given its prompt, and its token count.

    Only completion tokens count (the EOS too when ``append_eos``: the model is
    trained to end its answer, as the tokenize stage and TRL's DPO append it).
    The prompt and completion are tokenized separately by the tokenize stage's
    rules (tunepipe.tokenization), so the scored tokens are the trained ones.
    """
    _same_length(prompts, completions)
    sets = completion_set_logprobs(model, tokenizer, prompts, [[c] for c in completions], batch_size=batch_size,
                                   append_eos=append_eos, desc=desc)
    return [scores[0] for scores in sets]


def completion_set_logprobs(model, tokenizer, prompts: Sequence[str], completion_sets: Sequence[Sequence[str]], *,
                            batch_size: int = 8, append_eos: bool = True,
                            desc: str = "score") -> list[list[tuple[float, int]]]:
    """``completion_logprobs`` for k completions of each prompt (a chosen and a rejected
    answer: k=2). Each prompt runs through the model once for all k completions, which
    nearly halves the work on preference pairs (prompts are most of it): packed in rows with
    the completions after it (tunepipe.continuations, where the model runs tunepipe.attention's
    packed SDPA: a system prompt too is computed once per row), else through its KV cache."""
    from tunepipe.attention import PACKED_SDPA
    from tunepipe.generation import encode_prompts, inference_batches, pad_id_for
    from tunepipe.tokenization import encode_answers

    _same_length(prompts, completion_sets)
    if len({len(cs) for cs in completion_sets}) > 1:
        raise ValueError("every prompt needs the same number of completions")
    prompt_ids = encode_prompts(tokenizer, prompts)
    eos = [tokenizer.eos_token_id] if append_eos else []
    rows = [(p, [c + eos for c in encode_answers(tokenizer, list(cs))]) for p, cs in zip(prompt_ids, completion_sets)]
    if (getattr(getattr(model, "config", None), "_attn_implementation", None) == PACKED_SDPA
            and all(p and all(cs) for p, cs in rows)):  # every prompt and completion has a token
        return _score_packed(model, rows, batch_size, desc)
    score = _score_shared_batch if _accepts(model, "past_key_values") else _score_separately
    pad_id, device = pad_id_for(model, tokenizer), next(model.parameters()).device
    out: list[Optional[list]] = [None] * len(rows)
    lengths = [len(p) + max(map(len, cs), default=0) for p, cs in rows]
    for batch in inference_batches(model, lengths, batch_size, desc):
        for i, scores in zip(batch, score(model, [rows[i] for i in batch], pad_id, device)):
            out[i] = scores
    return out


def _score_packed(model, rows, batch_size: int, desc: str) -> list[list[tuple[float, int]]]:
    from tunepipe.continuations import TOKENS_PER_BATCH_ITEM, score

    k = len(rows[0][1])
    flat = score(model, [(p, c) for p, cs in rows for c in cs], tokens_per_row=batch_size * TOKENS_PER_BATCH_ITEM,
                 show_progress=True, desc=desc)
    counts = [len(c) for _, cs in rows for c in cs]
    return [[(flat[i * k + j][0], counts[i * k + j]) for j in range(k)] for i in range(len(rows))]


def _score_separately(model, rows, pad_id: int, device) -> list[list[tuple[float, int]]]:
    """For a model that takes no KV cache: each (prompt, completion) on its own."""
    k = len(rows[0][1])
    flat = _score_batch(model, [(p, c) for p, cs in rows for c in cs], pad_id, device)
    return [flat[i * k:(i + 1) * k] for i in range(len(rows))]


def _score_shared_batch(model, rows, pad_id: int, device) -> list[list[tuple[float, int]]]:
    """One pass over the left-padded prompts fills the KV cache; each of the k
    completion sets then continues from (a copy of) it, padded only to its own
    longest member (a 3-token chosen answer is not padded to a 60-token rejected one)."""
    import copy

    import torch

    from tunepipe.generation import left_pad

    ids_p, att_p = left_pad([p for p, _ in rows], pad_id)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    first = model(input_ids=ids_p.to(device), attention_mask=att_p.to(device),
                  position_ids=(att_p.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True, **extra)
    head = first.logits[:, -1].float()  # predicts each completion's first token
    k = len(rows[0][1])
    scores = []
    for j in range(k):
        cache = first.past_key_values if j == k - 1 else copy.deepcopy(first.past_key_values)
        scores.append(_continue_and_score(model, cache, att_p, head, [cs[j] for _, cs in rows], pad_id, device))
    return [list(per_row) for per_row in zip(*scores)]


def _continue_and_score(model, cache, att_p, head, comps, pad_id: int, device) -> list[tuple[float, int]]:
    import torch

    width = max(max(map(len, comps)), 1)
    ids = torch.full((len(comps), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for r, c in enumerate(comps):  # right padding: pads only after the real tokens
        ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        att[r, :len(c)] = 1
    positions = att_p.sum(-1, keepdim=True) + torch.arange(width)[None]  # continue each prompt's count
    logits = model(input_ids=ids.to(device), attention_mask=torch.cat([att_p, att], -1).to(device),
                   position_ids=positions.to(device), past_key_values=cache, use_cache=True).logits
    ids, att = ids.to(device), att.to(device).bool()
    first = (head.gather(-1, ids[:, :1]) - torch.logsumexp(head, -1, keepdim=True)).squeeze(-1) * att[:, 0]
    mask = att[:, 1:]  # logits at j predict token j+1
    picked = logits[:, :-1][mask].float()
    token_logp = picked.gather(-1, ids[:, 1:][mask][:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    sums = first.index_add(0, mask.nonzero()[:, 0], token_logp)
    return [(float(s), int(n)) for s, n in zip(sums.tolist(), att.sum(-1).tolist())]


def _score_batch(model, rows, pad_id: int, device) -> list[tuple[float, int]]:
    """Each (prompt, completion) as one sequence, left-padded so every completion
    ends at the last position: the LM head then runs only on the last (longest
    completion + 1) positions instead of the whole prompt."""
    import torch

    width = max(len(p) + len(c) for p, c in rows)
    keep = min(max(len(c) for _, c in rows) + 1, width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    scored = torch.zeros_like(ids, dtype=torch.bool)  # positions holding a completion token
    for k, (p, c) in enumerate(rows):
        ids[k, width - len(p) - len(c):] = torch.tensor(p + c)
        attention[k, width - len(p) - len(c):] = 1
        scored[k, width - len(c):] = True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
    extra = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device),
                   position_ids=positions.to(device), **extra).logits[:, -keep:]
    # logits at t predict token t+1; normalise only where a completion token is predicted
    # (not over padding, and without a second vocabulary-sized tensor)
    mask = scored[:, width - keep + 1:].to(device)
    picked = logits[:, :-1][mask].float()
    targets = ids[:, width - keep + 1:].to(device)[mask]
    token_logp = picked.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    rows_of = mask.nonzero()[:, 0]
    sums = torch.zeros(len(rows), device=device, dtype=token_logp.dtype).index_add_(0, rows_of, token_logp)
    counts = mask.sum(-1)
    return [(float(s), int(n)) for s, n in zip(sums.tolist(), counts.tolist())]


def _accepts(model, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(model.forward).parameters


def perplexity(scores: Sequence[tuple[float, int]]) -> dict:
    """Token-weighted mean NLL over all completion tokens, and its exp."""
    total = sum(n for _, n in scores)
    if total == 0:
        return {}
    nll = -sum(s for s, _ in scores) / total
    return {"nll": nll, "perplexity": math.exp(nll)}


def preference(chosen: Sequence[tuple[float, int]], rejected: Sequence[tuple[float, int]]) -> dict:
    """Share of pairs where the chosen answer has the higher summed log-prob
    (a tie counts as wrong), and the mean margin log p(chosen) - log p(rejected)."""
    _same_length(chosen, rejected)
    if not chosen:
        return {}
    margins = [c - r for (c, _), (r, _) in zip(chosen, rejected)]
    return {"pref_accuracy": sum(m > 0 for m in margins) / len(margins),
            "pref_margin": sum(margins) / len(margins)}


def prefers_per_token(chosen_logp: float, chosen_tokens: int, rejected_logp: float, rejected_tokens: int) -> bool:
    """Length-normalised preference: the chosen answer has the higher mean log-prob per token.

    The summed log-prob favours whichever answer is shorter (every token costs), so a
    rambling or looping rejected answer loses by its length alone; per token it does not.
    """
    return chosen_logp / max(chosen_tokens, 1) > rejected_logp / max(rejected_tokens, 1)


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
