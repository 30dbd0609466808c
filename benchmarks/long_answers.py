"""The long-answer workload: the default prompts with answers of 100-400 tokens, for train-sft and train-dpo.

    python -m benchmarks.long_answers [--steps 4] [--repeats 1] [--examples 32]   # sft and dpo vs plain TRL
    python -m benchmarks.long_answers --no-dpo --lever ours-bernoulli_dropout     # sft only, and one lever off
    python -m benchmarks.long_answers --no-sft --dpo-lever ours-trl_log_probs     # dpo only, and one lever off

The default workload's answers are 3.8 tokens in a 59.5-token example (6.4% of tokens carry
loss), so its headline ratio leans on "LM head only at labelled positions", a lever real
instruction data (answers of 100-400 tokens) barely has. This workload keeps the default
prompts, model and params and gives each prompt a worked answer: the task restated, a
chain of explanatory sentences built from the prompt's own words and numbers, and the
checked answer, until a length drawn uniformly from 100-400 tokens (seeded). The text is
made, not sampled from a model: what matters for speed is the lengths, and the loss still
falls (the sentences follow learnable patterns). Preference pairs: chosen is that answer,
rejected the same explanation ending in a wrong answer.

The workload folder (scratch, built once) links models/base and the tokenizer of the default
workload; results go to the "long-answers" entry of benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from benchmarks import harness

WORKLOAD = "long-answers"
ANSWER_TOKENS = (100, 400)
N_EXAMPLES = 96
SENTENCES = [
    "Let us read the question again: {q}",
    "The important part of the request is to answer exactly what is asked, nothing more.",
    "First, we write down what we know from the question before we do anything with it.",
    "The numbers that appear in the question are {nums}, and each of them matters.",
    "The words that matter most here are {words}.",
    "Next, we decide which operation or rule the question asks us to apply.",
    "We apply it carefully, one step at a time, and check each intermediate result.",
    "A quick way to check the work is to redo the last step in the opposite direction.",
    "If the two directions agree, the result is consistent with the question.",
    "We also make sure the answer has the form the question asks for.",
    "Extra words or explanations in the final line would break the requested format.",
    "So the result of this step is {a}, which we keep for the final answer.",
    "Nothing in the question changes this conclusion, so we can state it now.",
]


def build(default_ws: Path) -> Path:
    """The long-answer workspace (built once under the benchmark scratch folder)."""
    out = harness.SCRATCH / WORKLOAD
    if (out / "data/tokenized/info.json").is_file():
        return out
    from datasets import Dataset, DatasetDict

    from tunepipe.artifacts import read_jsonl
    from tunepipe.modeling import load_tokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "models").mkdir(parents=True)
    (tmp / "data/tokenized").mkdir(parents=True)
    (tmp / "models/base").symlink_to((default_ws / "models/base").resolve())
    (tmp / "data/tokenized/tokenizer").symlink_to((default_ws / "data/tokenized/tokenizer").resolve())
    shutil.copy(default_ws / "data/tokenized/info.json", tmp / "data/tokenized/info.json")
    shutil.copy(default_ws / "params.yaml", tmp / "params.yaml")
    tok = load_tokenizer(default_ws / "data/tokenized/tokenizer")
    rng = random.Random(0)
    sft, pref = [], []
    for record in list(read_jsonl(default_ws / "data/templated/sft_train.jsonl"))[:N_EXAMPLES]:
        body, answer = explanation(record, rng.randint(*ANSWER_TOKENS), tok, rng)
        prompt = tok(record["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(f"{body} The answer is: {answer}{tok.eos_token}", add_special_tokens=False)["input_ids"]
        sft.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion,
                    "length": len(prompt) + len(completion)})
        pref.append({"prompt": record["prompt"], "chosen": f"{body} The answer is: {answer}",
                     "rejected": f"{body} The answer is: {wrong(answer, rng)}"})
    DatasetDict(train=Dataset.from_list(sft)).save_to_disk(str(tmp / "data/tokenized/sft"))
    DatasetDict(train=Dataset.from_list(pref)).save_to_disk(str(tmp / "data/tokenized/pref"))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def explanation(record: dict, target_tokens: int, tok, rng: random.Random) -> tuple[str, str]:
    """Sentences about the record's question until about ``target_tokens`` tokens, and its answer."""
    import re

    q = record["instruction"]
    answer = str(record["completion"])
    fill = {"q": q, "a": answer, "nums": ", ".join(re.findall(r"\d+", q)) or "none",
            "words": ", ".join(sorted(set(re.findall(r"[A-Za-z]{5,}", q)), key=len)[-4:]) or "none"}
    sentences = []
    while len(tok(" ".join(sentences), add_special_tokens=False)["input_ids"]) < target_tokens - 8:
        sentences.append(rng.choice(SENTENCES).format(**fill))
    return " ".join(sentences), answer


def wrong(answer: str, rng: random.Random) -> str:
    return str(int(answer) + rng.choice([-3, -1, 1, 2, 10])) if answer.lstrip("-").isdigit() else answer[::-1] + "?"


def stats(ws: Path) -> dict:
    from datasets import load_from_disk

    train = load_from_disk(str(ws / "data/tokenized/sft"))["train"]
    lengths = [len(r) for r in train["input_ids"]]
    labelled = [sum(1 for v in r if v != -100) for r in train["labels"]]
    return {"examples": len(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "mean_answer_tokens": round(sum(labelled) / len(labelled), 1),
            "labelled_share": round(sum(labelled) / sum(lengths), 3)}


def main(steps: int = 4, repeats: int = 1, examples: int = 32, ws: Path | None = None, peak: dict | None = None,
         dpo: bool = True, sft_levers: list[str] | None = None, sft: bool = True,
         dpo_levers: list[str] | None = None) -> dict:
    from benchmarks import dpo as dpo_mod
    from benchmarks import sft as sft_mod

    long_ws = build(harness.workspace(ws))
    result = {"workload": stats(long_ws)}
    if sft:
        result["sft"] = sft_mod.main(steps=steps, repeats=repeats, examples=examples, ws=long_ws, peak=peak,
                                     levers=sft_levers or [])
    if dpo:
        result["dpo"] = dpo_mod.main(steps=steps, repeats=repeats, ws=long_ws, overrides={"max_length": 640},
                                     levers=dpo_levers or [])
    return result


def report(result: dict) -> str:
    from benchmarks import dpo as dpo_mod
    from benchmarks import sft as sft_mod

    w = result["workload"]
    parts = [f"long-answer workload: {w['examples']} examples, {w['mean_tokens']} tokens on average, "
             f"{w['mean_answer_tokens']} answer tokens ({100 * w['labelled_share']:.0f}% carry loss)"]
    parts += [mod.report(result[name]) for name, mod in (("sft", sft_mod), ("dpo", dpo_mod)) if name in result]
    return "\n\n".join(parts)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--no-dpo", action="store_true")
    p.add_argument("--no-sft", action="store_true")
    p.add_argument("--lever", action="append", default=[], help="an SFT variant of benchmarks.sft (repeatable)")
    p.add_argument("--dpo-lever", action="append", default=[], help="a variant of benchmarks.dpo (repeatable)")
    a = p.parse_args()
    res = main(a.steps, a.repeats, a.examples, dpo=not a.no_dpo, sft_levers=a.lever, sft=not a.no_sft,
               dpo_levers=a.dpo_lever)
    for name in ("sft", "dpo"):
        if name in res:
            harness.save_results(name, dict(res[name], workload_stats=res["workload"]), workload=WORKLOAD)
    print(report(res))
