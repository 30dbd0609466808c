"""Per-item results of a run, and what moved between two revisions: the PR diff's significance section.

The compare stage writes metrics/eval_items.json with ``item_results``: per model
the task verdict, a shortened answer, ROUGE-L and the reference NLL of every test
prompt, and whether each test pair is ranked right (summed and per-token log-probs).
Lists only, so `dvc metrics show` leaves it out; small enough to commit.

    python -m tunepipe.prdiff BASE_REV [--items metrics/eval_items.json] [--params params.yaml]

prints markdown: for each model in both revisions, each metric's change on the items
present in both, with a paired test (exact McNemar for accuracies, a paired bootstrap for
ROUGE-L and perplexity) and a significance mark, then the task items that flipped
(fail -> pass, pass -> fail), a few of each (compare.n_flipped), with the prompt and both
answers. scripts/metrics_diff.sh calls it; with no per-item results at BASE_REV it says so.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from tunepipe import stats

ITEMS = "metrics/eval_items.json"
OUTPUT_CHARS = 200
PROMPT_CHARS = 160
DECIMALS = 4

# (key, label, kind): kind "pass" and "pair" are 0/1 outcomes (McNemar), the others paired bootstraps.
METRICS = (("task_accuracy", "task accuracy", "pass"), ("rougeL", "ROUGE-L", "mean"),
           ("perplexity", "perplexity", "perplexity"), ("pref_accuracy", "preference accuracy", "pair"),
           ("pref_accuracy_norm", "preference accuracy (per token)", "pair_norm"))
PERCENT = {"task_accuracy", "pref_accuracy", "pref_accuracy_norm"}


# --------------------------------------------------------------------------- writing (compare stage)


def item_results(runs: dict[str, tuple[list[dict], list[dict]]]) -> dict:
    """metrics/eval_items.json from {model: (generations rows, preferences rows)}."""
    first = next(iter(runs.values()))[0] if runs else []
    return {
        "prompts": [{"id": g["id"], "prompt": question(g.get("prompt", "")), "reference": cut(g.get("reference", ""))}
                    for g in first],
        "models": {m: {"generations": [_generation(g) for g in gens], "preferences": [_pair(p) for p in prefs]}
                   for m, (gens, prefs) in runs.items()},
    }


def _generation(g: dict) -> dict:
    return {"id": g["id"], "task": g.get("task"), "output": cut(g.get("output", "")),
            "rougeL": _round(g.get("rougeL")), "ref_nll": _round(g.get("ref_nll")), "ref_tokens": g.get("ref_tokens")}


def _pair(p: dict) -> dict:
    from tunepipe.metrics import prefers_per_token

    norm = (prefers_per_token(p["chosen_logp"], p["chosen_tokens"], p["rejected_logp"], p["rejected_tokens"])
            if "chosen_tokens" in p and "rejected_tokens" in p else None)
    return {"id": p["id"], "correct": bool(p.get("correct")), "correct_norm": norm}


def _round(v):
    return round(v, DECIMALS) if isinstance(v, float) else v


def cut(text: str, limit: int = OUTPUT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>")
_HEADING = re.compile(r"^###\s*\w+:?$")  # Alpaca's "### Input:"
_ROLE = re.compile(r"^(system|user|assistant|###\s*\w+:?|\w+:)$", re.IGNORECASE)


def question(prompt: str, limit: int = PROMPT_CHARS) -> str:
    """The question of a rendered prompt, without template markers and the system prompt:
    the text after the last user turn (or instruction heading), on one line."""
    lines = [ln.strip() for ln in _SPECIAL.sub("\n", prompt).splitlines() if ln.strip()]
    while lines and _ROLE.match(lines[-1]):  # the assistant / "### Response:" cue
        lines.pop()
    starts = [k for k, ln in enumerate(lines) if ln.lower() in ("user", "### instruction:", "instruction:")]
    if starts:
        lines = lines[starts[-1] + 1:]
    return cut(" ".join(ln for ln in lines if not _HEADING.match(ln)), limit)


# --------------------------------------------------------------------------- comparing two revisions


def metric_outcomes(model: dict, key: str, kind: str) -> dict[str, object]:
    """{item id: per-item data} of one metric of one model's per-item results."""
    gens, pairs = model.get("generations", []), model.get("preferences", [])
    if kind == "pass":
        return {g["id"]: g["task"] == "pass" for g in gens if g.get("task") is not None}
    if kind == "mean":
        return {g["id"]: g[key] for g in gens if isinstance(g.get(key), (int, float))}
    if kind == "perplexity":  # summed log-prob back from the rounded per-token NLL
        return {g["id"]: (-g["ref_nll"] * g["ref_tokens"], g["ref_tokens"]) for g in gens
                if isinstance(g.get("ref_nll"), (int, float)) and g.get("ref_tokens")}
    field = "correct" if kind == "pair" else "correct_norm"
    return {p["id"]: bool(p[field]) for p in pairs if p.get(field) is not None}


