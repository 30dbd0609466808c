"""evaluate: score base, SFT and final models on the held-out test split (-> data/eval, metrics/eval.json).

    python -m stages.evaluate [--params params.yaml]

For each model in evaluate.models (base = models/base; sft = models/base with
the models/sft adapter merged in memory; final = models/final), on
data/templated/sft_test.jsonl and pref_test.jsonl (the first evaluate.max_examples
of each), with the tokenizer from data/tokenized/tokenizer:

  * generates an answer to every SFT prompt (greedy unless evaluate.do_sample)
    and scores it: task accuracy (tasks.check) overall and per skill family,
    ROUGE-1/2/L/Lsum, corpus BLEU, and generation health (mean new tokens,
    EOS / repeated-n-gram / truncation rates);
  * the perplexity of the reference answers (completion tokens only);
  * preference accuracy and mean log-prob margin on the test pairs.

Writes data/eval/ (one folder, replaced atomically):
  generations.jsonl  one row per model x SFT prompt: prompt, reference, output,
                     length, stop flags, per-item ROUGE and reference NLL,
                     task verdict, failure kinds
  preferences.jsonl  one row per model x pair: summed log-probs, margin, correct
and metrics/eval.json: {model: {metric: value}}, 4 decimals, flat keys
(acc_<family> per skill family) so `dvc metrics diff` reads as one table.

Params: evaluate.*, shared.seed, shared.trust_remote_code.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

from tunepipe.artifacts import DataError, atomic_path, read_jsonl, write_json, write_jsonl
from tunepipe.cli import StageError, run_stage
from tunepipe.params import Params

log = logging.getLogger("tunepipe.evaluate")

TEMPLATED = Path("data/templated")
TOKENIZER = Path("data/tokenized/tokenizer")
MODEL_DIRS = {"base": Path("models/base"), "sft": Path("models/sft"), "final": Path("models/final")}
OUT = Path("data/eval")
METRICS = Path("metrics/eval.json")
FIELDS = {"sft": ("prompt", "completion"), "pref": ("prompt", "chosen", "rejected")}
DECIMALS = 4


def read_test(kind: str, max_examples: int | None) -> list[dict]:
    path = TEMPLATED / f"{kind}_test.jsonl"
    if not path.exists():
        raise StageError(f"{path} is missing; run the template stage first (dvc repro template)")
    rows = read_jsonl(path)[:max_examples]
    for n, row in enumerate(rows, 1):
        for field in FIELDS[kind]:
            if not isinstance(row.get(field), str):
                raise DataError(f"{path}: row {n} (id {row.get('id')!r}): field '{field}' must be a string")
    return rows


def load_for_eval(name: str, tokenizer, trust_remote_code: bool):
    """The model called ``name`` (sft: the base with its adapter merged in memory),
    and every id that ends its answers."""
    from tunepipe.generation import eos_ids
    from tunepipe.modeling import load_merged
    from tunepipe.tokenization import generation_eos_ids

    start, adapters = (MODEL_DIRS["base"], [MODEL_DIRS["sft"]]) if name == "sft" else (MODEL_DIRS[name], [])
    for path in [start, *adapters]:
        if not path.is_dir():
            raise StageError(f"{path} is missing; it is needed to evaluate '{name}' (dvc repro first, "
                             "or drop it from evaluate.models)")
    model = load_merged(start, adapters, tokenizer, trust_remote_code=trust_remote_code).eval()
    model.to(_device())
    # load_merged sets the tokenizer's EOS as the generation EOS; keep any other stop id the
    # model folder declares (Llama 3 stops on several).
    stops = set(eos_ids(model, tokenizer)) | generation_eos_ids(start)
    return model, sorted(stops)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_model(name, model, stops, tokenizer, sft_rows, pref_rows, cfg) -> tuple[dict, list[dict], list[dict]]:
    """All metrics of one model, and its per-item generation and preference rows."""
    gen_summary, gen_rows = score_generations(name, model, stops, tokenizer, sft_rows, cfg)
    pref_summary, pref_out = score_preferences(name, model, tokenizer, pref_rows, cfg)
    summary = {**gen_summary, **pref_summary, "n_prompts": len(sft_rows), "n_pairs": len(pref_rows)}
    return _rounded(summary), gen_rows, pref_out


def score_generations(name, model, stops, tokenizer, rows, cfg) -> tuple[dict, list[dict]]:
    """Answers to the SFT test prompts: task accuracy, ROUGE, BLEU, health; and the
    perplexity of the reference answers."""
    from tunepipe import metrics
    from tunepipe.generation import Decoding, generate

    prompts, refs = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    metas = [r.get("meta") or {} for r in rows]
    gens = generate(model, tokenizer, prompts, Decoding.from_params(cfg), batch_size=cfg.batch_size,
                    eos_token_ids=stops, desc=f"{name}: generate")
    outputs = [g.text for g in gens]
    results = metrics.task_results(metas, outputs)
    rouge, rouge_items = metrics.rouge(outputs, refs)
    ref_scores = metrics.completion_logprobs(model, tokenizer, prompts, refs, batch_size=cfg.batch_size,
                                             desc=f"{name}: reference NLL")
    summary = {**metrics.task_accuracy(metas, results), **rouge, "bleu": metrics.bleu(outputs, refs),
               **metrics.perplexity(ref_scores), **metrics.health(gens, cfg.repeat_ngram)}
    out = [{
        "model": name, "id": row.get("id"), "family": meta.get("family"), "prompt": row["prompt"],
        "reference": ref, "output": g.text, "n_new_tokens": g.n_new_tokens, "stopped_at_eos": g.stopped_at_eos,
        "truncated": g.truncated, "task": result,
        "failures": metrics.failure_kinds(result if result != "pass" else None, g, ref, cfg.repeat_ngram),
        "rougeL": round(scores["rougeL"], DECIMALS), "ref_nll": round(-logp / max(n, 1), DECIMALS),
    } for row, meta, ref, g, result, scores, (logp, n)
        in zip(rows, metas, refs, gens, results, rouge_items, ref_scores)]
    return summary, out


def score_preferences(name, model, tokenizer, rows, cfg) -> tuple[dict, list[dict]]:
    """Summed log-probabilities of the chosen and rejected answers of each test pair."""
    from tunepipe import metrics

    pairs = metrics.completion_set_logprobs(model, tokenizer, [r["prompt"] for r in rows],
                                            [[r["chosen"], r["rejected"]] for r in rows],
                                            batch_size=cfg.batch_size, desc=f"{name}: preference pairs")
    chosen, rejected = [p[0] for p in pairs], [p[1] for p in pairs]
    out = [{
        "model": name, "id": row.get("id"), "family": (row.get("meta") or {}).get("family"),
        "rejected_kind": (row.get("meta") or {}).get("rejected_kind"),
        "chosen_logp": round(c, DECIMALS), "rejected_logp": round(r, DECIMALS),
        "margin": round(c - r, DECIMALS), "correct": c > r,
    } for row, (c, _), (r, _) in zip(rows, chosen, rejected)]
    return metrics.preference(chosen, rejected), out


def _rounded(summary: dict) -> dict:
    return {k: round(v, DECIMALS) if isinstance(v, float) else v for k, v in summary.items()}


def main(params: Params) -> None:
    cfg = params.evaluate

    # ---------------------------------------------------------------- data
    sft_rows = read_test("sft", cfg.max_examples)
    pref_rows = read_test("pref", cfg.max_examples)
    log.info("test split: %d prompts, %d preference pairs", len(sft_rows), len(pref_rows))

    # ---------------------------------------------------------------- tokenizer
    from transformers import set_seed

    from tunepipe.modeling import load_tokenizer, set_cpu_threads

    if not TOKENIZER.is_dir():
        raise StageError(f"{TOKENIZER} is missing; run the tokenize stage first (dvc repro tokenize)")
    tokenizer = load_tokenizer(TOKENIZER, trust_remote_code=params.shared.trust_remote_code)
    tokenizer.padding_side = "left"  # generation pads on the left (generate() pads explicitly as well)

    # ---------------------------------------------------------------- evaluate, one model at a time
    set_cpu_threads()  # only the free cores: a busy core makes every torch op wait
    summaries, gen_rows, pref_out = {}, [], []
    for name in dict.fromkeys(cfg.models):  # each once, in the order given
        started = time.perf_counter()
        set_seed(params.shared.seed)  # same seed per model: its results do not depend on the models before it
        model, stops = load_for_eval(name, tokenizer, params.shared.trust_remote_code)
        summaries[name], gens, prefs = evaluate_model(name, model, stops, tokenizer, sft_rows, pref_rows, cfg)
        gen_rows += gens
        pref_out += prefs
        del model  # free it before the next one is loaded
        _release_memory()
        log.info("%s: %s (%.0f s)", name, _headline(summaries[name]), time.perf_counter() - started)

    # ---------------------------------------------------------------- save
    with atomic_path(OUT, is_dir=True) as tmp:
        write_jsonl(tmp / "generations.jsonl", gen_rows)
        write_jsonl(tmp / "preferences.jsonl", pref_out)
    write_json(METRICS, summaries)


def _headline(summary: dict) -> str:
    keys = ("task_accuracy", "rougeL", "perplexity", "pref_accuracy", "eos_rate")
    return ", ".join(f"{k} {summary[k]}" for k in keys if k in summary)


if __name__ == "__main__":
    run_stage(__doc__, main)
