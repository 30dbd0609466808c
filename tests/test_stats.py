"""Intervals and paired tests against values worked out independently of the code under test."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

import numpy as np
import pytest

from tunepipe import metrics, stats


def wilson_closed_form(k: int, n: int, confidence: float) -> tuple[float, float]:
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# --------------------------------------------------------------------------- Wilson


def test_wilson_at_zero_successes_is_z2_over_n_plus_z2():
    # with no successes the interval is [0, z^2 / (n + z^2)]: 3.8415 / 13.8415 for n = 10
    z2 = NormalDist().inv_cdf(0.975) ** 2
    low, high = stats.wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(z2 / (10 + z2), abs=1e-9)
    assert high == pytest.approx(0.2775, abs=1e-4)


@pytest.mark.parametrize("k,n,confidence", [(38, 96, 0.95), (16, 96, 0.95), (96, 96, 0.95), (7, 19, 0.9),
                                            (1, 3, 0.99)])
def test_wilson_matches_the_closed_form(k, n, confidence):
    assert stats.wilson_interval(k, n, confidence) == pytest.approx(wilson_closed_form(k, n, confidence), abs=1e-9)


def test_wilson_of_nothing_says_nothing_and_bad_counts_are_errors():
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes must be in"):
        stats.wilson_interval(5, 4)


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_on_a_constructed_table():
    # 8 items only a got right, 2 only b, 5 both, 3 neither:
    # p = 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    a = [True] * 8 + [False] * 2 + [True] * 5 + [False] * 3
    b = [False] * 8 + [True] * 2 + [True] * 5 + [False] * 3
    got = stats.mcnemar_exact(a, b)
    assert got == {"a_only": 8, "b_only": 2, "n": 18, "p_value": pytest.approx(112 / 1024)}
    assert stats.mcnemar_exact(b, a)["p_value"] == pytest.approx(112 / 1024)  # two-sided: symmetric


def test_mcnemar_one_sided_discordance_and_none():
    assert stats.mcnemar_exact([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0])["p_value"] == pytest.approx(2 / 32)
    assert stats.mcnemar_exact([1, 0, 1], [1, 0, 1]) == {"a_only": 0, "b_only": 0, "n": 3, "p_value": 1.0}
    with pytest.raises(ValueError, match="differ in length"):
        stats.mcnemar_exact([True], [True, False])


# --------------------------------------------------------------------------- bootstrap


def test_resampling_is_seeded_and_shared():
    a = stats.resample_indices(50, 200, 3)
    assert a.shape == (200, 50) and a.min() >= 0 and a.max() < 50
    assert np.array_equal(a, stats.resample_indices(50, 200, 3))
    assert not np.array_equal(a, stats.resample_indices(50, 200, 4))


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    # for 400 normal values the percentile bootstrap approximates mean +- 1.96 sd / sqrt(n)
    rng = np.random.default_rng(1)
    x = rng.normal(10, 2, 400)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(len(x))
    low, high = stats.bootstrap_interval(stats.mean(x), resamples=4000, seed=0)
    assert low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_bootstrap_is_deterministic_and_degenerate_data_gives_a_point():
    values = [random.Random(5).random() for _ in range(30)]
    assert stats.bootstrap_interval(stats.mean(values), seed=7) == stats.bootstrap_interval(stats.mean(values), seed=7)
    assert stats.bootstrap_interval(stats.mean([0.25] * 30)) == (0.25, 0.25)
    assert all(math.isnan(v) for v in stats.bootstrap_interval(stats.mean([])))


def test_perplexity_statistic_is_token_weighted():
    scores = [(-2.0, 1), (-9.0, 3), (-0.5, 2)]
    stat = stats.perplexity([s for s, _ in scores], [n for _, n in scores])
    assert stat.value() == pytest.approx(metrics.perplexity(scores)["perplexity"])
    assert stat.value() == pytest.approx(math.exp(11.5 / 6))


def test_corpus_bleu_statistic_matches_corpus_bleu():
    preds = ["the cat sat on the mat", "a dog", "one two three four", ""]
    refs = ["the cat sat on a mat", "a big dog", "one two three four five", "nothing"]
    stat = stats.corpus_bleu(metrics.bleu_item_stats(preds, refs))
    assert stat.value() == pytest.approx(metrics.bleu(preds, refs))
    # a resample is the corpus BLEU of the items drawn: items 0 and 0 again
    assert stat.of(np.array([[0, 0]]))[0] == pytest.approx(metrics.bleu(preds[:1] * 2, refs[:1] * 2))


# --------------------------------------------------------------------------- paired tests


def test_paired_bootstrap_of_a_constant_shift():
    # b = a + 0.1 on every item: every resample's delta is 0.1, so the p-value is the smallest possible
    a = [random.Random(2).random() for _ in range(40)]
    got = stats.paired_bootstrap(stats.mean([v + 0.1 for v in a]), stats.mean(a), resamples=999)
    assert got["delta"] == pytest.approx(0.1)
    assert got["ci_low"] == pytest.approx(0.1) and got["ci_high"] == pytest.approx(0.1)
    assert got["p_value"] == pytest.approx(2 / 1000)


def test_paired_bootstrap_of_identical_models_and_of_noise():
    a = [random.Random(3).random() for _ in range(60)]
    same = stats.paired_bootstrap(stats.mean(a), stats.mean(a))
    assert same["delta"] == 0 and same["p_value"] == 1.0
    # a random half of the items +0.02, the rest -0.02: no real difference, interval straddles 0
    rng = random.Random(4)
    b = [v + rng.choice([0.02, -0.02]) for v in a]
    noise = stats.paired_bootstrap(stats.mean(b), stats.mean(a))
    assert noise["ci_low"] < 0 < noise["ci_high"] and noise["p_value"] > 0.05


def test_paired_bootstrap_needs_the_same_items():
    with pytest.raises(ValueError, match="same items"):
        stats.paired_bootstrap(stats.mean([1, 2]), stats.mean([1, 2, 3]))


def test_compare_proportions_uses_mcnemar_for_the_p_value():
    a = [True] * 8 + [False] * 2 + [True] * 5 + [False] * 3
    b = [False] * 8 + [True] * 2 + [True] * 5 + [False] * 3
    got = stats.compare_proportions(a, b)
    assert got["delta"] == pytest.approx(6 / 18)
    assert got["p_value"] == pytest.approx(112 / 1024) and (got["a_only"], got["b_only"]) == (8, 2)
    assert got["ci_low"] < 6 / 18 < got["ci_high"]


# --------------------------------------------------------------------------- what a test split can show


@pytest.mark.parametrize("alpha,d", [(0.05, 6), (0.01, 8), (0.1, 5), (0.0625, 6), (1.0, 2)])
def test_mcnemar_min_discordant_is_the_first_significant_one_way_split(alpha, d):
    # d discordant pairs all one way: the exact two-sided p-value is 2 / 2^d; d - 1 would not do
    assert stats.mcnemar_min_discordant(alpha) == d
    assert stats.mcnemar_exact([1] * d, [0] * d)["p_value"] < alpha
    assert stats.mcnemar_exact([1] * (d - 1), [0] * (d - 1))["p_value"] >= alpha


def test_test_size_note_for_eight_items_is_small():
    note = stats.test_size_note(8)
    assert note["n_items"] == 8 and note["small"] is True
    assert note["min_significant_pts"] == pytest.approx(100 * 6 / 8)
    low, high = wilson_closed_form(4, 8, 0.95)  # 4 of 8: the Wilson interval at 50%
    assert note["wilson_halfwidth_pts"] == pytest.approx(100 * (high - low) / 2)
    assert note["wilson_halfwidth_pts"] == pytest.approx(28.48, abs=0.01)


@pytest.mark.parametrize("n,min_pts,small", [(0, 100.0, True), (3, 100.0, True), (29, 600 / 29, True),
                                             (30, 20.0, True), (49, 600 / 49, True), (50, 12.0, False),
                                             (200, 3.0, False)])
def test_test_size_note_caps_at_100_points_and_flags_small_splits(n, min_pts, small):
    note = stats.test_size_note(n)
    assert note["min_significant_pts"] == pytest.approx(min_pts) and note["small"] is small


def test_test_size_note_follows_alpha_and_confidence():
    strict = stats.test_size_note(40, alpha=0.01, confidence=0.99)
    assert strict["min_significant_pts"] == pytest.approx(100 * 8 / 40)
    low, high = wilson_closed_form(20, 40, 0.99)
    assert strict["wilson_halfwidth_pts"] == pytest.approx(100 * (high - low) / 2)
    with pytest.raises(ValueError, match="alpha"):
        stats.test_size_note(40, alpha=0)
