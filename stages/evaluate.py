"""evaluate: answer and score the held-out test split with one model (-> data/eval/<model>/).

    python -m stages.evaluate --model final [--params params.yaml]

dvc.yaml runs it once per model in evaluate.models (a foreach stage: evaluate@base,
evaluate@sft, evaluate@final), so each depends only on its own model: a DPO change
re-evaluates final, never base. The models: base = models/base; sft = models/base
with the models/sft adapter merged in memory; final = models/final; export = the GGUF in
models/export read back by transformers (tunepipe.modeling.NAMED_MODELS). On
data/templated/sft_test.jsonl and pref_test.jsonl (the first evaluate.max_examples
of each), with the tokenizer from data/tokenized/tokenizer, it

  * generates an answer to every SFT prompt (greedy unless evaluate.do_sample),
    checks it with the task checker where the record has one, scores it against the
    reference (ROUGE) and for generation health (length, EOS, repeats, truncation);
  * scores the reference answer's log-probability (completion tokens only: perplexity);
  * scores the chosen and rejected answers of each test pair (summed log-probs and
    token counts: preference accuracy, summed and length-normalised).

Writes data/eval/<model>/ (replaced atomically):
  generations.jsonl  one row per SFT prompt: prompt, reference, output, length, stop
                     flags, task verdict, failure kinds, per-item ROUGE, ref_logp/ref_tokens
  preferences.jsonl  one row per pair: chosen/rejected log-probs and token counts, margin, correct
                     (empty without preference pairs: fetch.preference.source none, or unpaired
                     data, fetch.preference.format unpaired, whose rows have one answer each)
  generation.json    the answer length limit used, and how it was chosen (evaluate.max_new_tokens:
                     auto derives it from the training answers in data/templated/sft_train.jsonl),
                     and the dtype the model ran in (evaluate.dtype: auto is bfloat16 where training's
                     precision probe measured bf16 faster; 2-3x less time on such a CPU)

The figures with their intervals and the paired comparisons between models are the
compare stage's (metrics/eval.json). Params: evaluate.* (not evaluate.models, which
only decides which stages exist), shared.seed, shared.trust_remote_code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tunepipe.artifacts import DataError, atomic_path, read_jsonl, write_json, write_jsonl
from tunepipe.cli import StageError, run_stage
from tunepipe.modeling import NAMED_MODELS
from tunepipe.params import Params

log = logging.getLogger("tunepipe.evaluate")

TEMPLATED = Path("data/templated")
TOKENIZER = Path("data/tokenized/tokenizer")
OUT = Path("data/eval")
FIELDS = {"sft": ("prompt", "completion"), "pref": ("prompt", "chosen", "rejected")}
DECIMALS = 4


def read_test(kind: str, max_examples: int | None) -> list[dict]:
    from tunepipe.templates import is_unpaired

    path = TEMPLATED / f"{kind}_test.jsonl"
    if not path.exists():
        raise StageError(f"{path} is missing; run the template stage first (dvc repro template)")
    rows = read_jsonl(path)[:max_examples]
    if kind == "pref" and rows and is_unpaired(rows[0]):
        # preference accuracy asks which of two answers the model prefers: one answer has no such question
        log.info("%s holds unpaired rows (one answer and a label each, fetch.preference.format: unpaired): "
                 "preference accuracy needs pairs and is not measured", path)
        return []
    for n, row in enumerate(rows, 1):
        for field in FIELDS[kind]:
            if not isinstance(row.get(field), str):
                raise DataError(f"{path}: row {n} (id {row.get('id')!r}): field '{field}' must be a string")
    return rows


def load_for_eval(name: str, tokenizer, trust_remote_code: bool, dtype: str = "float32"):
    """The model called ``name`` (tunepipe.modeling.NAMED_MODELS) in ``dtype``, and every id that ends its answers."""
    from tunepipe.attention import use_packed_sdpa
    from tunepipe.generation import eos_ids
    from tunepipe.modeling import check_named_model, load_named_model, torch_dtype
    from tunepipe.tokenization import generation_eos_ids

    check_named_model(name, "evaluate.models")
    model = load_named_model(name, tokenizer, trust_remote_code=trust_remote_code).eval()
    model.to(device=_device(), dtype=torch_dtype(dtype))
    use_packed_sdpa(model)  # scoring packs prompts and answers in rows (generation runs SDPA as before)
    # load_named_model sets the tokenizer's EOS as the generation EOS; keep any other stop id the
    # model folder declares (Llama 3 stops on several; the GGUF holds its own in its metadata).
    stops = set(eos_ids(model, tokenizer)) | generation_eos_ids(NAMED_MODELS[name][0])
    return model, sorted(stops)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def generation_limit(cfg, tokenizer, templated: Path = TEMPLATED) -> dict:
    """evaluate.max_new_tokens, derived from the training answers when it is auto (benchmarks.generate too)."""
    from tunepipe.generation import answer_length_limit

    if cfg.max_new_tokens != "auto":
        return {"max_new_tokens": cfg.max_new_tokens, "derived": "evaluate.max_new_tokens"}
    answers = [r["completion"] for r in read_jsonl(templated / "sft_train.jsonl")]
    limit, how = answer_length_limit(tokenizer, answers, cfg.max_new_tokens_cap)
    return {"max_new_tokens": limit, "derived": how}


def score_generations(name, model, stops, tokenizer, rows, cfg, max_new_tokens: int) -> list[dict]:
    """Per SFT test prompt: the answer, its checks and scores, and the reference's log-prob."""
    from tunepipe import metrics
    from tunepipe.generation import Decoding, generate

    prompts, refs = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    metas = [r.get("meta") or {} for r in rows]
    gens = generate(model, tokenizer, prompts, Decoding.from_params(cfg, max_new_tokens),
                    batch_size=cfg.batch_size, eos_token_ids=stops, desc=f"{name}: generate")
    outputs = [g.text for g in gens]
    results = metrics.task_results(metas, outputs)
    _, rouge_items = metrics.rouge(outputs, refs)
    ref_scores = metrics.completion_logprobs(model, tokenizer, prompts, refs, batch_size=cfg.batch_size,
                                             desc=f"{name}: reference NLL")
    return [{
        "model": name, "id": row.get("id"), "family": meta.get("family"), "prompt": row["prompt"],
        "instruction": row.get("instruction", row["prompt"]),
        "reference": ref, "output": g.text, "n_new_tokens": g.n_new_tokens, "stopped_at_eos": g.stopped_at_eos,
        "truncated": g.truncated, "task": result,
        "failures": metrics.failure_kinds(result if result != "pass" else None, g, ref, cfg.repeat_ngram),
        **{k: round(v, DECIMALS) for k, v in scores.items()},
        "ref_logp": round(logp, DECIMALS), "ref_tokens": n, "ref_nll": round(-logp / max(n, 1), DECIMALS),
    } for row, meta, ref, g, result, scores, (logp, n)
        in zip(rows, metas, refs, gens, results, rouge_items, ref_scores)]


