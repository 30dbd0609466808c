"""tokenize: templated text -> training tokens with exact loss masks (data/templated -> data/tokenized).

    python -m stages.tokenize [--params params.yaml]

Writes data/tokenized/ (one folder, replaced atomically):
  sft/        DatasetDict train/validation: input_ids (prompt + answer + EOS once),
              labels (-100 on the prompt unless tokenize.train_on_prompt), length
  pref/       DatasetDict train/validation: prompt, chosen, rejected strings (TRL
              tokenizes them and appends the EOS); pairs over max_length dropped. From
              unpaired data (fetch.preference.format: unpaired): prompt, completion, label
              (bool) instead. Absent when there is no preference data (fetch.preference.source: none)
  tokenizer/  the tokenizer every later stage loads: pad != EOS, padding_side right
  info.json   pad / EOS / BOS ids, whether a pad was added, generation padding side,
              preference_kind (paired | unpaired | null when there is none), preference_pairs
and metrics/tokenize.json (kept / truncated / dropped counts and token-length
min, mean, p95, max per split). The test split is not tokenized: evaluate reads
data/templated/*_test.jsonl. See tunepipe/tokenization.py for the exact rules.

Params: tokenize.max_length, tokenize.overlong (drop | truncate),
tokenize.train_on_prompt, tokenize.num_proc; shared.trust_remote_code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunepipe.artifacts import DataError, atomic_path, read_jsonl, sha256_json, write_json
from tunepipe.cli import StageError, run_stage
from tunepipe.params import Params

log = logging.getLogger("tunepipe.tokenize")

TEMPLATED = Path("data/templated")
TOKENIZER = Path("data/raw/tokenizer")  # the base model's, saved by fetch
OUT = Path("data/tokenized")
METRICS = Path("metrics/tokenize.json")
SPLITS = {"train": "train", "val": "validation"}  # file split -> DatasetDict split
COLUMNS = {"sft": ("prompt", "completion"), "pref": ("prompt", "chosen", "rejected")}
UNPAIRED_COLUMNS = ("prompt", "completion", "label")  # pref rows of unpaired (thumbs up/down) data


def read_templated(kind: str, split: str) -> tuple[Path, list[dict]]:
    from tunepipe.templates import is_unpaired

    path = TEMPLATED / f"{kind}_{split}.jsonl"
    if not path.exists():
        raise StageError(f"{path} is missing; run the template stage first (dvc repro template)")
    rows = read_jsonl(path)
    columns = UNPAIRED_COLUMNS if kind == "pref" and rows and is_unpaired(rows[0]) else COLUMNS[kind]
    for n, row in enumerate(rows, 1):
        for key in columns:
            expected, name = (bool, "true or false") if key == "label" else (str, "a string")
            if not isinstance(row.get(key), expected):
                raise DataError(f"{path}: record {n} (id {row.get('id')!r}): field '{key}' must be {name}")
    return path, [{key: row[key] for key in columns} for row in rows]


def run_map(ds, fn, fn_kwargs: dict, num_proc: int, desc: str, remove_columns: list[str]):
    # An explicit fingerprint keeps the saved state.json identical across reruns.
    settings = {k: v for k, v in fn_kwargs.items() if k != "tokenizer"}
    fingerprint = sha256_json([desc, ds._fingerprint, settings])[:32]
    return ds.map(fn, batched=True, fn_kwargs=fn_kwargs, num_proc=num_proc if num_proc > 1 else None,
                  remove_columns=remove_columns, desc=desc, new_fingerprint=fingerprint)


def keep_rows(ds, path: Path, cfg, truncatable: bool):
    """Rows that survived; an empty split stops the run and says why."""
    from tunepipe.tokenization import KEEP, PROMPT_TOO_LONG

    statuses = list(ds["status"])
    keep = [i for i, status in enumerate(statuses) if status in KEEP]
    if not keep:
        hint = " or set tokenize.overlong: truncate" if truncatable and cfg.overlong == "drop" else ""
        raise StageError(
            f"{path}: all {len(statuses)} examples were dropped as longer than tokenize.max_length="
            f"{cfg.max_length} tokens ({statuses.count(PROMPT_TOO_LONG)} of them by the prompt alone); "
            f"raise tokenize.max_length{hint}")
    return ds.select(keep).flatten_indices(new_fingerprint=sha256_json([ds._fingerprint, keep])[:32])


def tokenize_sft(path: Path, rows: list[dict], tokenizer, bos: bool, cfg):
    from datasets import Dataset

    from tunepipe.tokenization import encode_sft_batch, split_stats

    ds = Dataset.from_list(rows)
    kwargs = dict(tokenizer=tokenizer, bos=bos, max_length=cfg.max_length, overlong=cfg.overlong,
                  train_on_prompt=cfg.train_on_prompt)
    ds = run_map(ds, encode_sft_batch, kwargs, cfg.num_proc, f"tokenize {path.name}", ["prompt", "completion"])
    stats = split_stats(list(ds["status"]), list(ds["raw_length"]), list(ds["length"]))
    return keep_rows(ds, path, cfg, truncatable=True).remove_columns(["raw_length", "status"]), stats


def measure_pref(path: Path, rows: list[dict], tokenizer, bos: bool, cfg):
    from datasets import Dataset

    from tunepipe.tokenization import KEEP, length_stats, measure_pref_batch, split_stats

    ds = Dataset.from_list(rows)
    kwargs = dict(tokenizer=tokenizer, bos=bos, max_length=cfg.max_length)
    ds = run_map(ds, measure_pref_batch, kwargs, cfg.num_proc, f"measure {path.name}", ["prompt"])
    status, raw = list(ds["status"]), list(ds["raw_length"])
    stats = split_stats(status, raw, raw)
    for key in ("truncated", "dropped_prompt_too_long"):  # pairs are never truncated here
        stats.pop(key)
    stats["prompt_length"] = length_stats([n for n, s in zip(ds["prompt_length"], status) if s in KEEP])
    kept = keep_rows(ds, path, cfg, truncatable=False)  # TRL gets whole pairs: never truncated here
    if "label" in kept.column_names:  # unpaired: how many good and bad answers KTO gets
        stats["desirable"] = sum(kept["label"])
        stats["undesirable"] = len(kept) - stats["desirable"]
    return kept.remove_columns(["prompt_length", "raw_length", "status"]), stats


def main(params: Params) -> None:
    cfg = params.tokenize

    # ---------------------------------------------------------------- data
    from tunepipe.templates import preference_kind

    inputs = {(kind, split): read_templated(kind, split) for kind in COLUMNS for split in SPLITS}
    pref_kind = preference_kind([row for (kind, _), (_, rows) in inputs.items() if kind == "pref" for row in rows],
                                f"{TEMPLATED}/pref_*.jsonl")
    if pref_kind is None:
        # fetch.preference.source: none. No pref/ folder: train-dpo sees there is nothing to train on.
        log.info("no preference data: data/tokenized/pref is not written, train-dpo will be skipped")
        inputs = {key: value for key, value in inputs.items() if key[0] != "pref"}
    for path, rows in inputs.values():
        if not rows:
            raise DataError(f"{path}: no records")

    # ---------------------------------------------------------------- tokenizer
    from transformers import AutoTokenizer

    from tunepipe.tokenization import adds_bos, choose_pad, generation_eos_ids

    if not TOKENIZER.is_dir():
        raise StageError(f"{TOKENIZER} is missing; run the fetch stage first (dvc repro fetch)")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER, trust_remote_code=params.shared.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise StageError(f"the tokenizer in {TOKENIZER} has no EOS token; the model could never learn to stop")
    pad = choose_pad(tokenizer, generation_eos_ids(TOKENIZER))
    tokenizer.padding_side = "right"
    bos = adds_bos(tokenizer)
    chat_template = TEMPLATED / "chat_template.jinja"
    if chat_template.exists():  # template.chat_template replaced the tokenizer's own
        tokenizer.chat_template = chat_template.read_text(encoding="utf-8")
    log.info("pad %r (id %d, %s), eos %r (id %d), prompt BOS added: %s", pad["pad_token"], pad["pad_token_id"],
             pad["pad_source"], tokenizer.eos_token, tokenizer.eos_token_id, bos)

    # ---------------------------------------------------------------- tokenize
    from datasets import DatasetDict

    build = {"sft": tokenize_sft, "pref": measure_pref}
    datasets, metrics = {"sft": {}, "pref": {}}, {"sft": {}, "pref": {}}
    for (kind, split), (path, rows) in inputs.items():
        ds, stats = build[kind](path, rows, tokenizer, bos, cfg)
        datasets[kind][SPLITS[split]], metrics[kind][SPLITS[split]] = ds, stats
        log.info("%s: kept %d of %d (%d truncated), length p95 %s max %s", path, stats["kept"],
                 stats["examples"], stats.get("truncated", 0), stats["length"]["p95"], stats["length"]["max"])

    # ---------------------------------------------------------------- save
    info = {**pad, "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id, "prompt_bos_added": bos, "vocab_size": len(tokenizer),
            "padding_side": "right", "generation_padding_side": "left", "max_length": cfg.max_length,
            "overlong": cfg.overlong, "train_on_prompt": cfg.train_on_prompt, "truncated_answers_end_with_eos": False,
            "preference_kind": pref_kind, "preference_pairs": pref_kind == "paired"}
    with atomic_path(OUT, is_dir=True) as tmp:
        for kind in datasets:
            if datasets[kind]:
                DatasetDict(datasets[kind]).save_to_disk(str(tmp / kind))
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_json(tmp / "info.json", info)
    write_json(METRICS, {**metrics, "pad_token_id": pad["pad_token_id"], "eos_token_id": tokenizer.eos_token_id,
                         "added_pad": pad["added_pad"]})


if __name__ == "__main__":
    run_stage(__doc__, main)
