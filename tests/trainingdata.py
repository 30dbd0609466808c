"""Small stand-ins for the tokenize stage's outputs, for the training and merge tests.

``make_workdir(root, tiny_model_dir, tokenizer)`` lays out what train-sft,
train-dpo and merge read (data/tokenized/{sft,pref,tokenizer,info.json},
data/raw/manifest.json, models/base) under ``root``, using the real SmolLM2
tokenizer and chat template, so the stages run on it unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

QUESTIONS = [
    ("What is 2 + 3?", "5"), ("Reverse the word 'cat'.", "tac"), ("Sort 3, 1, 2.", "1, 2, 3"),
    ("How many cm in 2 m?", "200"), ("Uppercase 'hi'.", "HI"), ("What is 7 - 4?", "3"),
    ("Count the letters in 'dog'.", "3"), ("What is 6 * 2?", "12"), ("Repeat 'ok' twice.", "ok ok"),
    ("Largest of 4, 9, 1?", "9"), ("How many g in 3 kg?", "3000"), ("Lowercase 'YES'.", "yes"),
]


def prompt_text(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def sft_rows(tokenizer, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)]
        prompt = tokenizer(prompt_text(tokenizer, q), add_special_tokens=False)["input_ids"]
        answer = tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
                     "length": len(prompt) + len(answer)})
    return rows


def pref_rows(tokenizer, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)]
        rows.append({"prompt": prompt_text(tokenizer, q), "chosen": a, "rejected": f"I think {a} {a} {a} maybe"})
    return rows


def make_workdir(root: Path, tiny_model_dir: Path, tokenizer, n_sft: int = 16, n_pref: int = 8) -> Path:
    from datasets import Dataset, DatasetDict

    root = Path(root)
    tok_dir = root / "data/tokenized"
    DatasetDict({"train": Dataset.from_list(sft_rows(tokenizer, n_sft)),
                 "validation": Dataset.from_list(sft_rows(tokenizer, 4))}).save_to_disk(str(tok_dir / "sft"))
    DatasetDict({"train": Dataset.from_list(pref_rows(tokenizer, n_pref)),
                 "validation": Dataset.from_list(pref_rows(tokenizer, 4))}).save_to_disk(str(tok_dir / "pref"))
    tok = tokenizer.__class__.from_pretrained(tiny_model_dir)
    tok.pad_token = "<|endoftext|>"  # as the tokenize stage does: a pad that is not the EOS
    tok.padding_side = "right"
    tok.save_pretrained(tok_dir / "tokenizer")
    (tok_dir / "info.json").write_text(json.dumps({"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                                                   "added_pad": False, "generation_padding_side": "left"}))
    shutil.copytree(tiny_model_dir, root / "models/base")
    write_templated(root, tokenizer, n_sft)
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/manifest.json").write_text(json.dumps(
        {"sources": {"sft": {"source": "generated"}, "preference": {"source": "generated"}},
         "files": {"sft_train.jsonl": {"rows": n_sft, "sha256": "ab" * 32}}}))
    return root


def templated_rows(tokenizer, split: str, n: int) -> list[dict]:
    """Templated SFT rows as the template stage writes them, of generated (checkable) tasks."""
    from tunepipe.tasks import generate_sft

    rows = []
    for record in generate_sft(split, n, seed=0):
        question = f"{record['instruction']}\n{record['input']}".strip()
        rows.append({"id": record["id"], "prompt": prompt_text(tokenizer, question), "completion": record["output"],
                     "meta": record["meta"], "instruction": question})
    return rows


def write_templated(root: Path, tokenizer, n_train: int, n_val: int = 8) -> None:
    """data/templated/sft_{train,val}.jsonl: the alignment stage's prompts and held-out checks."""
    folder = Path(root) / "data/templated"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        with open(folder / f"sft_{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in templated_rows(tokenizer, split, n))


def tiny_params(**sections):
    """Params for fast tests: a few steps of batch 4, checkpoints every 2 steps."""
    from tunepipe.params import Params

    train = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, max_steps=4, batch_size=4, learning_rate=5e-3,
                 warmup_ratio=0.0, logging_steps=1, eval_steps=2, save_steps=2, save_total_limit=2,
                 precision="fp32")
    raw = {"train_sft": dict(train), "train_dpo": dict(train, learning_rate=5e-3, max_length=128, max_prompt_length=96),
           "merge": {"check_prompts": 2}, "evaluate": {"dtype": "float32"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Params.model_validate(raw)


def unpaired_pref_rows(tokenizer, n_good: int, n_bad: int) -> list[dict]:
    """Tokenize-stage rows of unpaired (thumbs up/down) preference data: prompt, completion, label."""
    rows = []
    for i in range(n_good + n_bad):
        q, a = QUESTIONS[i % len(QUESTIONS)]
        good = i < n_good
        rows.append({"prompt": prompt_text(tokenizer, q), "completion": a if good else f"I think {a} {a} maybe",
                     "label": good})
    return rows


def write_unpaired_pref(root: Path, tokenizer, n_good: int, n_bad: int) -> None:
    """Replace data/tokenized/pref with unpaired rows, as tokenize writes them from fetch.preference.format unpaired."""
    from datasets import Dataset, DatasetDict

    tok_dir = Path(root) / "data/tokenized"
    shutil.rmtree(tok_dir / "pref")
    DatasetDict({"train": Dataset.from_list(unpaired_pref_rows(tokenizer, n_good, n_bad)),
                 "validation": Dataset.from_list(unpaired_pref_rows(tokenizer, 2, 2))}).save_to_disk(str(tok_dir / "pref"))
    info = json.loads((tok_dir / "info.json").read_text())
    (tok_dir / "info.json").write_text(json.dumps({**info, "preference_kind": "unpaired", "preference_pairs": False}))


def unpaired_source(path, **settings):
    """A local fetch source of format unpaired (thumbs up/down rows), built without validation until
    tunepipe.params.DataFormat lists "unpaired"."""
    from tunepipe.params import DataSource

    return DataSource.model_construct(**{**DataSource().model_dump(), "source": "local", "path": str(path),
                                         "format": "unpaired", **settings})
