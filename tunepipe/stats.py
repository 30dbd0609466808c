"""Intervals and paired significance tests for evaluation metrics.

Proportions get Wilson intervals and, paired, exact McNemar tests; every other
metric (a mean of per-item scores, or a corpus statistic such as BLEU or
perplexity) gets a seeded percentile bootstrap over items and, paired, a
bootstrap that resamples the same items for both models. Everything is
deterministic: the resampled indices depend only on (n, resamples, seed).

    wilson_interval(38, 96)                          -> (0.30, 0.50)
    mcnemar_exact(final_ok, base_ok)                 -> {"a_only", "b_only", "n", "p_value"}
    rouge = mean(per_item_rougeL)                     # a Statistic: any metric of resampled items
    bootstrap_interval(rouge, resamples=1000, seed=0) -> (low, high)
    paired_bootstrap(mean(final), mean(base))        -> {"delta", "ci_low", "ci_high", "p_value"}
    compare_proportions(final_ok, base_ok)           -> the same, with McNemar's p-value
    test_size_note(8)                                -> {"min_significant_pts": 75.0, "small": True, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from scipy import stats as _sp

DEFAULT_RESAMPLES = 1000
# A test split is "small" (test_size_note) under this many items, or when no difference
# in a rate below this many points could be significant on it.
SMALL_TEST_ITEMS = 50
SMALL_TEST_MIN_PTS = 20.0


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of successes/n (no continuity correction).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at
    0/n and n/n, which small test splits hit. n == 0 says nothing: (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    ci = _sp.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test: do models a and b differ in accuracy on the same items?

    Only discordant items (one right, the other wrong) carry information; under
    the null each is equally likely to favour a or b, so a_only ~ Binomial(a_only
    + b_only, 1/2) and the p-value is the exact two-sided binomial test.
    """
    _same_length(a, b)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    discordant = a_only + b_only
    p = _sp.binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    return {"a_only": a_only, "b_only": b_only, "n": len(a), "p_value": float(min(p, 1.0))}


# --------------------------------------------------------------------------- statistics of resampled items


@dataclass(frozen=True)
class Statistic:
    """A metric of n items that can be computed on many resamples at once.

    ``of`` maps an (r, n) array of item indices (each row one resample) to the r
    values of the metric; the point estimate is the metric of the items as they are.
    """
    n: int
    of: Callable[[np.ndarray], np.ndarray]

    def value(self) -> float:
        return float(self.of(np.arange(self.n)[None])[0])


def mean(values: Sequence[float]) -> Statistic:
    """The mean of per-item scores (ROUGE, a 0/1 pass, a probability)."""
    v = np.asarray(values, dtype=float)
    return Statistic(len(v), lambda idx: v[idx].mean(axis=1))


def perplexity(logps: Sequence[float], tokens: Sequence[int]) -> Statistic:
    """exp(summed NLL / summed tokens) over the items: token-weighted, as metrics.perplexity."""
    lp, nt = np.asarray(logps, dtype=float), np.asarray(tokens, dtype=float)
    _same_length(lp, nt)
    return Statistic(len(lp), lambda idx: np.exp(-lp[idx].sum(axis=1) / np.maximum(nt[idx].sum(axis=1), 1)))


def corpus_bleu(item_stats: Sequence[Sequence[int]]) -> Statistic:
    """Corpus BLEU of the items, from metrics.bleu_item_stats (BLEU is a function of their sums)."""
    from tunepipe.metrics import BLEU_STATS, bleu_from_stats

    s = np.asarray(item_stats, dtype=float).reshape(-1, BLEU_STATS)
    return Statistic(len(s), lambda idx: bleu_from_stats(s[idx].sum(axis=1)))


# --------------------------------------------------------------------------- bootstrap


@lru_cache(maxsize=16)
def resample_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement; the same for the same arguments,
    so two models scored on the same items are resampled identically (a paired bootstrap)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    idx.setflags(write=False)  # cached and shared: nobody may change it
    return idx


