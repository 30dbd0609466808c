"""The run report: metrics with intervals, baselines and tested deltas, curves, samples, error analysis, provenance.

Everything here is pure data -> text or PNG; stages/report.py reads the files and
writes reports/ atomically. ``metrics`` is the compare stage's metrics/eval.json:
per model ``<metric>``, ``<metric>_ci_low``, ``<metric>_ci_high``; ``baseline_<name>``;
``comparisons`` (``<a>_vs_<b>``: ``<metric>_delta``, ``_p_value``, ``_significant``); ``headline``.

    curves = read_curves("metrics/train_sft/plots")           # {"loss": [(step, v)], "eval/loss": ...}
    figures = training_figures(sft_curves, dpo_curves) + [skill_figure(metrics, models)]
    rows = metric_rows(metrics, models)                       # values with intervals, baselines, deltas
    fmt_delta("task_accuracy", delta)                         # "+21.9 pts (p<0.001) *"
    has_checker(report)   # False on free-text data: reference scores and health lead, no ✓ / ✗
    alignment = alignment_of(train_dpo_json, params.train_dpo.model_dump(), curves=dpo_curves,
                             heldout=rows, rollouts=rows, reward_model=train_reward_json)
    alignment.figures = hacking_figures(alignment)            # reward vs held-out accuracy, KL, length drift
    hacking_verdict(alignment, alpha, confidence)             # (warnings, every number checked)
    md, page = render_markdown(report), render_html(report)
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tunepipe.metrics import CHECKER_KINDS, FAILURE_KINDS

# Metrics where a smaller value is the better one; every other metric: larger is better.
LOWER_IS_BETTER = {"perplexity", "nll", "repeat_rate", "truncated_rate"}
# Neither better nor worse when they change.
NEUTRAL = {"mean_new_tokens", "n_prompts", "n_pairs", "n_checked"}
COUNTS = ("n_prompts", "n_checked", "n_pairs")
METRIC_ORDER = ("task_accuracy", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "perplexity", "nll",
                "pref_accuracy_norm", "pref_accuracy", "pref_margin", "eos_rate", "repeat_rate", "truncated_rate",
                "mean_new_tokens")
# Proportions, shown in percent (deltas in percentage points).
PERCENT = {"task_accuracy", "pref_accuracy", "pref_accuracy_norm", "eos_rate", "repeat_rate", "truncated_rate"}
PERCENT_PREFIXES = ("acc_", "pref_acc_")
CI = ("_ci_low", "_ci_high")
NOT_MODELS = {"models", "comparisons", "headline", "settings", "test_size", "generation"}
# Without a task checker (free-text answers) these lead: overlap with the reference, its
# likelihood, then generation health; with labels for the headline.
REFERENCE_FIRST = (("rougeL", "ROUGE-L"), ("bleu", "BLEU"), ("perplexity", "reference perplexity"),
                   ("nll", "reference NLL"), ("eos_rate", "stopped at EOS"), ("truncated_rate", "truncated"),
                   ("repeat_rate", "repetitive"))
PREF_NOTE = ("Per token (length-normalised) first: it compares the mean log-prob per token of the chosen and "
             "the rejected answer. The summed log-prob prefers the shorter answer whatever it says, so a "
             "rambling or looping rejected answer loses by its length alone.")
PARAMS_HEADING = "Params (params.yaml as validated, defaults filled in)"
FAILURE_LABELS = {"wrong_answer": "wrong answer", "constraint_broken": "constraint broken",
                  "too_long": "too long", "repetitive": "repetitive", "no_stop": "no stop (before the limit)"}
NO_PREFERENCES = "No preference data: preference accuracy not measured."


@dataclass
class Figure:
    name: str        # file name under figures/
    title: str
    png: bytes


@dataclass
class Report:
    title: str
    models: list[str]
    metrics: dict                      # metrics/eval.json
    figures: list[Figure] = field(default_factory=list)
    missing_curves: list[str] = field(default_factory=list)
    generations: list[dict] = field(default_factory=list)
    n_samples: int = 8
    training: dict = field(default_factory=dict)   # {"sft": metrics/train_sft.json, "dpo": ...}
    params_text: str = ""
    manifest: Optional[dict] = None
    forgetting: Optional[dict] = None              # metrics/forgetting.json, when the forgetting stage ran
    alignment: Optional["Alignment"] = None        # train-dpo's algorithm and reward-hacking data


# --------------------------------------------------------------------------- tables


def eval_models(metrics: dict) -> list[str]:
    """The models of metrics/eval.json, in the compare stage's order."""
    listed = metrics.get("models")
    if isinstance(listed, list):
        return [m for m in listed if isinstance(metrics.get(m), dict)]
    return [k for k, v in metrics.items() if isinstance(v, dict) and k not in NOT_MODELS
            and not k.startswith("baseline_")]


def baseline_names(metrics: dict) -> list[str]:
    return sorted(k[len("baseline_"):] for k, v in metrics.items() if k.startswith("baseline_") and isinstance(v, dict))


def comparison_names(metrics: dict, models: list[str]) -> list[tuple[str, str, str]]:
    """(name, a, b) of each comparison "<a>_vs_<b>": each model against the one before it, then the rest."""
    found = []
    for name in (metrics.get("comparisons") or {}):
        a, _, b = name.partition("_vs_")
        if a in models and b in models:
            found.append((name, a, b))
    order = {m: i for i, m in enumerate(models)}
    return sorted(found, key=lambda c: (order[c[1]] - order[c[2]] != 1, order[c[1]], order[c[2]]))


def estimate(values: dict, metric: str) -> Optional[tuple]:
    """(value, ci_low, ci_high) of one metric in one model's (or baseline's) dict; None if absent."""
    v = values.get(metric)
    if not _num(v):
        return None
    return v, values.get(metric + CI[0]), values.get(metric + CI[1])


def paired_delta(comparison: dict, metric: str) -> Optional[dict]:
    d = comparison.get(f"{metric}_delta")
    if not _num(d):
        return None
    return {"delta": d, "low": comparison.get(f"{metric}_delta_ci_low"),
            "high": comparison.get(f"{metric}_delta_ci_high"), "p": comparison.get(f"{metric}_p_value"),
            "significant": bool(comparison.get(f"{metric}_significant"))}


def table_metrics(metrics: dict, models: list[str], checker: bool = True) -> list[str]:
    """The main table's metrics: headline ones in METRIC_ORDER (without a checker: REFERENCE_FIRST,
    and no task figures), then per-family accuracies, then the rest; not intervals, counts or
    per-rejected-kind preference accuracies (their own section)."""
    keys = {k for m in models for k, v in metrics.get(m, {}).items()
            if _num(v) and not k.endswith(CI) and not k.startswith("pref_acc_") and k not in COUNTS
            and (checker or not is_task_metric(k))}
    order = METRIC_ORDER if checker else tuple(k for k, _ in REFERENCE_FIRST) + METRIC_ORDER
    names = list(dict.fromkeys(m for m in order if m in keys))
    return names + sorted(keys - set(names), key=lambda m: (not m.startswith("acc_"), m))


def is_task_metric(metric: str) -> bool:
    return metric == "task_accuracy" or metric.startswith("acc_")


def metric_rows(metrics: dict, models: list[str], checker: bool = True) -> list[dict]:
    """One row per metric: each model's and baseline's (value, low, high), and each comparison's delta."""
    comparisons = comparison_names(metrics, models)
    rows = []
    for name in table_metrics(metrics, models, checker):
        rows.append({
            "metric": name, "direction": direction(name),
            "values": {m: estimate(metrics.get(m, {}), name) for m in models},
            "baselines": {b: estimate(metrics[f"baseline_{b}"], name) for b in baseline_names(metrics)},
            "deltas": {c: paired_delta(metrics["comparisons"][c], name) for c, _, _ in comparisons}})
    return rows


def direction(metric: str) -> int:
    """+1: higher is better, -1: lower is better, 0: neither."""
    return 0 if metric in NEUTRAL else -1 if metric in LOWER_IS_BETTER else 1


