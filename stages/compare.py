"""compare: every evaluation metric with its interval, trivial baselines and paired tests (-> metrics/eval.json).

    python -m stages.compare [--params params.yaml]

Reads data/eval/<model>/{generations,preferences}.jsonl and generation.json for each model in
evaluate.models that the evaluate stage has written (a missing one is skipped with a
log line), and data/templated/sft_train.jsonl and sft_test.jsonl for the trivial
baselines (tunepipe.tasks.trivial_baselines, random_choice_accuracy). Takes a few
seconds: no model is loaded.

Writes metrics/eval.json (4 decimals, flat keys so `dvc metrics show` carries them):

  "models": ["base", "sft", "final"]                the models compared, in order
  "<model>": {<metric>: v, <metric>_ci_low: .., <metric>_ci_high: .., n_prompts, n_pairs, n_checked}
      task_accuracy, acc_<family>; rouge1/2/L/Lsum; bleu; perplexity (of the references);
      pref_accuracy (summed log-probs), pref_accuracy_norm (mean log-prob per token),
      pref_acc_<rejected_kind>, pref_acc_norm_<rejected_kind>, pref_margin;
      eos_rate, repeat_rate, truncated_rate, mean_new_tokens
  "baseline_<name>": {"task_accuracy": .., its interval, acc_<family> ..}   (constant answers, random choice)
  "comparisons": {"<a>_vs_<b>": {<metric>_delta, <metric>_delta_ci_low, <metric>_delta_ci_high,
                                  <metric>_p_value, <metric>_significant, n_paired}}
      each model against the one before it, and the last against the first (final_vs_base)
  "headline": {"model", "baseline", "delta", "delta_ci_low", "delta_ci_high", "p_value",
               "significant", "text"}: the last model's task accuracy against the best baseline
  "settings": {"confidence", "alpha", "bootstrap_resamples"}
  "test_size": {"n_items", "min_significant_pts", "wilson_halfwidth_pts", "small", ..}: what so many
               test prompts can show (tunepipe.stats.test_size_note); the report warns when small
  "generation": {"max_new_tokens", "derived", "dtype"}: the answer length limit evaluate used, and why,
                and the dtype the models ran in

Intervals: Wilson for proportions (accuracies, rates), a seeded percentile bootstrap
over items for the rest. Paired tests (on the items both models answered): exact
McNemar for proportions, a paired bootstrap otherwise; "significant" is p < compare.alpha.
The deltas are a - b in the metric's own unit (0.219 = 21.9 points of accuracy).

And metrics/eval_items.json: the compact per-item results (tunepipe.prdiff) that
`scripts/metrics_diff.sh` compares between two revisions.

Params: evaluate.models, compare.confidence, compare.alpha, compare.bootstrap_resamples,
compare.seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunepipe.artifacts import read_json, read_jsonl, write_json
from tunepipe.cli import StageError, run_stage
from tunepipe.params import Params

log = logging.getLogger("tunepipe.compare")

EVAL_DIR = Path("data/eval")
TEMPLATED = Path("data/templated")
METRICS = Path("metrics/eval.json")
ITEMS = Path("metrics/eval_items.json")


# --------------------------------------------------------------------------- inputs


def read_runs(models: list[str]) -> dict[str, tuple[list[dict], list[dict]]]:
    """{model: (generations, preferences)} for each listed model the evaluate stage wrote."""
    from tunepipe.measures import MODEL_ORDER

    runs = {}
    ordered = [m for m in MODEL_ORDER if m in models] + [m for m in dict.fromkeys(models) if m not in MODEL_ORDER]
    for model in ordered:
        folder = EVAL_DIR / model
        if not (folder / "generations.jsonl").exists():
            log.info("%s: no %s/generations.jsonl; skipped (dvc repro evaluate@%s to include it)",
                     model, folder, model)
            continue
        prefs = read_jsonl(folder / "preferences.jsonl") if (folder / "preferences.jsonl").exists() else []
        runs[model] = (read_jsonl(folder / "generations.jsonl"), prefs)
    if not runs:
        raise StageError(f"no evaluation results under {EVAL_DIR}/ for any of {list(models)}; "
                         "run the evaluate stage first (dvc repro evaluate)")
    return runs


def read_records(split: str) -> list[dict]:
    path = TEMPLATED / f"sft_{split}.jsonl"
    if not path.exists():
        raise StageError(f"{path} is missing; run the template stage first (dvc repro template)")
    return read_jsonl(path)


def generation_settings(models: list[str]) -> dict:
    """The answer length limit evaluate used (the same params for every model), and how it was chosen."""
    for model in models:
        if (EVAL_DIR / model / "generation.json").is_file():
            return read_json(EVAL_DIR / model / "generation.json")
    return {}


def main(params: Params) -> None:
    from tunepipe import prdiff
    from tunepipe.measures import compute, rounded

    cfg = params.compare
    runs = read_runs(params.evaluate.models)
    train, test = read_records("train"), read_records("test")
    result = rounded({**compute(runs, train, test, cfg), "generation": generation_settings(list(runs))})
    write_json(METRICS, result)
    write_json(ITEMS, prdiff.item_results(runs))
    for m in result["models"]:
        acc = result[m].get("task_accuracy")
        log.info("%s: task accuracy %s [%s, %s], %d prompts, %d pairs", m, acc, result[m].get("task_accuracy_ci_low"),
                 result[m].get("task_accuracy_ci_high"), result[m]["n_prompts"], result[m]["n_pairs"])
    if result["headline"]:
        log.info("%s", result["headline"]["text"])
    log.info("wrote %s and %s", METRICS, ITEMS)


if __name__ == "__main__":
    run_stage(__doc__, main)
