"""The template stage: Alpaca and chat rendering, record checks, and the stage's outputs."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from tunepipe.artifacts import DataError, read_jsonl
from tunepipe.cli import StageError
from tunepipe.params import Params
from tunepipe.templates import (
    CHATML, chat_roundtrip_problem, check_record, make_renderer, render_alpaca, template_pref, template_sft,
)

SMOL_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def record(**overrides) -> dict:
    base = {"id": "r1", "instruction": "Add 2 and 3.", "input": "", "output": "5", "system": None,
            "history": [], "meta": {"family": "arithmetic", "check": {"type": "exact", "answer": "5"}}}
    return {**base, **overrides}


def pref_record(**overrides) -> dict:
    rec = record(**overrides)
    rec.pop("output")
    return {**rec, "chosen": "5", "rejected": "6", "meta": {"rejected_kind": "wrong_answer"}}


HISTORY = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]


# --------------------------------------------------------------------------- alpaca


def test_alpaca_without_input():
    assert render_alpaca(record()) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")


def test_alpaca_with_input():
    assert render_alpaca(record(instruction="Sum the numbers.", input="2, 3")) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSum the numbers.\n\n### Input:\n2, 3\n\n### Response:\n")


def test_alpaca_system_replaces_preamble_and_history_comes_first():
    text = render_alpaca(record(system="Answer tersely.", history=HISTORY))
    assert text == ("Answer tersely.\n\n### Instruction:\nHi.\n\n### Response:\nHello!\n\n"
                    "### Instruction:\nAdd 2 and 3.\n\n### Response:\n")


def test_alpaca_params_system_prompt_wins_over_records():
    text = render_alpaca(record(system="from record"), system_prompt="from params")
    assert text.startswith("from params\n\n### Instruction:") and "from record" not in text


# --------------------------------------------------------------------------- chat


def test_chat_uses_template_default_system(smol_tokenizer):
    render = make_renderer("chat", smol_tokenizer)
    assert render(record()) == (SMOL_DEFAULT_SYSTEM + "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
                                "<|im_start|>assistant\n")


def test_chat_with_input_history_and_record_system(smol_tokenizer):
    render = make_renderer("chat", smol_tokenizer)
    text = render(record(input="ctx", system="Be brief.", history=HISTORY))
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nAdd 2 and 3.\n\nctx<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_chat_params_system_prompt_wins(smol_tokenizer):
    text = make_renderer("chat", smol_tokenizer, system_prompt="P")(record(system="R"))
    assert text.startswith("<|im_start|>system\nP<|im_end|>\n") and "\nR<|im_end|>" not in text


def test_chat_without_template_is_a_clear_error(smol_tokenizer):
    bare = copy.deepcopy(smol_tokenizer)
    bare.chat_template = None
    with pytest.raises(StageError, match="template.kind"):
        make_renderer("chat", bare)
    # naming a template fixes it
    text = make_renderer("chat", bare, chat_template="chatml")(record())
    assert text == "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"


def test_template_rejecting_messages_is_a_data_error(smol_tokenizer):
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + CHATML
    render = make_renderer("chat", smol_tokenizer, system_prompt="S", chat_template=strict)
    with pytest.raises(DataError, match="no system role"):
        render(record())


def test_roundtrip_check(smol_tokenizer):
    rec = record(output="5")
    prompt = make_renderer("chat", smol_tokenizer)(rec)
    assert chat_roundtrip_problem(rec, prompt, "5", smol_tokenizer, None, None) is None
    trimming = CHATML.replace("message['content']", "(message['content'] | trim)")
    prompt = make_renderer("chat", smol_tokenizer, chat_template=trimming)(rec)
    assert "does not start" in chat_roundtrip_problem(rec, prompt, " 5 ", smol_tokenizer, None, trimming)


# --------------------------------------------------------------------------- records


def test_templated_rows_keep_answer_separate_without_eos(smol_tokenizer):
    render = make_renderer("chat", smol_tokenizer)
    row = template_sft(record(id=7), render)
    assert set(row) == {"id", "prompt", "completion", "instruction", "meta"}
    assert row["id"] == "7" and row["completion"] == "5" and row["meta"]["check"]["answer"] == "5"
    assert not row["prompt"].endswith("5")
    pref = template_pref(pref_record(), render)
    assert (pref["chosen"], pref["rejected"]) == ("5", "6") and pref["prompt"] == row["prompt"]


@pytest.mark.parametrize("change, message", [
    ({"output": None}, "'output'"),
    ({"instruction": 3}, "'instruction'"),
    ({"history": [{"role": "system", "content": "x"}]}, r"history\[0\]"),
    ({"meta": "x"}, "'meta'"),
])
def test_bad_records_name_the_field(change, message):
    with pytest.raises(DataError, match=message) as err:
        check_record(record(**change), ("output",), "data/raw/sft_train.jsonl: record 4")
    assert "sft_train.jsonl: record 4" in str(err.value)


# --------------------------------------------------------------------------- the stage


def write_raw(root, sft=None, pref=None):
    raw = root / "data/raw"
    raw.mkdir(parents=True, exist_ok=True)
    sft = sft or [record(id=f"s{i}", output=str(i), input="ctx" if i % 2 else "") for i in range(4)]
    pref = pref or [pref_record(id=f"p{i}") for i in range(3)]
    for split in ("train", "val", "test"):
        (raw / f"sft_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
        (raw / f"pref_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))


@pytest.fixture
def project(tmp_path, monkeypatch, smol_tokenizer_dir):
    shutil.copytree(smol_tokenizer_dir, tmp_path / "data/raw/tokenizer")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_writes_readable_templated_files(project):
    from stages.template import main

    write_raw(project, sft=[record(id="u", instruction="Traduis « été ».", output="summer")])
    main(Params(template={"kind": "alpaca", "system_prompt": "Sois bref."}))
    out = project / "data/templated"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{k}_{s}.jsonl" for k in ("sft", "pref") for s in ("train", "val", "test"))
    text = (out / "sft_test.jsonl").read_text(encoding="utf-8")
    assert "« été »" in text  # ensure_ascii=False: a person reads what the model sees
    (row,) = read_jsonl(out / "sft_test.jsonl")
    assert row["prompt"] == "Sois bref.\n\n### Instruction:\nTraduis « été ».\n\n### Response:\n"
    assert len(read_jsonl(out / "pref_val.jsonl")) == 3
    assert not list(project.glob("data/.tmp-*"))


def test_stage_saves_a_replacement_chat_template(project):
    from stages.template import main

    write_raw(project)
    main(Params(template={"kind": "chat", "chat_template": "chatml"}))
    assert (project / "data/templated/chat_template.jinja").read_text() == CHATML
    row = read_jsonl(project / "data/templated/sft_train.jsonl")[0]
    assert row["prompt"].startswith("<|im_start|>user\n")


def test_stage_errors_name_the_problem(project):
    from stages.template import main

    with pytest.raises(StageError, match="sft_train.jsonl is missing"):
        main(Params())
    write_raw(project, sft=[record(), {"id": "x", "instruction": "no output"}])
    with pytest.raises(DataError, match=r"sft_train.jsonl: record 2: field 'output'"):
        main(Params())
    assert not (project / "data/templated").exists()