def is_percent(metric: str) -> bool:
    return metric in PERCENT or metric.startswith(PERCENT_PREFIXES) or metric.endswith(("accuracy", "_acc", "_rate"))


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v, signed: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:+d}" if signed else str(v)
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _number(metric: str, v: float, signed: bool = False) -> str:
    """A value in the metric's unit: percent for proportions, 3-4 significant digits otherwise."""
    sign = "+" if signed else ""
    if is_percent(metric):
        return f"{v * 100:{sign}.1f}"
    digits = 1 if abs(v) >= 100 else 2 if abs(v) >= 10 else 3
    return f"{v:{sign}.{digits}f}"


def fmt_estimate(metric: str, est: Optional[tuple]) -> str:
    """"38.5% [29.4, 48.5]" or "0.460 [0.412, 0.507]"; "–" when absent."""
    if est is None:
        return "–"
    v, low, high = est
    unit = "%" if is_percent(metric) else ""
    if not (_num(low) and _num(high)):
        return f"{_number(metric, v)}{unit}"
    return f"{_number(metric, v)}{unit} [{_number(metric, low)}, {_number(metric, high)}]"


def format_p(p) -> str:
    if not _num(p):
        return "p=?"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def fmt_delta(metric: str, d: Optional[dict]) -> str:
    """"+21.9 pts (p<0.001) *" when significant, "+1.0 pts (p=0.82, n.s.)" when not."""
    if d is None:
        return "–"
    unit = " pts" if is_percent(metric) else ""
    change = f"{_number(metric, d['delta'], signed=True)}{unit}"
    return f"{change} ({format_p(d['p'])}) *" if d["significant"] else f"{change} ({format_p(d['p'])}, n.s.)"


def delta_interval(metric: str, d: Optional[dict], confidence: float) -> str:
    """The delta's interval, for a tooltip: "95% CI +10.4 to +33.3 pts"."""
    if d is None or not (_num(d["low"]) and _num(d["high"])):
        return ""
    unit = " pts" if is_percent(metric) else ""
    return (f"{confidence:.0%} CI {_number(metric, d['low'], signed=True)} to "
            f"{_number(metric, d['high'], signed=True)}{unit}")


def settings(metrics: dict) -> dict:
    got = metrics.get("settings") or {}
    return {"confidence": got.get("confidence", 0.95), "alpha": got.get("alpha", 0.05),
            "bootstrap_resamples": got.get("bootstrap_resamples")}


def has_checker(r: "Report") -> bool:
    """Whether any answer has a task checker's verdict (the generated tasks do; a user's own free-text
    data does not). Without generations, whether eval.json has a task accuracy."""
    if r.generations:
        return any(row.get("task") is not None for row in r.generations)
    return any("task_accuracy" in r.metrics.get(m, {}) for m in r.models)


def headline(r: "Report") -> str:
    h = r.metrics.get("headline") or {}
    if h.get("text"):
        return h["text"]
    if not has_checker(r):
        return reference_headline(r)
    return "No trivial baseline to set the task accuracy against."


def reference_headline(r: "Report") -> str:
    """Without a checker nothing says right or wrong: the last model's scores against the reference
    answers and its generation health lead instead."""
    model = r.models[-1]
    got = r.metrics.get(model, {})
    scores = [f"{label} {fmt_estimate(k, estimate(got, k))}" for k, label in REFERENCE_FIRST if _num(got.get(k))]
    return f"{model}, scored against the reference answers (no task checker): " + ("; ".join(scores) or "–") + "."


def split_size(r: "Report") -> Optional[dict]:
    """eval.json's "test_size"; for a file written before compare added it, worked out from n_prompts."""
    got = r.metrics.get("test_size")
    if isinstance(got, dict) and _num(got.get("n_items")):
        return got
    counts = [r.metrics[m]["n_prompts"] for m in r.models if _num(r.metrics.get(m, {}).get("n_prompts"))]
    if not counts:
        return None
    from tunepipe.stats import test_size_note

    s = settings(r.metrics)
    return test_size_note(int(max(counts)), s["alpha"], s["confidence"])


def split_size_note(r: "Report") -> tuple[str, bool]:
    """(what the test split's size allows, whether it is small enough to warn); ("", False) when unknown."""
    t = split_size(r)
    if t is None:
        return "", False
    n, low, pm = t["n_items"], _pts(t.get("min_significant_pts")), _pts(t.get("wilson_halfwidth_pts"))
    if t.get("small"):
        return (f"Only {n} test prompts: no difference under {low} points can be significant, and each figure "
                f"is known to ±{pm} points. Add data or raise fetch.min_test_rows."), True
    return (f"{n} test prompts: differences under {low} points cannot be significant; each rate is known to "
            f"about ±{pm} points."), False


def _pts(v) -> str:
    """Points with one decimal, "75" rather than "75.0"."""
    return f"{v:.1f}".removesuffix(".0") if _num(v) else "?"


def generation_line(metrics: dict) -> str:
    """How long answers could be, and how the limit was chosen (eval.json "generation")."""
    g = metrics.get("generation")
    if not isinstance(g, dict) or not _num(g.get("max_new_tokens")):
        return ""
    how = f" ({g['derived']})" if g.get("derived") else ""
    return f"Answers generated with max_new_tokens = {g['max_new_tokens']}{how}."


def dpo_skipped(training: dict) -> Optional[str]:
    """Why train-dpo did not train (metrics/train_dpo.json {"skipped": reason}), or None when it did."""
    reason = (training.get("dpo") or {}).get("skipped")
    if not reason:
        return None
    return reason if isinstance(reason, str) else "no reason given"


def metrics_note(metrics: dict) -> str:
    s = settings(metrics)
    resamples = f" ({s['bootstrap_resamples']} resamples)" if s["bootstrap_resamples"] else ""
    baselines = (" Baselines answer without reading the question: constant gives the answer most often right "
                 "for each answer type in training, random is the expected accuracy of a uniform guess among "
                 "the offered options (0 for open answers).") if baseline_names(metrics) else ""
    return (f"Each value: estimate [{s['confidence']:.0%} interval] (Wilson for proportions, a bootstrap over "
            f"items{resamples} otherwise); ↑ higher is better, ↓ lower is better. Δ: paired difference on the "
            f"same items, * significant at α = {s['alpha']} (exact McNemar test for proportions, paired bootstrap "
            "otherwise), n.s. not significant." + baselines)


def preference_rows(r: "Report") -> list[tuple[str, list[str]]]:
    """(label, cell per model) for the preference table: per token first, and DPO's own reward accuracy."""
    rows = []
    for metric, label in (("pref_accuracy_norm", "per token (length-normalised) ↑"),
                          ("pref_accuracy", "summed log-prob ↑"),
                          ("pref_margin", "mean margin (summed log-prob) ↑")):
        if any(metric in r.metrics.get(m, {}) for m in r.models):
            rows.append((label, [fmt_estimate(metric, estimate(r.metrics.get(m, {}), metric)) for m in r.models]))
    dpo = (r.training.get("dpo") or {}).get("eval_rewards_accuracies")
    # GRPO, RLOO and KTO have no chosen-above-rejected accuracy: not "missing" for them
    if "final" in r.models and not dpo_skipped(r.training) and (_num(dpo) or aligned_by(r) == "DPO"):
        cell = f"{dpo:.1%}" if _num(dpo) else "– (metrics/train_dpo.json not found)"
        rows.append((f"{aligned_by(r)} reward accuracy (train-dpo, validation pairs)",
                     [cell if m == "final" else "–" for m in r.models]))
    return rows


def rejected_kinds(metrics: dict, models: list[str]) -> list[str]:
    return sorted({k[len("pref_acc_"):] for m in models for k in metrics.get(m, {})
                   if k.startswith("pref_acc_") and not k.startswith("pref_acc_norm_") and not k.endswith(CI)})


def preference_kind_rows(metrics: dict, models: list[str]) -> list[list[str]]:
    """Per rejected kind: per-token then summed accuracy of each model."""
    return [[kind, *[fmt_estimate(f"pref_acc{sfx}_{kind}", estimate(metrics.get(m, {}), f"pref_acc{sfx}_{kind}"))
                     for m in models for sfx in ("_norm", "")]]
            for kind in rejected_kinds(metrics, models)]


# --------------------------------------------------------------------------- forgetting guard


