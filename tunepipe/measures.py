"""Per-model measures with intervals, trivial baselines and paired comparisons: what
metrics/eval.json holds, computed from the evaluate stage's per-item rows.

    measures = {**generation_measures(generations), **preference_measures(preferences)}
    summarise(measures, params.compare)          # {"task_accuracy": .., "task_accuracy_ci_low": .., ...}
    compute(runs, train_records, test_records, params.compare)   # the whole of eval.json

Intervals: Wilson for proportions, a seeded percentile bootstrap over items for the rest
(tunepipe.stats). Paired tests on the items both models answered: exact McNemar for
proportions, a paired bootstrap otherwise. Used by the compare stage and by export's model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from tunepipe import stats

MODEL_ORDER = ("base", "sft", "final")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DECIMALS = 4


# --------------------------------------------------------------------------- per-item measures


@dataclass(frozen=True)
class Measure:
    """One metric of one model (or baseline) as its per-item data, keyed by item id.

    ``exact``: the values are 0/1 outcomes, so the interval is Wilson's and a paired
    test is McNemar's; otherwise ``build`` turns rows of ``values`` into a bootstrap Statistic.
    """
    ids: tuple
    values: np.ndarray
    build: Callable[[np.ndarray], stats.Statistic] = stats.mean
    exact: bool = False

    def value(self) -> float:
        return self.build(self.values).value()

    def interval(self, cfg) -> tuple[float, float]:
        if self.exact:
            return stats.proportion_interval(self.values, cfg.confidence)
        return stats.bootstrap_interval(self.build(self.values), confidence=cfg.confidence,
                                        resamples=cfg.bootstrap_resamples, seed=cfg.seed)


def proportion(rows: list[dict], outcome: Callable[[dict], bool]) -> Measure:
    return Measure(tuple(r["id"] for r in rows), np.array([bool(outcome(r)) for r in rows], dtype=float), exact=True)


def scores(rows: list[dict], values, build=stats.mean) -> Measure:
    return Measure(tuple(r["id"] for r in rows), np.asarray(values, dtype=float), build)


def _perplexity(v: np.ndarray) -> stats.Statistic:
    return stats.perplexity(v[:, 0], v[:, 1])


def generation_measures(gens: list[dict]) -> dict[str, Measure]:
    """Task accuracy (overall, per family), overlap with the reference, perplexity, health."""
    from tunepipe.metrics import bleu_item_stats

    out: dict[str, Measure] = {}
    checked = [g for g in gens if g.get("task") is not None]  # items without a checker have no verdict
    if checked:
        out["task_accuracy"] = proportion(checked, lambda g: g["task"] == "pass")
        for family in sorted({str(g.get("family") or "other") for g in checked}):
            rows = [g for g in checked if str(g.get("family") or "other") == family]
            out[f"acc_{family}"] = proportion(rows, lambda g: g["task"] == "pass")
    if not gens:
        return out
    for key in ROUGE_TYPES:
        if all(key in g for g in gens):
            out[key] = scores(gens, [g[key] for g in gens])
    out["bleu"] = scores(gens, bleu_item_stats([g["output"] for g in gens], [g["reference"] for g in gens]),
                         stats.corpus_bleu)
    if all("ref_logp" in g and "ref_tokens" in g for g in gens):
        out["perplexity"] = scores(gens, [[g["ref_logp"], g["ref_tokens"]] for g in gens], _perplexity)
    out["eos_rate"] = proportion(gens, lambda g: g.get("stopped_at_eos"))
    # "repetitive" is the evaluate stage's repeated-n-gram verdict (evaluate.repeat_ngram)
    out["repeat_rate"] = proportion(gens, lambda g: "repetitive" in (g.get("failures") or []))
    out["truncated_rate"] = proportion(gens, lambda g: g.get("truncated"))
    out["mean_new_tokens"] = scores(gens, [g.get("n_new_tokens", 0) for g in gens])
    return out


def normalised_correct(p: dict) -> bool:
    from tunepipe.metrics import prefers_per_token

    return prefers_per_token(p["chosen_logp"], p["chosen_tokens"], p["rejected_logp"], p["rejected_tokens"])


def preference_measures(prefs: list[dict]) -> dict[str, Measure]:
    if not prefs:
        return {}
    out = {"pref_accuracy": proportion(prefs, lambda p: p["correct"])}
    has_tokens = all("chosen_tokens" in p and "rejected_tokens" in p for p in prefs)
    if has_tokens:
        out["pref_accuracy_norm"] = proportion(prefs, normalised_correct)
    out["pref_margin"] = scores(prefs, [p["margin"] for p in prefs])
    for kind in sorted({str(p.get("rejected_kind") or "unknown") for p in prefs}):
        rows = [p for p in prefs if str(p.get("rejected_kind") or "unknown") == kind]
        out[f"pref_acc_{kind}"] = proportion(rows, lambda p: p["correct"])
        if has_tokens:
            out[f"pref_acc_norm_{kind}"] = proportion(rows, normalised_correct)
    return out


# --------------------------------------------------------------------------- summaries and comparisons


def summarise(measures: dict[str, Measure], cfg) -> dict:
    """{metric: value, metric_ci_low, metric_ci_high} for every measure."""
    out = {}
    for name, m in measures.items():
        low, high = m.interval(cfg)
        out.update({name: m.value(), f"{name}_ci_low": low, f"{name}_ci_high": high})
    return out


def paired(a: Measure, b: Measure, cfg) -> Optional[dict]:
    """a - b on the items both have: delta, interval, p-value (McNemar when both are 0/1 outcomes)."""
    where_b = {i: k for k, i in enumerate(b.ids)}
    common = [(k, where_b[i]) for k, i in enumerate(a.ids) if i in where_b]
    if not common:
        return None
    ia, ib = (np.array(c) for c in zip(*common))
    va, vb = a.values[ia], b.values[ib]
    opts = dict(confidence=cfg.confidence, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    if a.exact and b.exact:
        result = stats.compare_proportions(va.astype(bool), vb.astype(bool), **opts)
    else:
        result = stats.paired_bootstrap(a.build(va), b.build(vb), **opts)
    return {**result, "n": len(common)}


def comparison(a: dict[str, Measure], b: dict[str, Measure], cfg) -> dict:
    """Flat keys <metric>_delta, _delta_ci_low, _delta_ci_high, _p_value, _significant."""
    out, n_paired = {}, 0
    for name in (k for k in a if k in b):
        result = paired(a[name], b[name], cfg)
        if result is None:
            continue
        n_paired = max(n_paired, result["n"])
        out.update({f"{name}_delta": result["delta"], f"{name}_delta_ci_low": result["ci_low"],
                    f"{name}_delta_ci_high": result["ci_high"], f"{name}_p_value": result["p_value"],
                    f"{name}_significant": bool(result["p_value"] < cfg.alpha)})
    return {**out, "n_paired": n_paired}


def comparison_pairs(models: list[str]) -> list[tuple[str, str]]:
    """Each model against the one before it, and the last against the first."""
    pairs = [(models[i], models[i - 1]) for i in range(1, len(models))]
    return pairs + ([(models[-1], models[0])] if len(models) > 2 else [])


# --------------------------------------------------------------------------- baselines


def baseline_measures(train_metas: list[dict], test: list[dict]) -> dict[str, dict[str, Measure]]:
    """Trivial baselines on the evaluated test items (``test``: {"id", "meta"}): each answers
    every question without reading it, so a model has to beat the best of them to show skill."""
    from tunepipe import tasks

    metas = [t["meta"] for t in test]
    out = {}
    for name, answers in tasks.trivial_baselines(train_metas, metas).items():
        verdicts = [{"id": t["id"], "family": t["meta"].get("family"),
                     "task": None if a is None else (tasks.check(t["meta"], a) or "pass")}
                    for t, a in zip(test, answers)]
        out[name] = _accuracy_measures([v for v in verdicts if v["task"] is not None],
                                       lambda rows: proportion(rows, lambda v: v["task"] == "pass"))
    checkable = [t for t in test if tasks.has_check(t["meta"])]
    # the expected accuracy of guessing uniformly among the answer type's options
    random_name = "random" if "random" not in out else "random_choice"
    out[random_name] = _accuracy_measures(
        [{"id": t["id"], "family": t["meta"].get("family"), "p": tasks.random_choice_accuracy(t["meta"])}
         for t in checkable], lambda rows: scores(rows, [r["p"] for r in rows]))
    return {name: m for name, m in out.items() if m}


def _accuracy_measures(rows: list[dict], measure: Callable[[list[dict]], Measure]) -> dict[str, Measure]:
    if not rows:
        return {}
    out = {"task_accuracy": measure(rows)}
    for family in sorted({str(r.get("family") or "other") for r in rows}):
        out[f"acc_{family}"] = measure([r for r in rows if str(r.get("family") or "other") == family])
    return out


def headline(model: str, measures: dict[str, Measure], baselines: dict[str, dict[str, Measure]], cfg) -> dict:
    """The model's task accuracy against the best trivial baseline, paired on the same items."""
    if "task_accuracy" not in measures or not baselines:
        return {}
    best = max(baselines, key=lambda b: baselines[b]["task_accuracy"].value())
    result = paired(measures["task_accuracy"], baselines[best]["task_accuracy"], cfg)
    if result is None:
        return {}
    out = {"model": model, "baseline": best, "baseline_accuracy": baselines[best]["task_accuracy"].value(),
           "delta": result["delta"], "delta_ci_low": result["ci_low"], "delta_ci_high": result["ci_high"],
           "p_value": result["p_value"], "significant": bool(result["p_value"] < cfg.alpha)}
    return {**out, "text": headline_text(out, cfg.confidence)}