def score_preferences(name, model, tokenizer, rows, cfg) -> list[dict]:
    """Summed log-probabilities and token counts of the chosen and rejected answers of each test pair."""
    from tunepipe import metrics

    pairs = metrics.completion_set_logprobs(model, tokenizer, [r["prompt"] for r in rows],
                                            [[r["chosen"], r["rejected"]] for r in rows],
                                            batch_size=cfg.batch_size, desc=f"{name}: preference pairs")
    return [{
        "model": name, "id": row.get("id"), "family": (row.get("meta") or {}).get("family"),
        "rejected_kind": (row.get("meta") or {}).get("rejected_kind"),
        "chosen_logp": round(c, DECIMALS), "rejected_logp": round(r, DECIMALS), "chosen_tokens": nc,
        "rejected_tokens": nr, "margin": round(c - r, DECIMALS), "correct": c > r,
    } for row, ((c, nc), (r, nr)) in zip(rows, pairs)]


def main(params: Params, model: str) -> None:
    cfg = params.evaluate

    # ---------------------------------------------------------------- data
    sft_rows = read_test("sft", cfg.max_examples)
    pref_rows = read_test("pref", cfg.max_examples)
    log.info("%s on the test split: %d prompts, %d preference pairs", model, len(sft_rows), len(pref_rows))

    # ---------------------------------------------------------------- tokenizer
    from transformers import set_seed

    from tunepipe.modeling import load_tokenizer, set_cpu_threads
    from tunepipe.precision import inference_dtype

    if not TOKENIZER.is_dir():
        raise StageError(f"{TOKENIZER} is missing; run the tokenize stage first (dvc repro tokenize)")
    tokenizer = load_tokenizer(TOKENIZER, trust_remote_code=params.shared.trust_remote_code)
    tokenizer.padding_side = "left"  # generation pads on the left (generate() pads explicitly as well)

    # ---------------------------------------------------------------- model
    set_cpu_threads()  # only the free cores: a busy core makes every torch op wait
    set_seed(params.shared.seed)
    started = time.perf_counter()
    # every model of a run in one dtype (the probe at the base's shapes), so their differences are theirs
    dtype = inference_dtype(cfg.dtype, NAMED_MODELS["base"][0])
    lm, stops = load_for_eval(model, tokenizer, params.shared.trust_remote_code, dtype)

    # ---------------------------------------------------------------- evaluate
    limit = {**generation_limit(cfg, tokenizer), "dtype": dtype}
    log.info("max_new_tokens=%d (%s); %s", limit["max_new_tokens"], limit["derived"], dtype)
    generations = score_generations(model, lm, stops, tokenizer, sft_rows, cfg, limit["max_new_tokens"])
    preferences = score_preferences(model, lm, tokenizer, pref_rows, cfg) if pref_rows else []
    log.info("%s: %s (%.0f s)", model, _headline(generations, preferences), time.perf_counter() - started)

    # ---------------------------------------------------------------- save
    with atomic_path(OUT / model, is_dir=True) as tmp:
        write_jsonl(tmp / "generations.jsonl", generations)
        write_jsonl(tmp / "preferences.jsonl", preferences)
        write_json(tmp / "generation.json", limit)


def _headline(generations: list[dict], preferences: list[dict]) -> str:
    """A first look for the log; the figures with intervals are the compare stage's."""
    checked = [g["task"] == "pass" for g in generations if g["task"] is not None]
    parts = [f"task accuracy {sum(checked)}/{len(checked)}"] if checked else []
    if preferences:
        parts.append(f"preference accuracy {sum(p['correct'] for p in preferences)}/{len(preferences)}")
    return ", ".join(parts) or "no checkable items"


if __name__ == "__main__":
    run_stage(__doc__, main, options={"--model": {"required": True, "choices": sorted(NAMED_MODELS),
                                                  "help": "which model to evaluate"}})
