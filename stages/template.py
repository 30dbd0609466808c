"""template: render canonical records into prompt / answer text (data/raw -> data/templated).

    python -m stages.template [--params params.yaml]

Reads data/raw/{sft,pref}_{train,val,test}.jsonl and the base model's tokenizer in data/raw/tokenizer,
and writes data/templated/ with the same file names: SFT rows
{"id", "prompt", "completion", "meta"} and preference rows {"id", "prompt",
"chosen", "rejected", "meta"} (unpaired data, fetch.preference.format: unpaired:
{"id", "prompt", "completion", "label", "meta"}). The prompt is the exact text the model sees up to
its answer; answers carry no EOS (tokenize appends it). The files are readable
jsonl so a person can inspect what the model will see. When template.chat_template
replaces the tokenizer's template, it is written as data/templated/chat_template.jinja
and tokenize saves it with the tokenizer every later stage loads.

Params: template.kind (alpaca | chat), template.system_prompt, template.chat_template;
shared.trust_remote_code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunepipe.artifacts import DataError, atomic_path, read_jsonl, write_jsonl
from tunepipe.cli import StageError, run_stage
from tunepipe.params import Params

log = logging.getLogger("tunepipe.template")

RAW = Path("data/raw")
TOKENIZER = Path("data/raw/tokenizer")  # the base model's, saved by fetch
OUT = Path("data/templated")
SPLITS = ("train", "val", "test")
KINDS = ("sft", "pref")


def read_records(path: Path, kind: str) -> list[dict]:
    from tunepipe.templates import check_pref_record, check_record

    if not path.exists():
        raise StageError(f"{path} is missing; run the fetch stage first (dvc repro fetch)")
    records = read_jsonl(path)
    if not records and kind == "sft":  # empty preference files: fetch.preference.source none
        raise DataError(f"{path}: no records")
    for n, record in enumerate(records, 1):
        if kind == "sft":
            check_record(record, ("output",), f"{path}: record {n}")
        else:  # a pair, or an unpaired row (one answer and its label)
            check_pref_record(record, f"{path}: record {n}")
    return records


def render_file(records: list[dict], kind: str, render, src: Path) -> list[dict]:
    from tqdm import tqdm

    from tunepipe.templates import template_pref, template_sft

    build = template_sft if kind == "sft" else template_pref
    rows = []
    for n, record in enumerate(tqdm(records, desc=f"template {src.name}", unit="rec"), 1):
        try:
            rows.append(build(record, render))
        except DataError as exc:
            raise DataError(f"{src}: record {n}: {exc}") from None
    return rows


def warn_on_roundtrip(rows: list[dict], records: list[dict], tokenizer, cfg, template) -> None:
    """Log when the chat template would render a finished conversation unlike prompt + answer + EOS."""
    from tunepipe.templates import chat_roundtrip_problem

    for row, record in zip(rows, records):
        answer = row.get("completion", row.get("chosen"))
        problem = chat_roundtrip_problem(record, row["prompt"], answer, tokenizer, cfg.system_prompt, template)
        if problem:
            log.warning("record %s: %s; training uses prompt + answer + EOS anyway", row["id"], problem)
            return


def main(params: Params) -> None:
    cfg = params.template

    # ---------------------------------------------------------------- data
    from tunepipe.templates import preference_kind

    inputs = {(kind, split): read_records(RAW / f"{kind}_{split}.jsonl", kind) for kind in KINDS for split in SPLITS}
    # every preference file holds pairs, or every one unpaired rows: train-dpo trains on one kind
    preference_kind([r for (kind, _), records in inputs.items() if kind == "pref" for r in records],
                    f"{RAW}/pref_*.jsonl")

    # ---------------------------------------------------------------- tokenizer
    from transformers import AutoTokenizer

    from tunepipe.templates import make_renderer, resolve_chat_template

    if not TOKENIZER.is_dir():
        raise StageError(f"{TOKENIZER} is missing; run the fetch stage first (dvc repro fetch)")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER, trust_remote_code=params.shared.trust_remote_code)
    render = make_renderer(cfg.kind, tokenizer, cfg.system_prompt, cfg.chat_template)
    template = resolve_chat_template(tokenizer, cfg.chat_template) if cfg.kind == "chat" else None

    # ---------------------------------------------------------------- render and save
    with atomic_path(OUT, is_dir=True) as tmp:
        for (kind, split), records in inputs.items():
            src = RAW / f"{kind}_{split}.jsonl"
            rows = render_file(records, kind, render, src)
            if cfg.kind == "chat" and split == "train":
                warn_on_roundtrip(rows, records, tokenizer, cfg, template)
            write_jsonl(tmp / src.name, rows)
            log.info("%s: %d records", OUT / src.name, len(rows))
        if template is not None:
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")


if __name__ == "__main__":
    run_stage(__doc__, main)
