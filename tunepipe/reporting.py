"""The run report: metrics with deltas, training curves, samples, error analysis, provenance.

Everything here is pure data -> text or PNG; stages/report.py reads the files and
writes reports/ atomically.

    curves = read_curves("metrics/train_sft/plots")           # {"loss": [(step, v)], "eval/loss": ...}
    figures = training_figures(sft_curves, dpo_curves, out_dir) + [skill_figure(metrics, out_dir)]
    rows = metric_rows(metrics)                               # table with deltas vs the first model
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

from tunepipe.metrics import FAILURE_KINDS

# Metrics where a smaller value is the better one; every other metric: larger is better.
LOWER_IS_BETTER = {"perplexity", "nll", "repeat_rate", "truncated_rate"}
# Neither better nor worse when they change.
NEUTRAL = {"mean_new_tokens", "n_prompts", "n_pairs"}
METRIC_ORDER = ("task_accuracy", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "perplexity", "nll",
                "pref_accuracy", "pref_margin", "eos_rate", "repeat_rate", "truncated_rate", "mean_new_tokens")
PARAMS_HEADING = "Params (params.yaml as validated, defaults filled in)"
FAILURE_LABELS = {"wrong_answer": "wrong answer", "constraint_broken": "constraint broken",
                  "too_long": "too long", "repetitive": "repetitive", "no_stop": "no stop"}


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
    preferences: list[dict] = field(default_factory=list)
    n_samples: int = 8
    training: dict = field(default_factory=dict)   # {"sft": metrics/train_sft.json, "dpo": ...}
    params_text: str = ""
    manifest: Optional[dict] = None


# --------------------------------------------------------------------------- tables


def metric_rows(metrics: dict, models: list[str]) -> list[dict]:
    """One row per metric: values per model, and deltas against the first model."""
    names = [m for m in METRIC_ORDER if any(m in metrics.get(k, {}) for k in models)]
    names += sorted({m for k in models for m in metrics.get(k, {})} - set(names) - NEUTRAL,
                    key=lambda m: (not m.startswith("acc_"), m))
    names += [m for m in ("mean_new_tokens", "n_prompts", "n_pairs") if m not in names
              and any(m in metrics.get(k, {}) for k in models)]
    rows = []
    for name in names:
        values = {k: metrics.get(k, {}).get(name) for k in models}
        first = values[models[0]]
        deltas = {k: (v - first if _num(v) and _num(first) else None) for k, v in values.items()
                  if k != models[0]}
        rows.append({"metric": name, "values": values, "deltas": deltas, "direction": direction(name)})
    return rows


def direction(metric: str) -> int:
    """+1: higher is better, -1: lower is better, 0: neither."""
    return 0 if metric in NEUTRAL else -1 if metric in LOWER_IS_BETTER else 1


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


def samples(generations: list[dict], models: list[str], n: int) -> list[dict]:
    """The first n test prompts, taken round-robin over skill families, with every model's answer."""
    by_id: dict[str, dict] = {}
    for row in generations:
        entry = by_id.setdefault(row["id"], {"id": row["id"], "family": row.get("family"), "prompt": row["prompt"],
                                             "reference": row["reference"], "outputs": {}})
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


def failure_counts(generations: list[dict], models: list[str]) -> dict[str, dict[str, int]]:
    """{kind: {model: count}} for every failure kind (zeros included)."""
    kinds = list(FAILURE_KINDS) + sorted({k for r in generations for k in r.get("failures", [])} - set(FAILURE_KINDS))
    counts = {k: {m: 0 for m in models} for k in kinds}
    for row in generations:
        for kind in row.get("failures", []):
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
            for kind in row.get("failures", []):
                examples.setdefault(kind, row)
    return examples