def compare_metric(old: dict, new: dict, kind: str, cfg) -> Optional[dict]:
    """New minus old on the items in both: values, delta, p-value, significance."""
    ids = [i for i in new if i in old]
    if not ids:
        return None
    a, b = [new[i] for i in ids], [old[i] for i in ids]
    opts = dict(confidence=cfg.confidence, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    if kind in ("pass", "pair", "pair_norm"):
        res = stats.compare_proportions(a, b, **opts)
        sa, sb = stats.mean(a), stats.mean(b)
    else:
        sa, sb = _statistic(a, kind), _statistic(b, kind)
        res = stats.paired_bootstrap(sa, sb, **opts)
    return {**res, "old": sb.value(), "new": sa.value(), "n": len(ids),
            "significant": bool(res["p_value"] < cfg.alpha)}


def _statistic(values: list, kind: str) -> stats.Statistic:
    if kind == "perplexity":
        v = np.asarray(values, dtype=float)
        return stats.perplexity(v[:, 0], v[:, 1])
    return stats.mean(values)


def flips(old: dict, new: dict) -> dict[str, list[str]]:
    """Task items whose verdict changed: {"fixed": fail -> pass ids, "broken": pass -> fail ids}."""
    o, n = metric_outcomes(old, "task_accuracy", "pass"), metric_outcomes(new, "task_accuracy", "pass")
    common = [i for i in n if i in o]
    return {"fixed": [i for i in common if n[i] and not o[i]], "broken": [i for i in common if o[i] and not n[i]]}


# --------------------------------------------------------------------------- markdown


def render(old: Optional[dict], new: Optional[dict], rev: str, cfg) -> str:
    title = f"### Per-item changes: `{rev}` → this run\n\n"
    if new is None:
        return title + f"_No per-item results in the workspace ({ITEMS}); run `dvc repro compare`._\n"
    if old is None:
        return title + f"_No per-item results at `{rev}`; significance not computed._\n"
    parts = [title + (f"Paired on the items present in both revisions: exact McNemar test for accuracies, "
                      f"paired bootstrap ({cfg.bootstrap_resamples} resamples) otherwise. "
                      f"**\\*** significant at α = {cfg.alpha}; n.s. not significant.")]
    rows, models = [], ordered(new.get("models", {}))
    for model, items in models.items():
        if model not in old.get("models", {}):
            parts.append(f"_{model}: not in `{rev}`'s per-item results; nothing to compare._")
            continue
        rows += _metric_rows(model, old["models"][model], items, cfg)
    if rows:
        parts.append(_table(["model", "metric", f"`{rev}`", "this run", "change", "p", "significant", "items"], rows))
    for model, items in models.items():
        if model in old.get("models", {}):
            parts.append(flipped_md(model, old["models"][model], items, _prompts(new, old), cfg.n_flipped))
    return "\n\n".join(parts) + "\n"


def ordered(models: dict) -> dict:
    """base, sft, final first (the JSON file's keys are sorted), then any other."""
    known = [m for m in ("base", "sft", "final") if m in models]
    return {m: models[m] for m in known + sorted(set(models) - set(known))}


def _metric_rows(model: str, old: dict, new: dict, cfg) -> list[list[str]]:
    rows = []
    for key, label, kind in METRICS:
        res = compare_metric(metric_outcomes(old, key, kind), metric_outcomes(new, key, kind), kind, cfg)
        if res is None:
            continue
        rows.append([model, label, _value(key, res["old"]), _value(key, res["new"]), _delta(key, res["delta"]),
                     format_p(res["p_value"]), "**\\***" if res["significant"] else "n.s.", str(res["n"])])
    return rows


def flipped_md(model: str, old: dict, new: dict, prompts: dict, n_flipped: int) -> str:
    moved = flips(old, new)
    head = (f"#### {model}: {len(moved['fixed'])} fail → pass, {len(moved['broken'])} pass → fail")
    if not moved["fixed"] and not moved["broken"]:
        return head + "\n\n_No task item changed its verdict._"
    answers = ({g["id"]: g for g in old.get("generations", [])}, {g["id"]: g for g in new.get("generations", [])})
    parts = [head]
    for direction, label in (("fixed", "fail → pass"), ("broken", "pass → fail")):
        ids = moved[direction]
        if not ids:
            continue
        shown = ids[:n_flipped]
        rows = [[i, prompts.get(i, ""), _answer(answers[0].get(i)), _answer(answers[1].get(i))] for i in shown]
        more = f"\n\n… and {len(ids) - len(shown)} more" if len(ids) > len(shown) else ""
        parts.append(f"**{label}** ({len(ids)}):\n\n" + _table(["id", "prompt", "old answer", "new answer"], rows)
                     + more)
    return "\n\n".join(parts)


def _answer(g: Optional[dict]) -> str:
    if g is None:
        return ""
    mark = "✓" if g.get("task") == "pass" else f"✗ {g.get('task')}"
    return f"{mark}: {g.get('output', '')}"


def _prompts(*files: dict) -> dict[str, str]:
    out = {}
    for f in reversed(files):  # the newer file wins
        out.update({p["id"]: p.get("prompt", "") for p in f.get("prompts", [])})
    return out


def _value(key: str, v: float) -> str:
    return f"{v:.1%}" if key in PERCENT else f"{v:.4f}" if key != "perplexity" else f"{v:.3f}"


def _delta(key: str, d: float) -> str:
    return f"{d * 100:+.1f} pts" if key in PERCENT else f"{d:+.4f}" if key != "perplexity" else f"{d:+.3f}"


def format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def _cell(text) -> str:
    """One markdown table cell: pipes escaped, one line, no "<tag" GitHub would take for HTML ("p<0.001" stays)."""
    text = str(text).replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")
    return re.sub(r"<(?=[A-Za-z/!?\\])", "&lt;", text)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


# --------------------------------------------------------------------------- command line


def read_at(rev: str, path: str = ITEMS) -> Optional[dict]:
    """The file as committed at ``rev`` (None when it was not there, or is not valid JSON)."""
    out = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return None


def settings(params_path: str):
    """The compare section of params.yaml, defaults where it is missing or invalid."""
    import yaml

    from tunepipe.params import Compare

    try:
        raw = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
        return Compare.model_validate(raw.get("compare") or {})
    except Exception as exc:  # a broken params file must not hide the metrics diff
        print(f"prdiff: {params_path}: compare section not used ({type(exc).__name__}); defaults apply",
              file=sys.stderr)
        return Compare()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="base revision (git)")
    parser.add_argument("--items", default=ITEMS,
                        help=f"per-item results, in the workspace and in git (default {ITEMS})")
    parser.add_argument("--params", default="params.yaml", help="params file with the compare section")
    parser.add_argument("--label", default=None, help="how to name the base revision (default: rev)")
    args = parser.parse_args(argv)
    cfg = settings(args.params)
    path = Path(args.items)
    new = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    sys.stdout.write(render(read_at(args.rev, args.items), new, args.label or args.rev, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