def headline_text(h: dict, confidence: float) -> str:
    """"final: 21.9 points above the best trivial baseline (constant, 16.7%; 95% CI +10.4 to +33.3, p<0.001)"."""
    side = "above" if h["delta"] >= 0 else "below"
    return (f"{h['model']}: {abs(h['delta']) * 100:.1f} points {side} the best trivial baseline "
            f"({h['baseline']}, {h['baseline_accuracy']:.1%}; {confidence:.0%} CI {h['delta_ci_low'] * 100:+.1f} "
            f"to {h['delta_ci_high'] * 100:+.1f} points, {format_p(h['p_value'])})")


def format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


# --------------------------------------------------------------------------- eval.json


def compute(runs: dict, train_records: list[dict], test_records: list[dict], cfg) -> dict:
    """The whole of metrics/eval.json, unrounded."""
    models = list(runs)
    measures = {m: {**generation_measures(g), **preference_measures(p)} for m, (g, p) in runs.items()}
    out: dict = {"models": models}
    for m, (g, p) in runs.items():
        n_checked = sum(1 for row in g if row.get("task") is not None)
        out[m] = {**summarise(measures[m], cfg), "n_prompts": len(g), "n_pairs": len(p), "n_checked": n_checked}
    baselines = baseline_measures([r.get("meta") or {} for r in train_records], evaluated_items(runs, test_records))
    for name, ms in baselines.items():
        out[f"baseline_{name}"] = {**summarise(ms, cfg), "n_checked": len(ms["task_accuracy"].ids)}
    out["comparisons"] = {f"{a}_vs_{b}": comparison(measures[a], measures[b], cfg)
                          for a, b in comparison_pairs(models)}
    out["headline"] = headline(models[-1], measures[models[-1]], baselines, cfg)
    out["settings"] = {"confidence": cfg.confidence, "alpha": cfg.alpha, "bootstrap_resamples": cfg.bootstrap_resamples}
    out["test_size"] = stats.test_size_note(len(next(iter(runs.values()))[0]), cfg.alpha, cfg.confidence)
    return out


def evaluated_items(runs: dict, test_records: list[dict]) -> list[dict]:
    """{"id", "meta"} of the test records the models answered, in their order."""
    by_id = {r.get("id"): r.get("meta") or {} for r in test_records}
    gens = next(iter(runs.values()))[0]
    return [{"id": g["id"], "meta": by_id[g["id"]]} for g in gens if g.get("id") in by_id]


def rounded(obj):
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, DECIMALS) if np.isfinite(obj) else None  # JSON has no NaN
    return obj