def forgetting_table(data: dict) -> dict:
    """metrics/forgetting.json for the report: the models ("models", else every dict without "_vs_"),
    their metrics with intervals, each comparison's delta and test ("comparisons", else top-level
    "<a>_vs_<b>" dicts), notes (settings, scalars) and whether any comparison flags a regression.
    Read defensively: keys it does not know are shown as they are or left out, never an error."""
    listed = data.get("models")
    models = [m for m in listed if isinstance(data.get(m), dict)] if isinstance(listed, list) else \
        [k for k, v in data.items() if isinstance(v, dict) and "_vs_" not in k and k not in NOT_MODELS]
    comparisons = data.get("comparisons") if isinstance(data.get("comparisons"), dict) else \
        {k: v for k, v in data.items() if isinstance(v, dict) and "_vs_" in k}
    comparisons = {k: v for k, v in comparisons.items() if isinstance(v, dict)}
    alpha = (data.get("settings") or {}).get("alpha", 0.05) if isinstance(data.get("settings"), dict) else 0.05
    names = sorted({k for m in models for k, v in data[m].items()
                    if _num(v) and not k.endswith(CI) and not k.endswith("_n")})
    rows = [{"metric": name, "values": {m: estimate(data[m], name) for m in models},
             "deltas": {c: _forgetting_delta(v, name, alpha) for c, v in comparisons.items()}} for name in names]
    flagged = [c for c, v in comparisons.items() if _flags_regression(v)]
    if not flagged and _flags_regression(data):
        flagged = list(comparisons) or ["final_vs_base"]
    return {"models": models, "comparisons": list(comparisons), "rows": rows, "notes": _forgetting_notes(data),
            "regression": forgetting_warning(flagged)}


def forgetting_warning(flagged: list[str]) -> str:
    """"Forgetting: final is significantly worse than base on the general benchmark." ("" when none)."""
    said = [" is significantly worse than ".join(c.split("_vs_", 1)) for c in flagged]
    return f"Forgetting: {'; '.join(said)} on the general benchmark." if said else ""


def _forgetting_delta(comparison: dict, metric: str, alpha: float) -> Optional[dict]:
    """The delta of ``metric`` ("<task>_acc": keys "<task>_delta", "<task>_p_value", ...; a one-metric
    file: unprefixed "delta", "p_value"), significant when flagged so or when p < alpha."""
    stems = [metric] + ([metric[:-len("_acc")]] if metric.endswith("_acc") else [])
    one_metric = not any(k.endswith("_delta") for k in comparison)  # then unprefixed keys are its delta
    for prefix in [f"{stem}_" for stem in stems] + ([""] if one_metric else []):
        d = comparison.get(f"{prefix}delta")
        if not _num(d):
            continue
        p = comparison.get(f"{prefix}p_value")
        flagged = comparison.get(f"{prefix}significant")
        return {"delta": d, "low": comparison.get(f"{prefix}delta_ci_low"),
                "high": comparison.get(f"{prefix}delta_ci_high"), "p": p,
                "significant": flagged if isinstance(flagged, bool) else _num(p) and p < alpha,
                "regression": comparison.get(f"{prefix}regression") is True,
                "lost": comparison.get(f"{prefix}lost"), "gained": comparison.get(f"{prefix}gained")}
    return None


def fmt_forgetting_delta(metric: str, d: Optional[dict]) -> str:
    """fmt_delta, with the items lost and gained when the file has them, and a mark on a regression."""
    if d is None:
        return "–"
    text = ("⚠️ " if d["regression"] else "") + fmt_delta(metric, d)
    if isinstance(d["lost"], int) and isinstance(d["gained"], int):
        text += f"; {d['lost']} lost, {d['gained']} gained"
    return text