def preference_by_kind(preferences: list[dict], models: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """{rejected_kind: {model: (correct, total)}}."""
    out: dict[str, dict[str, list[int]]] = {}
    for row in preferences:
        kind = row.get("rejected_kind") or "unknown"
        cell = out.setdefault(kind, {m: [0, 0] for m in models}).setdefault(row["model"], [0, 0])
        cell[0] += bool(row.get("correct"))
        cell[1] += 1
    return {k: {m: tuple(v) for m, v in cells.items()} for k, cells in sorted(out.items())}


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested JSON as (dotted.key, value) pairs, for provenance tables."""
    if isinstance(obj, dict):
        return [pair for k, v in obj.items() for pair in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return [pair for i, v in enumerate(obj) for pair in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, obj if isinstance(obj, str) else json.dumps(obj))]


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


def line_figure(name: str, title: str, panels: list[tuple[str, dict[str, list]]]) -> Optional[Figure]:
    """One PNG with a panel per (y label, {series label: points}); None when nothing to plot."""
    panels = [(label, series) for label, series in panels if series]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (label, series) in zip(axes[0], panels):
        for series_name, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=series_name)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return Figure(name, title, _png(fig))


def training_figures(sft: dict, dpo: dict) -> list[Figure]:
    figures = [
        line_figure("sft_loss.png", "SFT loss", [("loss", split_series(sft, "loss"))]),
        line_figure("dpo_loss.png", "DPO loss", [("loss", split_series(dpo, "loss"))]),
        line_figure("dpo_rewards.png", "DPO rewards", [
            ("reward margin (chosen - rejected)", split_series(dpo, "rewards/margins")),
            ("reward accuracy", split_series(dpo, "rewards/accuracies"))]),
    ]
    return [f for f in figures if f is not None]


def skill_figure(metrics: dict, models: list[str]) -> Optional[Figure]:
    """Grouped bars: accuracy per skill family (and overall) for each model."""
    families = sorted({k[4:] for m in models for k in metrics.get(m, {}) if k.startswith("acc_")})
    if not families:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = families + ["overall"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 3.8))
    for i, model in enumerate(models):
        got = metrics.get(model, {})
        values = [got.get(f"acc_{f}") or 0.0 for f in families] + [got.get("task_accuracy") or 0.0]
        xs = [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=model)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.25)  # headroom for the legend above bars at 1.0
    ax.set_ylabel("task accuracy")
    ax.legend(ncols=len(models), loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Accuracy per skill family (test split)")
    return Figure("skill_accuracy.png", "Accuracy per skill family", _png(fig))


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    return buf.getvalue()


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


def _verdict(row: Optional[dict]) -> str:
    if row is None:
        return ""
    mark = {"pass": "✓ ", None: ""}.get(row.get("task"), "✗ ")
    return mark + shown(row["output"])


def metrics_section_md(r: Report) -> str:
    others = r.models[1:]
    header = ["metric", *r.models, *[f"Δ {m} vs {r.models[0]}" for m in others]]
    rows = [[row["metric"] + {1: " ↑", -1: " ↓", 0: ""}[row["direction"]],
             *[fmt(row["values"][m]) for m in r.models], *[fmt(row["deltas"].get(m), signed=True) for m in others]]
            for row in metric_rows(r.metrics, r.models)]
    return "## Metrics (test split)\n\n↑ higher is better, ↓ lower is better.\n\n" + _md_table(header, rows)


def render_markdown(r: Report) -> str:
    parts = [f"# {html.escape(r.title, quote=False)}", f"Models: {', '.join(r.models)}.", metrics_section_md(r)]
    parts.append("## Training curves and per-skill accuracy")
    parts += [f"![{f.title}](figures/{f.name})" for f in r.figures] or ["No figures: no curves or accuracies found."]
    parts += [f"_Not found: {m}_" for m in r.missing_curves]
    picked = samples(r.generations, r.models, r.n_samples)
    if picked:
        parts.append("## Sample generations\n\n✓ / ✗: the task checker's verdict.")
        parts.append(_md_table(["prompt (end)", "reference", *r.models],
                               [[prompt_tail(s["prompt"]), s["reference"],
                                 *[_verdict(s["outputs"].get(m)) for m in r.models]] for s in picked]))
    parts.append(error_section_md(r))
    if r.preferences:
        parts.append("### Preference accuracy by kind of rejected answer")
        parts.append(_md_table(["rejected kind", *r.models], [
            [kind, *[_ratio(cells.get(m)) for m in r.models]]
            for kind, cells in preference_by_kind(r.preferences, r.models).items()]))
    parts.append(provenance_md(r))
    return "\n\n".join(parts) + "\n"


def _ratio(cell) -> str:
    return "–" if not cell or not cell[1] else f"{cell[0]}/{cell[1]} ({cell[0] / cell[1]:.0%})"


def error_section_md(r: Report) -> str:
    counts = failure_counts(r.generations, r.models)
    totals = {m: sum(1 for g in r.generations if g["model"] == m) for m in r.models}
    parts = ["## Error analysis", "Failures on the test split (an answer can have several), out of "
             + ", ".join(f"{totals[m]} for {m}" for m in r.models) + ".",
             _md_table(["failure", *r.models], [[FAILURE_LABELS.get(k, k), *[counts[k][m] for m in r.models]]
                                                for k in sorted(counts, key=lambda k: -sum(counts[k].values()))])]
    for kind, row in failure_examples(r.generations, r.models).items():
        parts.append(f"**{FAILURE_LABELS.get(kind, kind)}** ({row['model']}, {row['id']}):\n\n"
                     + _md_table(["prompt (end)", "reference", "output"],
                                 [[prompt_tail(row["prompt"]), row["reference"], shown(row["output"])]]))
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
td.better{background:#e3f6e5;color:#11621f} td.worse{background:#fbe6e6;color:#8a1c1c}
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


def _delta_class(delta, sign: int) -> str:
    if not _num(delta) or sign == 0 or abs(delta) < 1e-12:
        return "num"
    return "num better" if delta * sign > 0 else "num worse"


def metrics_section_html(r: Report) -> str:
    others = r.models[1:]
    header = ["metric", *r.models, *[f"Δ {m} vs {r.models[0]}" for m in others]]
    rows = [[_td(row["metric"] + {1: " ↑", -1: " ↓", 0: ""}[row["direction"]]),
             *[_td(fmt(row["values"][m]), "num") for m in r.models],
             *[_td(fmt(row["deltas"].get(m), signed=True), _delta_class(row["deltas"].get(m), row["direction"]))
               for m in others]]
            for row in metric_rows(r.metrics, r.models)]
    return ("<h2>Metrics (test split)</h2><p class='muted'>↑ higher is better, ↓ lower is better; "
            "green: better than " + _e(r.models[0]) + ", red: worse.</p>" + _html_table(header, rows))


def _output_td(row: Optional[dict]) -> str:
    if row is None:
        return _td("")
    cls = {"pass": "pass", None: ""}.get(row.get("task"), "fail")
    return _text_td(_verdict(row), cls)


def samples_html(r: Report) -> str:
    picked = samples(r.generations, r.models, r.n_samples)
    if not picked:
        return ""
    rows = [[f"<td class='text'><details><summary>{_e(prompt_tail(s['prompt'], 160))}</summary>"
             f"{_e(s['prompt'])}</details></td>", _text_td(s["reference"]),
             *[_output_td(s["outputs"].get(m)) for m in r.models]] for s in picked]
    return ("<h2>Sample generations</h2><p class='muted'>Same prompts for every model; ✓ / ✗ is the task "
            "checker's verdict. Click a prompt to see it whole.</p>"
            + _html_table(["prompt (end)", "reference", *r.models], rows, "wide"))


def errors_html(r: Report) -> str:
    counts = failure_counts(r.generations, r.models)
    totals = {m: sum(1 for g in r.generations if g["model"] == m) for m in r.models}
    table = _html_table(["failure", *r.models], [
        [_td(FAILURE_LABELS.get(k, k)), *[_td(f"{counts[k][m]} / {totals[m]}", "num") for m in r.models]]
        for k in sorted(counts, key=lambda k: -sum(counts[k].values()))])
    examples = "".join(_failure_example_html(kind, row)
                       for kind, row in failure_examples(r.generations, r.models).items())
    prefs = ""
    if r.preferences:
        prefs = "<h3>Preference accuracy by kind of rejected answer</h3>" + _html_table(
            ["rejected kind", *r.models], [[_td(kind), *[_td(_ratio(cells.get(m)), "num") for m in r.models]]
                                           for kind, cells in preference_by_kind(r.preferences, r.models).items()])
    return ("<h2>Error analysis</h2><p class='muted'>Failures on the test split; an answer can have several.</p>"
            + table + examples + prefs)


def _failure_example_html(kind: str, row: dict) -> str:
    title = f"{_e(FAILURE_LABELS.get(kind, kind))} <span class='muted'>({_e(row['model'])}, {_e(row['id'])})</span>"
    cells = [_text_td(prompt_tail(row["prompt"])), _text_td(row["reference"]), _text_td(shown(row["output"]), "fail")]
    return f"<h3>{title}</h3>" + _html_table(["prompt (end)", "reference", "output"], [cells], "wide")


def figures_html(r: Report) -> str:
    imgs = "".join(f"<figure><img alt='{_e(f.title)}' src='data:image/png;base64,"
                   f"{base64.b64encode(f.png).decode('ascii')}'></figure>" for f in r.figures)
    missing = "".join(f"<p class='muted'>Not found: {_e(m)}</p>" for m in r.missing_curves)
    return ("<h2>Training curves and per-skill accuracy</h2>"
            + (f"<div class='figures'>{imgs}</div>" if imgs else "<p>No figures.</p>") + missing)


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


def render_html(r: Report) -> str:
    body = "".join([f"<h1>{_e(r.title)}</h1><p>Models: {_e(', '.join(r.models))}.</p>", metrics_section_html(r),
                    figures_html(r), samples_html(r), errors_html(r), provenance_html(r)])
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(r.title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
