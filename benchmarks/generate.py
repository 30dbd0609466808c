"""evaluate's generation: tunepipe.generation vs one ``model.generate`` call per prompt.

    python -m benchmarks.generate [--prompts 96] [--repeats 2]

Every side decodes greedily (params.evaluate.max_new_tokens, derived from the
training answers as evaluate does when it is auto; KV cache, stop at EOS) from the
same base model and test prompts (data/templated/sft_test.jsonl, else the preference
prompts; by default all 96 the evaluate stage scores):

    naive            ``model.generate`` once per prompt (batch 1, no padding): the loop everyone writes first
    generate_batched ``model.generate`` on left-padded batches of params.evaluate.batch_size, sorted by length
                     (what tunepipe.generation did before its own loop: shows what batching alone gives)
    ours             ``tunepipe.generation.generate``: the same batches, the shared prompt prefix computed
                     once, finished rows dropped from the batch

Runs alternate in one process (naive, generate_batched, ours, naive, ...) and the
medians are compared. Generated tokens count up to and including each answer's EOS.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from benchmarks import harness


def load_prompts(ws: Path, n: int) -> list[str]:
    templated = ws / "data/templated/sft_test.jsonl"
    if templated.is_file():
        from tunepipe.artifacts import read_jsonl

        return [r["prompt"] for r in read_jsonl(templated)][:n]
    from datasets import load_from_disk

    return list(load_from_disk(str(ws / "data/tokenized/pref"))["train"]["prompt"][:n])


def naive_generate(model, tokenizer, prompts, decoding) -> list:
    """The loop everyone writes first: one ``generate`` call per prompt, nothing padded
    (a batch of one has no padding; the length order changes no cost)."""
    return batched_generate(model, tokenizer, prompts, decoding, batch_size=1)


def batched_generate(model, tokenizer, prompts, decoding, batch_size: int) -> list:
    """``model.generate`` on left-padded batches, longest prompts first."""
    from tunepipe import generation as g

    config = greedy_config(model, tokenizer, decoding)
    eos = set(config.eos_token_id)
    encoded = g.encode_prompts(tokenizer, prompts)
    out = [None] * len(prompts)
    for batch in g.inference_batches(model, [len(e) for e in encoded], batch_size, f"generate, batch {batch_size}"):
        ids, mask = g.left_pad([encoded[i] for i in batch], config.pad_token_id)
        rows = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
        for i, tokens in zip(batch, rows.tolist()):
            out[i] = g._split_answer(tokens, eos, decoding.max_new_tokens, tokenizer)
    return out


def greedy_config(model, tokenizer, decoding):
    """A complete GenerationConfig, so no model default (a repetition penalty, say) changes what is decoded."""
    from transformers import GenerationConfig

    from tunepipe import generation as g

    return GenerationConfig(max_new_tokens=decoding.max_new_tokens, do_sample=False, num_beams=1,
                            repetition_penalty=1.0, use_cache=True, eos_token_id=g.eos_ids(model, tokenizer),
                            pad_token_id=g.pad_id_for(model, tokenizer))


def measure(spec: dict) -> dict:
    from transformers import set_seed

    from stages.evaluate import generation_limit
    from tunepipe import generation as g
    from tunepipe.modeling import fit_embeddings, load_model, load_tokenizer
    from tunepipe.params import load_params

    ws = Path(spec["workspace"])
    cfg = load_params(spec.get("params") or harness.REPO / "params.yaml").evaluate
    set_seed(0)
    tokenizer = load_tokenizer(ws / "data/tokenized/tokenizer")
    model = load_model(ws / "models/base")
    fit_embeddings(model, tokenizer)
    prompts = load_prompts(ws, spec["prompts"])
    limit = generation_limit(cfg, tokenizer, ws / "data/templated")["max_new_tokens"]
    decoding = dataclasses.replace(g.Decoding.from_params(cfg, limit), do_sample=False)  # greedy: outputs must match
    sides = {
        "naive": lambda: naive_generate(model, tokenizer, prompts, decoding),
        "generate_batched": lambda: batched_generate(model, tokenizer, prompts, decoding, cfg.batch_size),
        "ours": lambda: g.generate(model, tokenizer, prompts, decoding, batch_size=cfg.batch_size),
    }
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    outputs = {}
    for _ in range(spec["repeats"]):
        for name, fn in sides.items():
            start = time.perf_counter()
            gens = fn()
            seconds = time.perf_counter() - start
            tokens = sum(x.n_new_tokens for x in gens)
            runs[name].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
            print(f"[bench] {name}: {tokens} tokens in {seconds:.1f} s", file=sys.stderr, flush=True)
            outputs[name] = [x.text for x in gens]
    mismatches = {side: [i for i, (a, b) in enumerate(zip(outputs["naive"], texts)) if a != b]
                  for side, texts in outputs.items() if side != "naive"}
    return {"runs": runs, "n_prompts": len(prompts), "batch_size": cfg.batch_size,
            "max_new_tokens": limit, "mismatches": mismatches,
            "prompt_tokens": sum(len(x) for x in g.encode_prompts(tokenizer, prompts)),
            "sample": {"prompt_tail": prompts[0][-80:], **{side: texts[0] for side, texts in outputs.items()}}}


def main(prompts: int = 96, repeats: int = 2, ws: Path | None = None) -> dict:
    ws = harness.workspace(ws)
    raw = harness.run_worker("benchmarks.generate", {"workspace": str(ws), "prompts": prompts, "repeats": repeats,
                                                     "variant": "naive+generate_batched+ours"})
    rows = []
    base = harness.median(raw["runs"]["naive"], "tokens_per_s")
    for name, rs in raw["runs"].items():
        tps = harness.median(rs, "tokens_per_s")
        rows.append({"variant": name, "generated_tokens": rs[0]["tokens"], "seconds": round(harness.median(rs, "seconds"), 1),
                     "tokens_per_s": round(tps, 2), "speedup": harness.ratio(tps, base)})
    return {"command": f"python -m benchmarks.generate --prompts {prompts} --repeats {repeats}", "workspace": str(ws),
            "rows": rows, "speedup": rows[-1]["speedup"],
            "identical_outputs": not any(raw["mismatches"].values()),
            **{k: raw[k] for k in ("n_prompts", "batch_size", "max_new_tokens", "mismatches", "prompt_tokens",
                                   "peak_rss_mib", "sample")}}


def report(result: dict) -> str:
    return (f"generation: {result['n_prompts']} prompts ({result['prompt_tokens']} prompt tokens), greedy, "
            f"max_new_tokens {result['max_new_tokens']}, batch {result['batch_size']}\n"
            + harness.table(result["rows"], ["variant", "generated_tokens", "seconds", "tokens_per_s", "speedup"])
            + f"\nidentical greedy outputs: {result['identical_outputs']} (mismatched prompts: {result['mismatches']})")


if __name__ == "__main__":
    if not harness.worker_main(sys.argv, measure):
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--prompts", type=int, default=96)
        p.add_argument("--repeats", type=int, default=2)
        a = p.parse_args()
        res = main(a.prompts, a.repeats)
        harness.save_results("generate", res)
        print(report(res))