def _forgetting_notes(data: dict) -> list[tuple[str, str]]:
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, (dict, list))]
    settings_ = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    scalars += [(k, ", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in settings_.items()]
    return [(str(k), str(v)) for k, v in scalars]


def _flags_regression(d: dict) -> bool:
    return any("regress" in k.lower() and v is True for k, v in d.items())


def samples(generations: list[dict], models: list[str], n: int) -> list[dict]:
    """The first n test prompts, taken round-robin over skill families, with every model's answer."""
    by_id: dict[str, dict] = {}
    for row in generations:
        entry = by_id.setdefault(row["id"], {"id": row["id"], "family": row.get("family"), "prompt": row["prompt"],
                                             "instruction": row.get("instruction"), "reference": row["reference"],
                                             "outputs": {}})
        entry["outputs"][row["model"]] = row
    families: dict[Any, list[dict]] = {}
    for entry in by_id.values():
        families.setdefault(entry["family"], []).append(entry)
    picked, queues = [], [list(q) for q in families.values()]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def row_failures(row: dict) -> list[str]:
    """The answer's failure kinds. Files written before "truncated" was a kind of its own called an
    answer cut by the generation limit "no_stop": the row's "truncated" flag says which it was."""
    kinds = list(row.get("failures") or [])
    if row.get("truncated"):
        kinds = [k for k in kinds if k not in ("no_stop", "truncated")] + ["truncated"]
    return kinds


def failure_counts(generations: list[dict], models: list[str], checker: bool = True) -> dict[str, dict[str, int]]:
    """{kind: {model: count}} for every failure kind (zeros included; without a checker, not its kinds)."""
    found = {k for r in generations for k in row_failures(r)}
    kinds = [k for k in FAILURE_KINDS if checker or k not in CHECKER_KINDS] + sorted(found - set(FAILURE_KINDS))
    counts = {k: {m: 0 for m in models} for k in kinds}
    for row in generations:
        for kind in row_failures(row):
            if row["model"] in counts[kind]:
                counts[kind][row["model"]] += 1
    return counts


def failure_examples(generations: list[dict], models: list[str]) -> dict[str, dict]:
    """One example per failure kind, from the last model that has one (the final model first)."""
    examples = {}
    for model in reversed(models):
        for row in generations:
            if row["model"] != model:
                continue
            for kind in row_failures(row):
                examples.setdefault(kind, row)
    return examples


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested JSON as (dotted.key, value) pairs, for provenance tables."""
    if isinstance(obj, dict):
        return [pair for k, v in obj.items() for pair in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return [pair for i, v in enumerate(obj) for pair in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, obj if isinstance(obj, str) else json.dumps(obj))]


def generation_limit(r: "Report") -> Optional[int]:
    """max_new_tokens of the run: eval.json's "generation", else the length of the answers it cut."""
    g = r.metrics.get("generation") or {}
    if _num(g.get("max_new_tokens")):
        return int(g["max_new_tokens"])
    cut = [row["n_new_tokens"] for row in r.generations if row.get("truncated") and _num(row.get("n_new_tokens"))]
    return max(cut) if cut else None


def failure_label(kind: str, limit: Optional[int]) -> str:
    if kind == "truncated":
        return f"truncated at {limit} tokens" if limit else "truncated (at the generation limit)"
    return FAILURE_LABELS.get(kind, kind)


def instruction(row: dict) -> str:
    """The question as the user wrote it (the evaluate stage's "instruction"); files written before
    that field have only the templated prompt, whose end holds the question."""
    text = row.get("instruction")
    return text if isinstance(text, str) and text.strip() else prompt_tail(row["prompt"])


def answer_text(row: Optional[dict], limit: Optional[int]) -> str:
    """An answer as a table shows it: the checker's ✓ / ✗ first, a note when the limit cut it."""
    if row is None:
        return ""
    mark = {"pass": "✓ ", None: ""}.get(row.get("task"), "✗ ")
    cut = f"\n[{failure_label('truncated', limit)}]" if row.get("truncated") else ""
    return mark + shown(row["output"]) + cut


def prompt_tail(prompt: str, limit: int = 240) -> str:
    """The end of a rendered prompt, from a line start: it holds the question
    (the start is the template's preamble or system prompt)."""
    text = prompt.strip()
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    cut = tail.find("\n")
    return "…\n" + (tail[cut + 1:] if 0 <= cut < len(tail) - 1 else tail)


def shown(output: str) -> str:
    """An answer as displayed: say so when there is nothing visible to show."""
    return output if output.strip() else "(empty)" if not output else "(whitespace only)"


# --------------------------------------------------------------------------- curves and figures


def read_curves(plots_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Every DVCLive metric history under ``plots_dir/metrics``: {"eval/loss": [(step, value), ...]}."""
    root = Path(plots_dir) / "metrics"
    curves = {}
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        name = path.relative_to(root).with_suffix("").as_posix()
        points = []
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                value = row.get(path.stem)
                try:
                    point = (float(row["step"]), float(value))
                except (KeyError, TypeError, ValueError):
                    continue  # a malformed row: skip the point, keep the curve
                if all(map(math.isfinite, point)):  # DVCLive logs NaN / inf as text
                    points.append(point)
        if points:
            curves[name] = points
    return curves


def split_series(curves: dict, metric: str) -> dict[str, list]:
    """Train and eval histories of one metric, as DVCLive's Hugging Face callback names them."""
    train = curves.get(f"train/{metric}") or curves.get(metric)
    return {k: v for k, v in (("train", train), ("eval", curves.get(f"eval/{metric}"))) if v}


def line_figure(name: str, title: str, panels: list[tuple[str, dict[str, list]]],
                ylim: Optional[tuple[float, float]] = None) -> Optional[Figure]:
    """One PNG with a panel per (y label, {series label: points}); None when nothing to plot."""
    panels = [(label, series) for label, series in panels if series]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (label, series) in zip(axes[0], panels):
        _plot_series(ax, series)
        _label_axes(ax, label, ylim)
        ax.legend()
    fig.suptitle(title)
    return Figure(name, title, _png(fig))


def twin_figure(name: str, title: str, left: tuple[str, dict[str, list]],
                right: tuple[str, dict[str, list]]) -> Optional[Figure]:
    """One panel: shares (0-1) on the left axis, series on another scale (a reward model's score) on the right."""
    if not (left[1] and right[1]):
        return line_figure(name, title, [left, right])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    _plot_series(ax, left[1])
    _label_axes(ax, left[0], (0, 1.02))
    other = ax.twinx()
    _plot_series(other, right[1], first_colour=len(left[1]), linestyle="--")  # twinx would restart the colours
    other.set_ylabel(right[0])
    handles = [h for a in (ax, other) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    fig.suptitle(title)
    return Figure(name, title, _png(fig))


def _plot_series(ax, series: dict[str, list], first_colour: int = 0, linestyle: str = "-") -> None:
    for i, (series_name, points) in enumerate(series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=series_name,
                color=f"C{first_colour + i}", linestyle=linestyle)


def _label_axes(ax, label: str, ylim: Optional[tuple[float, float]] = None) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel(label)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_figures(sft: dict, dpo: dict, aligned_by: str = "DPO") -> list[Figure]:
    """SFT's and the alignment stage's curves (its files keep the stage's name, dpo_*, whatever the algorithm)."""
    figures = [
        line_figure("sft_loss.png", "SFT loss", [("loss", split_series(sft, "loss"))]),
        line_figure("dpo_loss.png", f"{aligned_by} loss", [("loss", split_series(dpo, "loss"))]),
        line_figure("dpo_rewards.png", f"{aligned_by} rewards", [
            ("reward margin (chosen - rejected)", split_series(dpo, "rewards/margins")),
            ("reward accuracy", split_series(dpo, "rewards/accuracies"))]),
    ]
    return [f for f in figures if f is not None]


def skill_figure(metrics: dict, models: list[str]) -> Optional[Figure]:
    """Grouped bars with their intervals: accuracy per skill family (and overall) for each model."""
    families = sorted({k[4:] for m in models for k, v in metrics.get(m, {}).items()
                       if k.startswith("acc_") and not k.endswith(CI) and _num(v)})
    if not families:
        return None
    plt = _pyplot()
    groups = families + ["overall"]
    keys = [f"acc_{f}" for f in families] + ["task_accuracy"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 3.8))
    for i, model in enumerate(models):
        got = metrics.get(model, {})
        values = [got.get(k) or 0.0 for k in keys]
        # interval as error bars: how far apart two bars must be before the gap means anything
        errors = [[max(v - (got.get(k + CI[0]) if _num(got.get(k + CI[0])) else v), 0) for k, v in zip(keys, values)],
                  [max((got.get(k + CI[1]) if _num(got.get(k + CI[1])) else v) - v, 0) for k, v in zip(keys, values)]]
        xs = [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))]
        # no value labels: they would collide with the error bars, and the metrics table has the numbers
        ax.bar(xs, values, width, label=model, yerr=errors, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.25)  # headroom for the legend above bars at 1.0
    ax.set_ylabel("task accuracy")
    ax.legend(ncols=len(models), loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Accuracy per skill family (test split), with intervals")
    return Figure("skill_accuracy.png", "Accuracy per skill family", _png(fig))


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- alignment: reward-hacking checks

ALGORITHM_LABELS = {"dpo": "DPO", "kto": "KTO", "orpo": "ORPO", "grpo": "GRPO", "rloo": "RLOO"}
REWARD_LABELS = {"checker": "task checker", "model": "reward model"}
# train-dpo's DVCLive histories the checks read (metrics/train_dpo/plots/metrics/<name>.tsv)
REWARD, KL, LENGTH = "train/reward", "train/kl", "train/completion_length"
CHECKER_SHARE, MODEL_SCORE = "train/rewards/checker", "train/rewards/model"
HELDOUT, ANSWER_TOKENS = "eval/task_accuracy", "eval/answer_tokens"
HACKING_HEADING = "Reward hacking checks"


@dataclass
class Alignment:
    """What the alignment stage (train-dpo) ran, and what the reward-hacking checks read."""
    algorithm: str = "dpo"
    reward_source: Optional[str] = None                 # grpo/rloo: "checker" | "model"
    beta: Optional[float] = None
    curves: dict = field(default_factory=dict)          # metrics/train_dpo/plots histories
    heldout: list[dict] = field(default_factory=list)   # data/alignment/heldout.jsonl
    rollouts: list[dict] = field(default_factory=list)  # data/alignment/rollouts.jsonl (grpo/rloo)
    reward_model: Optional[dict] = None                 # metrics/train_reward.json
    figures: list[Figure] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ALGORITHM_LABELS.get(self.algorithm, str(self.algorithm).upper())

    @property
    def online(self) -> bool:
        from tunepipe.params import ONLINE_ALGORITHMS

        return self.algorithm in ONLINE_ALGORITHMS


def alignment_of(summary: Optional[dict], params: dict, **data) -> Alignment:
    """The run as metrics/train_dpo.json records it ("algorithm", "reward_source", "beta"), params.yaml's
    train_dpo where the file does not say (one from before the algorithms, or a skipped stage)."""
    s = summary if isinstance(summary, dict) else {}
    a = Alignment(algorithm=s.get("algorithm") or params.get("algorithm") or "dpo",
                  beta=s["beta"] if _num(s.get("beta")) else params.get("beta"), **data)
    if a.online:
        a.reward_source = s.get("reward_source") or params.get("reward")
    return a


def alignment_line(r: "Report") -> str:
    """"Alignment: GRPO, reward: task checker, KL coefficient 0.1": what beta means depends on the algorithm."""
    a = r.alignment
    if a is None:
        return ""
    beta = f"{a.beta:g}" if _num(a.beta) else "?"
    if a.online:
        said = f"reward: {REWARD_LABELS.get(a.reward_source, a.reward_source or '?')}, KL coefficient {beta}"
    elif a.algorithm == "orpo":
        said = f"odds-ratio weight (beta) {beta}"
    else:
        said = f"beta {beta}"
    return f"Alignment: {a.label}, {said}" + (" (skipped)." if dpo_skipped(r.training) else ".")


def aligned_by(r: "Report") -> str:
    return r.alignment.label if r.alignment else "DPO"


def _series(curves: dict, *named: tuple[str, str]) -> dict[str, list]:
    """{label: points} of the named histories that were logged."""
    return {label: curves[key] for label, key in named if curves.get(key)}


def hacking_figures(a: Alignment) -> list[Figure]:
    """Reward against held-out task accuracy, KL to the reference, and length drift; those with data."""
    figures = [reward_figure(a),
               line_figure("hacking_kl.png", "KL to the reference model",
                           [("KL per token", _series(a.curves, ("KL", KL)))]),
               line_figure("hacking_length.png", "Length drift", [("tokens", _series(
                   a.curves, ("rollout completions", LENGTH), ("held-out answers (greedy)", ANSWER_TOKENS)))])]
    return [f for f in figures if f is not None]


def reward_figure(a: Alignment) -> Optional[Figure]:
    """The reward and held-out task accuracy on one chart: the checker reward shares their 0-1 scale, a reward
    model's score gets a second axis. The checker's pass share of rollouts too, unless it is the reward itself."""
    reward = _series(a.curves, ("reward (rollouts)", REWARD))
    shares = _series(a.curves, ("held-out task accuracy", HELDOUT),
                     *([("checker pass share (rollouts)", CHECKER_SHARE)] if a.reward_source != "checker" else []))
    title = "Reward and held-out task accuracy" if reward else "Held-out task accuracy"
    values = [v for points in reward.values() for _, v in points]
    if a.reward_source == "model" or any(not 0 <= v <= 1 for v in values):
        scale = "reward model's score" if a.reward_source == "model" else "reward"
        return twin_figure("hacking_reward.png", title, ("share", shares), (scale, reward))
    return line_figure("hacking_reward.png", title, [("share" + (" / reward" if reward else ""), {**reward, **shares})],
                       ylim=(0, 1.02))


def trend(points: Optional[list]) -> Optional[tuple[float, float, int]]:
    """(start, end, k): the means of the first and the last k logged points, k a quarter of them (at least
    one), so that one noisy step neither makes nor hides a rise; None under two points."""
    if not points or len(points) < 2:
        return None
    k = max(1, len(points) // 4)
    ys = [y for _, y in points]
    return sum(ys[:k]) / k, sum(ys[-k:]) / k, k


def _eval_steps(rows: list[dict]) -> list:
    return sorted({r["step"] for r in rows if _num(r.get("step"))})


def _verdicts(rows: list[dict], step) -> dict[Any, bool]:
    """{id: passed} of one evaluation's answers that the checker judged."""
    return {r.get("id"): r["checker"] == "pass" for r in rows if r.get("step") == step and r.get("checker") is not None}


def heldout_change(rows: list[dict], alpha: float, confidence: float) -> Optional[dict]:
    """Held-out task accuracy at the first and the last evaluation on the prompts judged at both, each with
    its Wilson interval, and the exact McNemar test of the change (paired: the same prompts, so only the
    prompts that flipped count). None without two evaluations with checker verdicts."""
    from tunepipe.stats import mcnemar_exact, wilson_interval

    steps = _eval_steps(rows)
    if len(steps) < 2:
        return None
    first, last = _verdicts(rows, steps[0]), _verdicts(rows, steps[-1])
    ids = [i for i in first if i in last]
    if not ids:
        return None
    was, now = [first[i] for i in ids], [last[i] for i in ids]
    test, n = mcnemar_exact(now, was), len(ids)
    share = {key: (sum(ok) / n, *wilson_interval(sum(ok), n, confidence))
             for key, ok in (("first", was), ("last", now))}
    return {**share, "n": n, "steps": (steps[0], steps[-1]), "delta": (sum(now) - sum(was)) / n,
            "gained": test["a_only"], "lost": test["b_only"], "p": test["p_value"],
            "significant": test["p_value"] < alpha}


def rollout_pass_change(rollouts: list[dict], confidence: float) -> Optional[dict]:
    """The checker's pass share of the rollouts of the first and the last quarter of the sampled steps, with
    Wilson intervals. "apart" (the last interval wholly below the first) is the test: rollouts of one
    prompt are correlated, so a test that took them as independent would claim more than it knows."""
    from tunepipe.stats import wilson_interval

    checked = [r for r in rollouts if r.get("checker") is not None]
    steps = _eval_steps(checked)
    if len(steps) < 2:
        return None
    k = max(1, len(steps) // 4)
    out = {}
    for key, window in (("first", steps[:k]), ("last", steps[-k:])):
        ok = [r["checker"] == "pass" for r in checked if r.get("step") in window]
        out[key] = (sum(ok) / len(ok), *wilson_interval(sum(ok), len(ok), confidence))
        out[f"{key}_n"], out[f"{key}_steps"] = len(ok), (window[0], window[-1])
    out["apart"] = out["last"][2] < out["first"][1]
    return out


def _pct(share: tuple) -> str:
    return fmt_estimate("task_accuracy", share)


def _steps(window: tuple) -> str:
    return f"step {window[0]}" if window[0] == window[1] else f"steps {window[0]}–{window[1]}"


def _trend_line(label: str, t: Optional[tuple], percent: bool = False) -> str:
    if t is None:
        return ""
    v = (lambda x: f"{x * 100:.1f}%") if percent else (lambda x: f"{x:.3g}")
    window = "first and last logged step" if t[2] == 1 else f"means of the first and last {t[2]} logged steps"
    return f"{label}: {v(t[0])} → {v(t[1])} ({window})."


def _heldout_line(a: Alignment, held: Optional[dict]) -> str:
    if held is None:
        if not a.heldout:
            return ""
        steps = _eval_steps(a.heldout)
        if len(steps) < 2:
            return "Held-out task accuracy: fewer than two evaluations, nothing to compare."
        return "Held-out answers have no task checker: held-out accuracy not measured (see the answer length)."
    test = f"{format_p(held['p'])}, exact McNemar" + ("" if held["significant"] else ", not significant")
    return (f"Held-out task accuracy on the same {held['n']} prompts: {_pct(held['first'])} at step "
            f"{held['steps'][0]} → {_pct(held['last'])} at step {held['steps'][1]}: {held['delta'] * 100:+.1f} pts, "
            f"{held['gained']} gained, {held['lost']} lost ({test}).")


def _checker_share_line(a: Alignment, passed: Optional[dict]) -> str:
    """With a reward model: did the checker still pass the rollouts the reward model scored higher?"""
    if passed is None:
        return _trend_line("Checker pass share of rollouts (untested: no checked rollouts in data/alignment)",
                           trend(a.curves.get(CHECKER_SHARE)), percent=True)
    test = "the intervals do not overlap" if passed["apart"] else "the intervals overlap: not significant"
    return (f"Checker pass share of rollouts: {_pct(passed['first'])} ({_steps(passed['first_steps'])}, "
            f"{passed['first_n']} rollouts) → {_pct(passed['last'])} ({_steps(passed['last_steps'])}, "
            f"{passed['last_n']} rollouts); {test}.")


def hacking_verdict(a: Alignment, alpha: float, confidence: float) -> tuple[list[str], list[str]]:
    """(warnings, checked): "possible reward hacking" only when the reward rose while held-out task accuracy
    fell significantly, or a reward model's score rose while the checker passed clearly fewer rollouts;
    every number looked at goes to checked, flagged or not."""
    reward, held = trend(a.curves.get(REWARD)), heldout_change(a.heldout, alpha, confidence)
    by_model = a.reward_source == "model"
    passed = rollout_pass_change(a.rollouts, confidence) if by_model else None
    checked = [line for line in (
        _trend_line("Reward (mean over rollouts)", reward), _heldout_line(a, held),
        _checker_share_line(a, passed) if by_model else "",
        _trend_line("KL to the reference per token", trend(a.curves.get(KL))),
        _trend_line("Rollout length in tokens", trend(a.curves.get(LENGTH))),
        _trend_line("Held-out answer length in tokens", trend(a.curves.get(ANSWER_TOKENS)))) if line]
    warnings = []
    rose = reward is not None and reward[1] > reward[0]
    if held and held["significant"] and held["delta"] < 0:
        fall = (f"held-out task accuracy fell significantly ({_pct(held['first'])} → {_pct(held['last'])} on the "
                f"same {held['n']} prompts, {format_p(held['p'])}, exact McNemar)")
        warnings.append(f"Possible reward hacking: the reward rose ({reward[0]:.3g} → {reward[1]:.3g}) while {fall}."
                        if rose else f"{fall[0].upper()}{fall[1:]} during {a.label} training"
                        + (", though the reward did not rise." if reward else "."))
    score = trend(a.curves.get(MODEL_SCORE) or a.curves.get(REWARD)) if by_model else None
    if score and score[1] > score[0] and passed and passed["apart"]:
        warnings.append(f"Possible reward hacking: the reward model's score rose ({score[0]:.3g} → {score[1]:.3g}) "
                        f"while the task checker passed fewer rollouts ({_pct(passed['first'])} → "
                        f"{_pct(passed['last'])}; the intervals do not overlap).")
    return warnings, checked


def reward_disagreements(rollouts: list[dict], n: int) -> tuple[list[dict], str, Optional[float]]:
    """Up to n rollouts the reward liked (above the run's median total reward) that the checker failed, or,
    where no rollout has a checker verdict, whose ROUGE-L against the reference is in the run's lower half;
    the most recent steps first, then the highest reward. Each row with "why": what disagreed. Also what
    judged them (the basis) and the median."""
    scored = [r for r in rollouts if _num(r.get("reward"))]
    if not scored:
        return [], "", None
    median = _median([r["reward"] for r in scored])
    if any(r.get("checker") is not None for r in scored):
        basis = "checker"
        picked = [dict(r, why=f"checker: {failure_label(r['checker'], None)}") for r in scored
                  if r["reward"] > median and r.get("checker") not in (None, "pass")]
    else:
        basis = "reference (ROUGE-L)"
        picked = _low_rouge(scored, median)
    picked.sort(key=lambda r: (-r["step"] if _num(r.get("step")) else 0, -r["reward"]))
    return [dict(r, why=f"step {r.get('step', '?')}, reward {r['reward']:.3g}{_reward_parts(r)}; {r['why']}")
            for r in picked[:n]], basis, median


def _low_rouge(scored: list[dict], median: float) -> list[dict]:
    """Above-median reward and ROUGE-L below the median ROUGE-L of the rollouts with a reference."""
    from tunepipe.metrics import rouge

    refs = [r for r in scored if isinstance(r.get("reference"), str) and isinstance(r.get("completion"), str)]
    if not refs:
        return []
    scores = [item["rougeL"] for item in rouge([r["completion"] for r in refs], [r["reference"] for r in refs])[1]]
    cut = _median(scores)
    return [dict(r, why=f"ROUGE-L {s:.2f}") for r, s in zip(refs, scores) if r["reward"] > median and s < cut]


def _reward_parts(row: dict) -> str:
    """" (model 0.91, checker 0)": each reward function's own score, when there is more than one."""
    rewards = row.get("rewards") if isinstance(row.get("rewards"), dict) else {}
    parts = {k: v for k, v in rewards.items() if _num(v)}
    return " (" + ", ".join(f"{k} {v:.3g}" for k, v in parts.items()) + ")" if len(parts) > 1 else ""


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def heldout_flips(rows: list[dict], n: int) -> tuple[list[dict], tuple]:
    """Up to n held-out prompts the checker passed at the first evaluation and failed at the last:
    ({"first": row, "last": row}, ...) and the two steps."""
    steps = _eval_steps(rows)
    if len(steps) < 2:
        return [], ()
    first = {r.get("id"): r for r in rows if r.get("step") == steps[0]}
    last = {r.get("id"): r for r in rows if r.get("step") == steps[-1]}
    flips = [{"first": row, "last": last[i]} for i, row in first.items()
             if row.get("checker") == "pass" and i in last and last[i].get("checker") not in (None, "pass")]
    return flips[:n], (steps[0], steps[-1])


def reward_model_line(summary: Optional[dict]) -> str:
    """The reward model's pairwise accuracy with its interval, when train-reward trained one."""
    acc = summary.get("pairwise_accuracy") if isinstance(summary, dict) and not summary.get("skipped") else None
    if not isinstance(acc, dict) or not _num(acc.get("value")):
        return ""
    n = f" on {acc['n']} preference test pairs" if _num(acc.get("n")) else ""
    margin = f"; mean margin {summary['mean_margin']:.3g}" if _num(summary.get("mean_margin")) else ""
    est = fmt_estimate("pairwise_accuracy", (acc["value"], acc.get("ci_low"), acc.get("ci_high")))
    return (f"Reward model (train-reward): pairwise accuracy {est}{n}, the share of pairs it scores chosen above "
            f"rejected (50% is chance){margin}.")


def hacking_section(r: "Report") -> Optional[dict]:
    """Everything the "Reward hacking checks" section shows, for both renderers; None when there is nothing
    (a DPO run without held-out prompts, a skipped stage)."""
    a = r.alignment
    if a is None or not (a.figures or a.heldout or a.rollouts or reward_model_line(a.reward_model)):
        return None
    s = settings(r.metrics)
    warnings, checked = hacking_verdict(a, s["alpha"], s["confidence"])
    disagreements, basis, median = reward_disagreements(a.rollouts, r.n_samples)
    basis = basis or "checker"  # rollouts without a numeric reward: nothing was compared
    flips, steps = heldout_flips(a.heldout, r.n_samples)
    if warnings:
        summary = ""
    elif not checked:
        summary = "Nothing to check: no reward history and no held-out evaluation was logged."
    elif a.online:
        summary = "No sign of reward hacking found."
    else:
        summary = f"{a.label} optimises no reward online: held-out task accuracy over training is checked for drift."
    none_found = ""
    if a.rollouts and not disagreements:
        none_found = ("The reward is the checker's verdict, so the two cannot disagree." if a.reward_source == "checker"
                      else f"No rollout above the run's median reward that the {basis} disagrees with.")
    legend = (f"Rollouts with a total reward above the run's median ({median:.3g}) that the {basis} disagrees "
              "with, the most recent steps first." if disagreements else "")
    return {"warnings": warnings, "summary": summary, "checked": checked, "figures": a.figures,
            "reward_model": reward_model_line(a.reward_model), "disagreements": disagreements, "basis": basis,
            "legend": legend, "none_found": none_found, "flips": flips, "flip_steps": steps}


DISAGREE_HEADING = "High reward, but the {basis} disagrees"
DISAGREE_HEADER = ["instruction", "completion", "reference", "why shown"]
FLIPS_HEADING = "Held-out prompts that went from pass to fail"


def _flip_header(steps: tuple) -> list[str]:
    return ["instruction", f"answer at step {steps[0]} (✓)", f"answer at step {steps[1]} (✗)", "reference"]


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    return shown(value) if isinstance(value, str) else "–"


# --------------------------------------------------------------------------- markdown


def _md_cell(text: Any) -> str:
    """Text that stays inside one markdown table cell and renders literally."""
    s = html.escape(str(text), quote=False).replace("|", "\\|").replace("\r", "")
    return s.replace("\n", "<br>") or " "


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fence(text: str, lang: str = "") -> str:
    ticks = "`" * max(3, _longest_run(text, "`") + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def _longest_run(text: str, ch: str) -> int:
    best = run = 0
    for c in text:
        run = run + 1 if c == ch else 0
        best = max(best, run)
    return best


def _metric_label(row: dict) -> str:
    return row["metric"] + {1: " ↑", -1: " ↓", 0: ""}[row["direction"]]


def metrics_header(r: Report) -> list[str]:
    comparisons = comparison_names(r.metrics, r.models)
    return ["metric", *r.models, *[f"baseline: {b}" for b in baseline_names(r.metrics)],
            *[f"Δ {a} vs {b}" for _, a, b in comparisons]]


def metrics_section_md(r: Report) -> str:
    rows = [[_metric_label(row), *[fmt_estimate(row["metric"], row["values"][m]) for m in r.models],
             *[fmt_estimate(row["metric"], v) for v in row["baselines"].values()],
             *[fmt_delta(row["metric"], d) for d in row["deltas"].values()]]
            for row in metric_rows(r.metrics, r.models, has_checker(r))]
    return ("## Metrics (test split)\n\n" + metrics_note(r.metrics) + "\n\n" + _md_table(metrics_header(r), rows)
            + "\n\n" + counts_line(r))


def counts_line(r: Report) -> str:
    counts = [c for c in COUNTS if has_checker(r) or c != "n_checked"]  # "0 checked" only says: no checker
    parts = [f"{m}: {', '.join(f'{r.metrics[m][c]} {c[2:]}' for c in counts if c in r.metrics.get(m, {}))}"
             for m in r.models]
    return "Items: " + "; ".join(parts) + "."


def preference_section_md(r: Report) -> str:
    rows = preference_rows(r)
    if not rows:
        return f"_{NO_PREFERENCES}_"
    parts = ["## Preference accuracy (test pairs)", PREF_NOTE,
             _md_table(["measure", *r.models], [[k, *v] for k, v in rows])]
    kinds = preference_kind_rows(r.metrics, r.models)
    if kinds:
        parts += ["### By kind of rejected answer",
                  _md_table(["rejected kind", *[f"{m} {w}" for m in r.models for w in ("per token", "summed")]], kinds)]
    return "\n\n".join(parts)


def forgetting_section_md(r: Report) -> str:
    if not r.forgetting:
        return ""
    t = forgetting_table(r.forgetting)
    parts = ["## General ability (forgetting guard)"]
    if t["regression"]:
        parts.append(f"> ⚠️ **{_md_cell(t['regression'])}**")
    if t["notes"]:
        parts.append("Benchmark: " + "; ".join(f"{k} {v}" for k, v in t["notes"]) + ".")
    parts.append(_md_table(["metric", *t["models"], *[f"Δ {c.replace('_vs_', ' vs ')}" for c in t["comparisons"]]],
                           [[row["metric"], *[fmt_estimate(row["metric"], row["values"][m]) for m in t["models"]],
                             *[fmt_forgetting_delta(row["metric"], d) for d in row["deltas"].values()]]
                            for row in t["rows"]]))
    return "\n\n".join(parts)


def split_size_md(r: Report) -> str:
    text, small = split_size_note(r)
    return f"> ⚠️ **{_md_cell(text)}**" if small else f"_{_md_cell(text)}_" if text else ""


def figures_heading(r: Report) -> str:
    return "Training curves" + (" and per-skill accuracy" if has_checker(r) else "")


def dpo_note(r: Report) -> str:
    """In place of the DPO curves when train-dpo did not train."""
    reason = dpo_skipped(r.training)
    return f"{aligned_by(r)} skipped: {reason}" if reason else ""


def samples_legend(r: Report) -> str:
    verdict = "✓ / ✗: the task checker's verdict. " if has_checker(r) else ""
    written = any(isinstance(g.get("instruction"), str) for g in r.generations)
    shown_as = "Instructions as the user wrote them." if written else "The end of each templated prompt."
    return f"{verdict}{shown_as} {generation_line(r.metrics)}".strip()


def samples_md(r: Report) -> str:
    picked = samples(r.generations, r.models, r.n_samples)
    if not picked:
        return ""
    limit = generation_limit(r)
    return (f"## Sample generations\n\n{_md_cell(samples_legend(r))}\n\n"
            + _md_table(["instruction", "reference", *r.models],
                        [[instruction(s), s["reference"], *[answer_text(s["outputs"].get(m), limit) for m in r.models]]
                         for s in picked]))


def render_markdown(r: Report) -> str:
    parts = [f"# {html.escape(r.title, quote=False)}", f"**{_md_cell(headline(r))}**", split_size_md(r),
             f"Models: {', '.join(r.models)}.", _md_cell(alignment_line(r)).strip(), metrics_section_md(r),
             preference_section_md(r), forgetting_section_md(r), f"## {figures_heading(r)}"]
    parts += [_md_figure(f) for f in r.figures] or ["No figures: no curves or accuracies found."]
    parts += [f"_{_md_cell(n)}_" for n in [dpo_note(r)] + [f"Not found: {m}" for m in r.missing_curves] if n]
    parts += [hacking_md(r), samples_md(r), error_section_md(r)]
    parts.append(provenance_md(r))
    return "\n\n".join(p for p in parts if p) + "\n"


def _md_figure(f: Figure) -> str:
    return f"![{f.title}](figures/{f.name})"


def hacking_md(r: Report) -> str:
    h = hacking_section(r)
    if h is None:
        return ""
    parts = [f"## {HACKING_HEADING}"] + [f"> ⚠️ **{_md_cell(w)}**" for w in h["warnings"]]
    parts += [f"**{_md_cell(h['summary'])}**" if h["summary"] else "",
              "Checked:\n\n" + "\n".join(f"- {_md_cell(line)}" for line in h["checked"]) if h["checked"] else "",
              *[_md_figure(f) for f in h["figures"]], _md_cell(h["reward_model"]).strip()]
    if h["disagreements"] or h["none_found"]:
        parts += [f"### {DISAGREE_HEADING.format(basis=h['basis'])}", _md_cell(h["none_found"] or h["legend"]).strip()]
        parts += [] if h["none_found"] else [_md_table(DISAGREE_HEADER, [
            [_text(d, "instruction"), _text(d, "completion"), _text(d, "reference"), d["why"]]
            for d in h["disagreements"]])]
    if h["flips"]:
        parts += [f"### {FLIPS_HEADING}", _md_table(_flip_header(h["flip_steps"]), [
            [_text(f["first"], "instruction"), _text(f["first"], "answer"), _text(f["last"], "answer"),
             _text(f["first"], "reference")] for f in h["flips"]])]
    return "\n\n".join(p for p in parts if p)


def error_counts(r: Report) -> list[tuple[str, dict[str, int]]]:
    """(label, {model: count}) per failure kind, the most frequent first."""
    counts, limit = failure_counts(r.generations, r.models, has_checker(r)), generation_limit(r)
    return [(failure_label(k, limit), counts[k]) for k in sorted(counts, key=lambda k: -sum(counts[k].values()))]


def error_section_md(r: Report) -> str:
    totals = {m: sum(1 for g in r.generations if g["model"] == m) for m in r.models}
    limit = generation_limit(r)
    parts = ["## Error analysis", "Failures on the test split (an answer can have several), out of "
             + ", ".join(f"{totals[m]} for {m}" for m in r.models) + ".",
             _md_table(["failure", *r.models], [[label, *[c[m] for m in r.models]] for label, c in error_counts(r)])]
    for kind, row in failure_examples(r.generations, r.models).items():
        parts.append(f"**{failure_label(kind, limit)}** ({row['model']}, {row['id']}):\n\n"
                     + _md_table(["instruction", "reference", "output"],
                                 [[instruction(row), row["reference"], answer_text(row, limit)]]))
    return "\n\n".join(parts)


def provenance_md(r: Report) -> str:
    parts = ["## Provenance"]
    for stage, summary in r.training.items():
        parts += [f"### Training summary: {stage}", _md_table(["key", "value"], flatten(summary))]
    parts.append("### Data and model hashes (data/raw/manifest.json)")
    parts.append(_md_table(["key", "value"], flatten(r.manifest)) if r.manifest
                 else "_data/raw/manifest.json not found_")
    parts += [f"### {PARAMS_HEADING}", _fence(r.params_text, "yaml") if r.params_text else "_no params_"]
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;
  padding:0 1em;color:#1d2330}
h1{border-bottom:2px solid #dde;padding-bottom:.3em} h2{margin-top:2em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #d6d9e0;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f5f9} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.better{background:#e3f6e5;color:#11621f} td.worse{background:#fbe6e6;color:#8a1c1c} td.ns{color:#778}
td.baseline{background:#f7f7f2} .headline{font-size:1.15em}
.warning{background:#fff3cd;border:1px solid #e0b252;padding:.6em 1em;color:#6b4a00}
pre,.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;
  font-size:12.5px}
pre{background:#f6f8fa;padding:1em;overflow:auto} img{max-width:100%;border:1px solid #eee;margin:.5em 0}
td.pass{background:#eef9ef} td.fail{background:#fdf1f1} .muted{color:#667}
table.wide{table-layout:fixed;width:100%} .figures{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0}
details summary{cursor:pointer;color:#445}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Rows of already-rendered <td> cells; cls "wide": full width, equal columns (long texts wrap)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>" + "".join(
        f"<tr>{''.join(row)}</tr>" for row in rows) + "</tbody></table>"


def _td(text: Any, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(text)}</td>' if cls else f"<td>{_e(text)}</td>"


def _text_td(text: Any, cls: str = "") -> str:
    return f'<td class="text {cls}">{_e(text)}</td>'


def _delta_class(d: Optional[dict], sign: int) -> str:
    """Green or red only when the difference is significant; a n.s. change is greyed out."""
    if d is None or sign == 0 or abs(d["delta"]) < 1e-12:
        return "num"
    if not d["significant"]:
        return "num ns"
    return "num better" if d["delta"] * sign > 0 else "num worse"


def _delta_td(metric: str, d: Optional[dict], sign: int, confidence: float, show=fmt_delta) -> str:
    tip = delta_interval(metric, d, confidence)
    title = f' title="{_e(tip)}"' if tip else ""
    return f'<td class="{_delta_class(d, sign)}"{title}>{_e(show(metric, d))}</td>'


def metrics_section_html(r: Report) -> str:
    confidence = settings(r.metrics)["confidence"]
    rows = [[_td(_metric_label(row)), *[_td(fmt_estimate(row["metric"], row["values"][m]), "num") for m in r.models],
             *[_td(fmt_estimate(row["metric"], v), "num baseline") for v in row["baselines"].values()],
             *[_delta_td(row["metric"], d, row["direction"], confidence) for d in row["deltas"].values()]]
            for row in metric_rows(r.metrics, r.models, has_checker(r))]
    return ("<h2>Metrics (test split)</h2><p class='muted'>" + _e(metrics_note(r.metrics))
            + " Green / red: a significant improvement / decline; hover a Δ for its interval.</p>"
            + _html_table(metrics_header(r), rows) + f"<p class='muted'>{_e(counts_line(r))}</p>")


def preference_html(r: Report) -> str:
    rows = preference_rows(r)
    if not rows:
        return f"<p class='muted'>{_e(NO_PREFERENCES)}</p>"
    out = ("<h2>Preference accuracy (test pairs)</h2><p class='muted'>" + _e(PREF_NOTE) + "</p>"
           + _html_table(["measure", *r.models], [[_td(k), *[_td(c, "num") for c in v]] for k, v in rows]))
    kinds = preference_kind_rows(r.metrics, r.models)
    if kinds:
        out += "<h3>By kind of rejected answer</h3>" + _html_table(
            ["rejected kind", *[f"{m} {w}" for m in r.models for w in ("per token", "summed")]],
            [[_td(k[0]), *[_td(c, "num") for c in k[1:]]] for k in kinds])
    return out


def forgetting_html(r: Report) -> str:
    if not r.forgetting:
        return ""
    t = forgetting_table(r.forgetting)
    confidence = settings(r.metrics)["confidence"]
    warn = f"<p class='warning'>⚠️ <b>{_e(t['regression'])}</b></p>" if t["regression"] else ""
    notes = ("<p class='muted'>Benchmark: " + _e("; ".join(f"{k} {v}" for k, v in t["notes"])) + ".</p>"
             if t["notes"] else "")
    rows = [[_td(row["metric"]), *[_td(fmt_estimate(row["metric"], row["values"][m]), "num") for m in t["models"]],
             *[_delta_td(row["metric"], d, 1, confidence, fmt_forgetting_delta) for d in row["deltas"].values()]]
            for row in t["rows"]]
    header = ["metric", *t["models"], *[f"Δ {c.replace('_vs_', ' vs ')}" for c in t["comparisons"]]]
    return "<h2>General ability (forgetting guard)</h2>" + warn + notes + _html_table(header, rows)


def _output_td(row: Optional[dict], limit: Optional[int], cls: str = "") -> str:
    if row is None:
        return _td("")
    verdict = {"pass": "pass", None: ""}.get(row.get("task"), "fail")
    return _text_td(answer_text(row, limit), cls or verdict)


def _instruction_td(row: dict) -> str:
    """The instruction as the user wrote it; the templated prompt the model saw, on click."""
    return (f"<td class='text'>{_e(instruction(row))}<details><summary>templated prompt</summary>"
            f"<pre>{_e(row['prompt'])}</pre></details></td>")


def samples_html(r: Report) -> str:
    picked = samples(r.generations, r.models, r.n_samples)
    if not picked:
        return ""
    limit = generation_limit(r)
    rows = [[_instruction_td(s), _text_td(s["reference"]), *[_output_td(s["outputs"].get(m), limit) for m in r.models]]
            for s in picked]
    return (f"<h2>Sample generations</h2><p class='muted'>Same prompts for every model. {_e(samples_legend(r))}</p>"
            + _html_table(["instruction", "reference", *r.models], rows, "wide"))


def errors_html(r: Report) -> str:
    totals = {m: sum(1 for g in r.generations if g["model"] == m) for m in r.models}
    table = _html_table(["failure", *r.models], [
        [_td(label), *[_td(f"{c[m]} / {totals[m]}", "num") for m in r.models]] for label, c in error_counts(r)])
    limit = generation_limit(r)
    examples = "".join(_failure_example_html(failure_label(kind, limit), row, limit)
                       for kind, row in failure_examples(r.generations, r.models).items())
    return ("<h2>Error analysis</h2><p class='muted'>Failures on the test split; an answer can have several.</p>"
            + table + examples)


def _failure_example_html(label: str, row: dict, limit: Optional[int]) -> str:
    title = f"{_e(label)} <span class='muted'>({_e(row['model'])}, {_e(row['id'])})</span>"
    cells = [_instruction_td(row), _text_td(row["reference"]), _output_td(row, limit, "fail")]
    return f"<h3>{title}</h3>" + _html_table(["instruction", "reference", "output"], [cells], "wide")


def _img(f: Figure) -> str:
    png = base64.b64encode(f.png).decode("ascii")
    return f"<figure><img alt='{_e(f.title)}' src='data:image/png;base64,{png}'></figure>"


def figures_html(r: Report) -> str:
    imgs = "".join(_img(f) for f in r.figures)
    notes = [dpo_note(r)] + [f"Not found: {m}" for m in r.missing_curves]
    return (f"<h2>{_e(figures_heading(r))}</h2>"
            + (f"<div class='figures'>{imgs}</div>" if imgs else "<p>No figures.</p>")
            + "".join(f"<p class='muted'>{_e(n)}</p>" for n in notes if n))


def hacking_html(r: Report) -> str:
    h = hacking_section(r)
    if h is None:
        return ""
    out = f"<h2>{_e(HACKING_HEADING)}</h2>"
    out += "".join(f"<p class='warning'>⚠️ <b>{_e(w)}</b></p>" for w in h["warnings"])
    out += f"<p><b>{_e(h['summary'])}</b></p>" if h["summary"] else ""
    out += ("<p>Checked:</p><ul>" + "".join(f"<li>{_e(line)}</li>" for line in h["checked"]) + "</ul>"
            if h["checked"] else "")
    out += f"<div class='figures'>{''.join(_img(f) for f in h['figures'])}</div>" if h["figures"] else ""
    out += f"<p>{_e(h['reward_model'])}</p>" if h["reward_model"] else ""
    if h["disagreements"] or h["none_found"]:
        out += f"<h3>{_e(DISAGREE_HEADING.format(basis=h['basis']))}</h3>"
        out += f"<p class='muted'>{_e(h['none_found'] or h['legend'])}</p>"
        out += "" if h["none_found"] else _html_table(DISAGREE_HEADER, [
            [_text_td(_text(d, "instruction")), _text_td(_text(d, "completion"), "fail"),
              _text_td(_text(d, "reference")), _td(d["why"])] for d in h["disagreements"]], "wide")
    if h["flips"]:
        out += f"<h3>{_e(FLIPS_HEADING)}</h3>" + _html_table(_flip_header(h["flip_steps"]), [
            [_text_td(_text(f["first"], "instruction")), _text_td(_text(f["first"], "answer"), "pass"),
             _text_td(_text(f["last"], "answer"), "fail"), _text_td(_text(f["first"], "reference"))]
            for f in h["flips"]], "wide")
    return out


def provenance_html(r: Report) -> str:
    parts = ["<h2>Provenance</h2>"]
    for stage, summary in r.training.items():
        parts.append(f"<h3>Training summary: {_e(stage)}</h3>"
                     + _html_table(["key", "value"], [[_td(k), _text_td(v)] for k, v in flatten(summary)]))
    parts.append("<h3>Data and model hashes (data/raw/manifest.json)</h3>")
    parts.append(_html_table(["key", "value"], [[_td(k), _text_td(v)] for k, v in flatten(r.manifest)])
                 if r.manifest else "<p class='muted'>data/raw/manifest.json not found</p>")
    parts.append(f"<h3>{_e(PARAMS_HEADING)}</h3>"
                 + (f"<pre>{_e(r.params_text)}</pre>" if r.params_text else "<p class='muted'>no params</p>"))
    return "".join(parts)


def split_size_html(r: Report) -> str:
    text, small = split_size_note(r)
    if not text:
        return ""
    return f"<p class='warning'>⚠️ <b>{_e(text)}</b></p>" if small else f"<p class='muted'>{_e(text)}</p>"


def render_html(r: Report) -> str:
    body = "".join([f"<h1>{_e(r.title)}</h1><p class='headline'><b>{_e(headline(r))}</b></p>", split_size_html(r),
                    f"<p>Models: {_e(', '.join(r.models))}.</p>",
                    f"<p>{_e(alignment_line(r))}</p>" if r.alignment else "", metrics_section_html(r),
                    preference_html(r), forgetting_html(r), figures_html(r), hacking_html(r), samples_html(r),
                    errors_html(r), provenance_html(r)])
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(r.title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
