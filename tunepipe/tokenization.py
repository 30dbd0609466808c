"""Turning templated text into training tokens with an exact loss mask.

The prompt and the answer are tokenized separately and concatenated, so the
boundary between masked (prompt) and trained (answer) tokens is exact:

* the prompt is tokenized without special tokens; a BOS is prepended only when
  the tokenizer adds one by default and the prompt does not already start with
  it (a chat template writes its own BOS as text; an Alpaca prompt has none),
  so there is never a second BOS. ``encode_prompt`` is the same rule for generation.
* the answer gets the EOS exactly once at its end, even if its text already ended with it.
* an over-long example (``tokenize.overlong``) is dropped, or truncated by
  cutting the answer's end. A truncated answer gets NO EOS: the answer did not
  end there, and teaching the model to stop mid-answer would be wrong (TRL's
  own truncation also cuts the EOS). An over-long example whose prompt alone
  fills max_length (no answer token left to train on) is always dropped, and
  counted as ``dropped_prompt_too_long``.

The pad token is never the EOS (``choose_pad``): padding masked as EOS would
teach the model that EOS is never a target, so it would not learn to stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from tunepipe.artifacts import read_json

KEPT, TRUNCATED, OVERLONG, PROMPT_TOO_LONG = "kept", "truncated", "overlong", "prompt_too_long"
KEEP = (KEPT, TRUNCATED)
IGNORE_INDEX = -100  # the label torch's cross-entropy skips

# Existing tokens that are safe to pad with when the tokenizer's pad is the EOS.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>", "<|end_of_text|>")
ADDED_PAD = "<|pad|>"


# --------------------------------------------------------------------------- special tokens


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of text by default (Llama, Gemma: yes; SmolLM2, Qwen: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return with_special[:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def encode_prompts(tokenizer: Any, texts: list[str], bos: bool) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if not bos:
        return ids
    bos_id = tokenizer.bos_token_id
    return [row if row[:1] == [bos_id] else [bos_id] + row for row in ids]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt ids exactly as training saw them (for generation): never a second BOS."""
    return encode_prompts(tokenizer, [text], adds_bos(tokenizer))[0]


def strip_eos_text(text: str, eos_token: Optional[str]) -> str:
    while eos_token and text.endswith(eos_token):
        text = text[: -len(eos_token)]
    return text


