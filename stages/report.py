"""report: the run's report as markdown and a standalone HTML page (-> reports/).

    python -m stages.report [--params params.yaml]

Reads metrics/eval.json (compare: every figure with its interval, the trivial
baselines, the paired tests), data/eval/<model>/generations.jsonl (evaluate: samples
and error analysis) for each model in it, metrics/forgetting.json when the forgetting
stage wrote it, the DVCLive histories under metrics/train_sft/plots and
metrics/train_dpo/plots, metrics/train_{sft,dpo}.json and data/raw/manifest.json, and
shows the validated params (every key, defaults filled in). Missing training curves,
generations or provenance files are noted in the report, not an error; missing
metrics/eval.json is.

The reward-hacking checks read what the alignment stage (train-dpo, any
train_dpo.algorithm) and train-reward leave, each optional:
  metrics/train_dpo/plots/metrics/  train/reward, train/kl, train/completion_length,
                train/rewards/checker, train/rewards/model (grpo/rloo), eval/task_accuracy,
                eval/answer_tokens (held-out prompts, any algorithm)
  data/alignment/heldout.jsonl   the held-out answers and checker verdicts at each evaluation
  data/alignment/rollouts.jsonl  the scored rollouts (grpo/rloo)
  metrics/train_dpo.json         "algorithm", "reward_source", "beta" (params.yaml's train_dpo
                                 where it does not say)
  metrics/train_reward.json      the reward model's pairwise accuracy, when it trained one
A missing, empty or malformed file leaves its part out (logged), never the report.

Writes reports/ (one folder, replaced atomically):
  report.md     the headline (final against the best trivial baseline; without a task
                checker, final's scores against the references and its generation
                health), what the test split's size can show (a warning when small),
                metrics table (values with intervals, baselines, tested deltas),
                preference accuracy (or why there is none: DPO skipped), the forgetting
                guard, figures, reward-hacking checks (when there is anything to
                check: reward against held-out task accuracy with a paired test, KL,
                length drift, high-reward answers the checker fails, held-out
                prompts that went from pass to fail, the reward model's accuracy),
                sample generations side by side (the instruction as written, the
                generation limit), error analysis, params and hashes
  report.html   the same, one file that opens from disk (figures embedded as base64 PNG)
  figures/      sft_loss.png, dpo_loss.png, dpo_rewards.png, skill_accuracy.png;
                hacking_reward.png, hacking_kl.png, hacking_length.png (those with data)

Params: report.title, report.n_samples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from tunepipe.artifacts import DataError, atomic_path, read_json, read_jsonl
from tunepipe.cli import StageError, run_stage
from tunepipe.params import Params

log = logging.getLogger("tunepipe.report")

EVAL_METRICS = Path("metrics/eval.json")
EVAL_DIR = Path("data/eval")
FORGETTING = Path("metrics/forgetting.json")
PLOTS = {"sft": Path("metrics/train_sft/plots"), "dpo": Path("metrics/train_dpo/plots")}
TRAIN_SUMMARIES = {"sft": Path("metrics/train_sft.json"), "dpo": Path("metrics/train_dpo.json")}
MANIFEST = Path("data/raw/manifest.json")
ALIGNMENT = Path("data/alignment")
REWARD_SUMMARY = Path("metrics/train_reward.json")
OUT = Path("reports")


def read_optional_json(path: Path):
    return read_json(path) if path.exists() else None


def read_generations(models: list[str]) -> tuple[list[dict], list[str]]:
    """Every model's generation rows, and the files that were not there."""
    rows, missing = [], []
    for model in models:
        path = EVAL_DIR / model / "generations.jsonl"
        if path.exists():
            rows += read_jsonl(path)
        else:
            missing.append(f"{path} (samples and error analysis of {model})")
    return rows, missing


def read_forgetting():
    """metrics/forgetting.json when it is there and a JSON object; its keys belong to the
    forgetting stage, so anything unexpected is logged and left out, never fatal."""
    data = read_optional(FORGETTING, read_json, "the forgetting guard")
    return data if isinstance(data, dict) else None


def read_optional(path: Path, read, what: str):
    """A file that belongs to another stage and may be absent or from an older version: None when it
    cannot be read (logged), so that part of the report is left out rather than the report."""
    try:
        return read(path) if path.exists() else None
    except DataError as exc:
        log.warning("%s; %s is left out of the report", exc, what)
        return None


def read_alignment(params: Params, summary, curves: dict):
    """train-dpo's algorithm, its held-out answers and rollouts, and train-reward's summary."""
    from tunepipe import reporting

    rows = {name: read_optional(ALIGNMENT / f"{name}.jsonl", read_jsonl, f"data/alignment/{name}.jsonl") or []
            for name in ("heldout", "rollouts")}
    alignment = reporting.alignment_of(summary, params.train_dpo.model_dump(mode="json"), curves=curves,
                                       reward_model=read_optional(REWARD_SUMMARY, read_json, "the reward model"),
                                       **rows)
    alignment.figures = reporting.hacking_figures(alignment)
    return alignment


def main(params: Params) -> None:
    cfg = params.report
    from tunepipe import reporting

    # ---------------------------------------------------------------- data
    if not EVAL_METRICS.exists():
        raise StageError(f"{EVAL_METRICS} is missing; run the evaluate and compare stages first (dvc repro compare)")
    metrics = read_json(EVAL_METRICS)
    models = reporting.eval_models(metrics) if isinstance(metrics, dict) else []
    if not models:
        raise StageError(f"{EVAL_METRICS} holds no model results; rerun the compare stage (dvc repro compare)")
    generations, missing = read_generations(models)
    training = {stage: s for stage, path in TRAIN_SUMMARIES.items() if (s := read_optional_json(path))}
    # a skipped DPO (no preference data) has no curves to miss; the report says why instead
    trained = {stage: path for stage, path in PLOTS.items() if not (stage == "dpo" and reporting.dpo_skipped(training))}
    curves = {stage: reporting.read_curves(path) for stage, path in trained.items()}
    missing += [f"{path}/metrics (training curves)" for stage, path in trained.items() if not curves[stage]]

    alignment = read_alignment(params, training.get("dpo"), curves.get("dpo", {}))

    # ---------------------------------------------------------------- figures
    figures = reporting.training_figures(curves["sft"], curves.get("dpo", {}), alignment.label)
    skills = reporting.skill_figure(metrics, models)
    figures += [skills] if skills else []

    # ---------------------------------------------------------------- render and save
    report = reporting.Report(
        title=cfg.title, models=models, metrics=metrics, figures=figures, missing_curves=missing,
        generations=generations, n_samples=cfg.n_samples, training=training,
        params_text=yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False),
        manifest=read_optional_json(MANIFEST), forgetting=read_forgetting(), alignment=alignment)
    with atomic_path(OUT, is_dir=True) as tmp:
        (tmp / "figures").mkdir(parents=True)
        for fig in figures + alignment.figures:
            (tmp / "figures" / fig.name).write_bytes(fig.png)
        (tmp / "report.md").write_text(reporting.render_markdown(report), encoding="utf-8")
        (tmp / "report.html").write_text(reporting.render_html(report), encoding="utf-8")
    log.info("wrote %s/report.md, report.html and %d figures", OUT, len(figures) + len(alignment.figures))


if __name__ == "__main__":
    run_stage(__doc__, main)