def bootstrap_interval(stat: Statistic, *, confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat``; (nan, nan) with no items."""
    if stat.n == 0:
        return float("nan"), float("nan")
    values = stat.of(resample_indices(stat.n, resamples, seed))
    return _percentiles(values, confidence)


def paired_bootstrap(a: Statistic, b: Statistic, *, confidence: float = 0.95,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Difference a - b on the same n items: delta, its percentile interval and a two-sided p-value.

    Each resample takes the same items for both, so what the items share (easy
    and hard questions) cancels. The p-value inverts the percentile interval: twice
    the share of resampled deltas on the far side of 0, with add-one smoothing so
    it is never 0 (the smallest is 2 / (resamples + 1)).
    """
    if a.n != b.n:
        raise ValueError(f"paired statistics need the same items: {a.n} vs {b.n}")
    if a.n == 0:
        return {"delta": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p_value": 1.0}
    idx = resample_indices(a.n, resamples, seed)
    deltas = a.of(idx) - b.of(idx)
    low, high = _percentiles(deltas, confidence)
    tail = min(np.sum(deltas <= 0), np.sum(deltas >= 0))
    p = min(1.0, 2 * (tail + 1) / (len(deltas) + 1))
    return {"delta": a.value() - b.value(), "ci_low": low, "ci_high": high, "p_value": float(p)}


def compare_proportions(a: Sequence[bool], b: Sequence[bool], *, confidence: float = 0.95,
                        resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Accuracy of a minus accuracy of b on the same items: the paired bootstrap's
    delta and interval, and the exact McNemar p-value (and its discordant counts)."""
    _same_length(a, b)
    out = paired_bootstrap(mean(a), mean(b), confidence=confidence, resamples=resamples, seed=seed)
    test = mcnemar_exact(a, b)
    return {**out, "p_value": test["p_value"], "a_only": test["a_only"], "b_only": test["b_only"]}


def proportion_interval(outcomes: Sequence[bool], confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of a list of pass/fail outcomes."""
    return wilson_interval(sum(map(bool, outcomes)), len(outcomes), confidence)


def mcnemar_min_discordant(alpha: float = 0.05) -> int:
    """The fewest discordant pairs an exact McNemar test can call significant: all d of them
    one way gives the smallest two-sided p-value, 2 * 0.5**d, so the smallest d with that < alpha."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    d = 1
    while 2 * 0.5 ** d >= alpha:
        d += 1
    return d


def wilson_halfwidth(n: int, p: float = 0.5, confidence: float = 0.95) -> float:
    """Half the width of the Wilson interval at observed share p of n items (widest at 0.5);
    closed form, so it holds for any n, not only where p * n is a whole count."""
    if n <= 0:
        return 0.5
    z = float(_sp.norm.ppf(0.5 + confidence / 2))
    return z / (1 + z * z / n) * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)))


def test_size_note(n: int, alpha: float = 0.05, confidence: float = 0.95) -> dict:
    """What n paired test items can show, for the report's warning on a small test split:
    the smallest difference in a right/wrong rate between two models that could ever be
    significant (every discordant pair one way, as a share of n, in points, at most 100),
    and the Wilson half-width at 50% in points. Small: under 50 items (each figure then known
    to no better than ±14 points), or that smallest difference is over 20 points."""
    d = mcnemar_min_discordant(alpha)
    min_pts = min(100.0, 100.0 * d / n) if n > 0 else 100.0
    return {"n_items": int(n), "min_discordant": d, "min_significant_pts": min_pts,
            "wilson_halfwidth_pts": 100.0 * wilson_halfwidth(n, 0.5, confidence),
            "small": bool(n < SMALL_TEST_ITEMS or min_pts > SMALL_TEST_MIN_PTS)}


test_size_note.__test__ = False  # named test_*: keep pytest from collecting it where a test module imports it


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def _same_length(a, b) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired results differ in length: {len(a)} vs {len(b)}")