def encode_answers(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Answer ids without any EOS (the caller appends exactly one)."""
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    ids = tokenizer([strip_eos_text(t, eos) for t in texts], add_special_tokens=False)["input_ids"]
    for row in ids:
        while row and row[-1] == eos_id:
            row.pop()
    return ids


def generation_eos_ids(model_dir: Path) -> set[int]:
    """EOS ids in the model's generation_config.json (Llama 3 stops on several)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return set()
    eos = read_json(path).get("eos_token_id")
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def choose_pad(tokenizer: Any, extra_eos_ids: Iterable[int] = ()) -> dict:
    """Set a pad token that is not an EOS; return what was chosen and why.

    Order: the tokenizer's own pad if it is not an EOS; else an existing special
    token the model never has to produce (unk, <|endoftext|>, ...); else a new
    ``<|pad|>`` (``added_pad``: training must resize the embeddings).
    """
    stops = {tokenizer.eos_token_id, *extra_eos_ids} - {None}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stops:
        return {"pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
                "added_pad": False, "pad_source": "tokenizer"}
    for token in (tokenizer.unk_token, *PAD_CANDIDATES):
        if token is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(token)
        unknown = tid is None or (token != tokenizer.unk_token and tid == tokenizer.unk_token_id)
        if unknown or tid in stops or tid == tokenizer.bos_token_id:
            continue
        tokenizer.pad_token = token
        return {"pad_token": token, "pad_token_id": tid, "added_pad": False, "pad_source": "existing token"}
    tokenizer.add_special_tokens({"pad_token": ADDED_PAD})
    return {"pad_token": ADDED_PAD, "pad_token_id": tokenizer.pad_token_id, "added_pad": True,
            "pad_source": "added"}


# --------------------------------------------------------------------------- SFT examples


def fit_example(prompt: list[int], answer: list[int], eos_id: int, max_length: int, overlong: str,
                train_on_prompt: bool) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, status) for one example; dropped examples come back empty."""
    ids, status = prompt + answer + [eos_id], KEPT
    if len(ids) > max_length:
        if len(prompt) >= max_length:  # not a single answer token would be trained on
            return [], [], PROMPT_TOO_LONG
        if overlong == "drop":
            return [], [], OVERLONG
        ids, status = (prompt + answer)[:max_length], TRUNCATED
    prompt_labels = prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)
    return ids, prompt_labels + ids[len(prompt):], status


def encode_sft_batch(batch: dict, tokenizer: Any, bos: bool, max_length: int, overlong: str,
                     train_on_prompt: bool) -> dict:
    """datasets.map(batched=True) function: prompt/completion text -> input_ids, labels, length."""
    prompts = encode_prompts(tokenizer, batch["prompt"], bos)
    answers = encode_answers(tokenizer, batch["completion"])
    out = {"input_ids": [], "labels": [], "length": [], "raw_length": [], "status": []}
    for prompt, answer in zip(prompts, answers):
        ids, labels, status = fit_example(prompt, answer, tokenizer.eos_token_id, max_length, overlong,
                                          train_on_prompt)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["raw_length"].append(len(prompt) + len(answer) + 1)
        out["status"].append(status)
    return out


# --------------------------------------------------------------------------- preference pairs


def pref_prompt_text(prompt: str, tokenizer: Any, bos: bool) -> str:
    """The prompt string for TRL, which tokenizes it WITH the tokenizer's special tokens.

    A chat-rendered prompt on a BOS-adding tokenizer already starts with the BOS as
    text; removing it here leaves exactly one BOS after TRL tokenizes.
    """
    bos_text = tokenizer.bos_token
    return prompt[len(bos_text):] if bos and bos_text and prompt.startswith(bos_text) else prompt


ANSWER_COLUMNS = ("chosen", "rejected", "completion")  # a pair's two answers, or an unpaired row's one


def measure_pref_batch(batch: dict, tokenizer: Any, bos: bool, max_length: int) -> dict:
    """datasets.map(batched=True) function: token counts of each pair (or unpaired row); drop a pair
    whose longer side overflows."""
    prompts = encode_prompts(tokenizer, batch["prompt"], bos)
    answers = [encode_answers(tokenizer, batch[key]) for key in ANSWER_COLUMNS if key in batch]
    out = {"prompt": [pref_prompt_text(p, tokenizer, bos) for p in batch["prompt"]],
           "prompt_length": [], "raw_length": [], "status": []}
    for p, *sides in zip(prompts, *answers):
        length = len(p) + max(map(len, sides)) + 1
        out["prompt_length"].append(len(p))
        out["raw_length"].append(length)
        out["status"].append(KEPT if length <= max_length else OVERLONG)
    return out


# --------------------------------------------------------------------------- statistics


def length_stats(lengths: list[int]) -> dict:
    """min / mean / p95 (linear interpolation, as numpy) / max of token counts; zeros when empty."""
    import numpy as np

    if not lengths:
        return {"min": 0, "mean": 0.0, "p95": 0.0, "max": 0}
    arr = np.asarray(lengths)
    return {"min": int(arr.min()), "mean": round(float(arr.mean()), 2),
            "p95": round(float(np.percentile(arr, 95)), 2), "max": int(arr.max())}


def split_stats(statuses: list[str], raw_lengths: list[int], lengths: list[int]) -> dict:
    """Counts per outcome, token lengths before filtering (raw) and of the rows kept."""
    kept = [n for n, s in zip(lengths, statuses) if s in KEEP]
    return {"examples": len(statuses), "kept": len(kept), "truncated": statuses.count(TRUNCATED),
            "dropped": len(statuses) - len(kept), "dropped_prompt_too_long": statuses.count(PROMPT_TOO_LONG),
            "raw_length": length_stats(raw_lengths), "length": length_stats(kept)}
