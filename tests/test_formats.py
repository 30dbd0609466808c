"""Hub data formats -> canonical records, filters, and bad rows (error or skip-and-count)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainingdata import unpaired_source
from tunepipe.artifacts import DataError
from tunepipe.formats import convert_rows
from tunepipe.params import DataSource, Fetch, RowFilter
from tunepipe.sources import load_data, read_rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def local(path, fmt, **kw) -> DataSource:
    return DataSource(source="local", path=str(path), format=fmt, **kw)


def rows_of(ds: DataSource, on_bad_row="error"):
    rows, origin = read_rows(ds, "fetch.sft")
    return convert_rows(rows, ds.format, origin, ds.fields, ds.filters, on_bad_row)


# --------------------------------------------------------------------------- each format


def test_alpaca_and_dolly_with_a_field_mapping(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet.", "output": "Hello", "system": "Be brief."}])
    recs, stats = rows_of(local(alpaca, "alpaca"))
    assert [(r["instruction"], r["input"], r["output"], r["system"]) for r in recs] == [
        ("Add.", "2 and 3", "5", None), ("Greet.", "", "Hello", "Be brief.")]
    assert recs[0]["id"] == "alpaca-1" and recs[0]["meta"] == {"source": str(alpaca), "row": 1}
    assert stats == {"read": 2, "filtered": {}, "skipped": {}, "kept": 2}

    dolly = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Summarize.", "context": "A long text.", "response": "Short.", "category": "summarization"},
        {"instruction": "Name a color.", "context": "", "response": "Red."}])
    recs, _ = rows_of(local(dolly, "dolly"))
    assert [(r["input"], r["output"]) for r in recs] == [("A long text.", "Short."), ("", "Red.")]

    renamed = write_jsonl(tmp_path / "qa.jsonl", [{"uid": 7, "question": "Why?", "answer": "Because."}])
    recs, _ = rows_of(local(renamed, "alpaca", fields={"instruction": "question", "output": "answer", "id": "uid"}))
    assert recs[0]["id"] == "7" and recs[0]["instruction"] == "Why?" and recs[0]["output"] == "Because."


def test_messages_last_assistant_turn_is_the_output(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "unanswered"}]}])
    (rec,), _ = rows_of(local(path, "messages"))
    assert rec["system"] == "You are terse." and rec["instruction"] == "2+2?" and rec["output"] == "4"
    assert rec["history"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def test_sharegpt_conversations_from_a_json_list(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [
        {"from": "system", "value": "Sys."}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}]), encoding="utf-8")
    (rec,), _ = rows_of(local(path, "sharegpt"))
    assert (rec["system"], rec["instruction"], rec["output"]) == ("Sys.", "Q2", "A2")
    assert rec["history"] == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]


ORCA = [
    {"system": "", "input": "What is 2+2?", "chosen": "4", "rejected": "5", "status": "unchanged",
     "chosen_score": 9.0, "in_gsm8k_train": False},
    {"system": "Be kind.", "input": "Say hi", "chosen": "Hi!", "rejected": "No.", "status": "swapped",
     "chosen_score": 8.0, "in_gsm8k_train": False},
    {"system": "", "input": "Tie", "chosen": "a", "rejected": "b", "status": "tie", "chosen_score": 9.0,
     "in_gsm8k_train": False},
    {"system": "", "input": "Low", "chosen": "a", "rejected": "b", "status": "unchanged", "chosen_score": 5.0,
     "in_gsm8k_train": False},
    {"system": "", "input": "GSM", "chosen": "a", "rejected": "b", "status": "unchanged", "chosen_score": 10.0,
     "in_gsm8k_train": True},
]
ORCA_FILTERS = [RowFilter(field="status", op="ne", value="tie"), RowFilter(field="chosen_score", op="ge", value=8),
                RowFilter(field="in_gsm8k_train", op="eq", value=False)]


def test_preference_orca_columns_and_the_course_filter(tmp_path):
    path = write_jsonl(tmp_path / "orca.jsonl", ORCA)
    recs, stats = rows_of(local(path, "preference", fields={"prompt": "input"}, filters=ORCA_FILTERS))
    assert [(r["instruction"], r["chosen"], r["rejected"], r["system"]) for r in recs] == [
        ("What is 2+2?", "4", "5", None), ("Say hi", "Hi!", "No.", "Be kind.")]
    assert stats["read"] == 5 and stats["kept"] == 2
    assert stats["filtered"] == {"status ne 'tie'": 1, "chosen_score ge 8": 1, "in_gsm8k_train eq False": 1}

    import pandas as pd   # CSV cells are text: the filters still compare numbers and booleans

    pd.DataFrame(ORCA).to_csv(tmp_path / "orca.csv", index=False)
    from_csv, _ = rows_of(local(tmp_path / "orca.csv", "preference", fields={"prompt": "input"}, filters=ORCA_FILTERS))
    assert [r["instruction"] for r in from_csv] == ["What is 2+2?", "Say hi"]


def test_preference_with_message_lists(tmp_path):
    conv = [{"role": "user", "content": "Capital of France?"}]
    path = write_jsonl(tmp_path / "uf.jsonl", [
        {"prompt": "Capital of France?", "chosen": conv + [{"role": "assistant", "content": "Paris."}],
         "rejected": conv + [{"role": "assistant", "content": "Lyon."}]},
        {"prompt": "Name a fruit.", "chosen": [{"role": "assistant", "content": "Apple."}],
         "rejected": [{"role": "assistant", "content": "Car."}]}])
    recs, _ = rows_of(local(path, "preference"))
    assert [(r["instruction"], r["chosen"], r["rejected"]) for r in recs] == [
        ("Capital of France?", "Paris.", "Lyon."), ("Name a fruit.", "Apple.", "Car.")]


def test_hh_rlhf_shared_prefix_becomes_the_prompt(tmp_path):
    prefix = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a fact."
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": prefix + "\n\nAssistant: Octopuses have three hearts.",
         "rejected": prefix + "\n\nAssistant: No."}])
    (rec,), _ = rows_of(local(path, "hh_rlhf"))
    assert rec["instruction"] == "Tell me a fact."
    assert rec["history"] == [{"role": "user", "content": "Hi there"},
                              {"role": "assistant", "content": "Hello! How can I help?"}]
    assert (rec["chosen"], rec["rejected"]) == ("Octopuses have three hearts.", "No.")


def test_unpaired_rows_take_every_way_of_writing_a_label(tmp_path):
    conv = [{"role": "user", "content": "Capital of France?"}]
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Add 2 and 3.", "completion": "5", "label": True},
        {"prompt": "Add 2 and 3.", "completion": "6", "label": "down"},
        {"prompt": "Name a color.", "completion": "Red.", "label": 1},
        {"prompt": "Name a color.", "completion": "Car.", "label": " BAD "},
        {"prompt": "Name a fruit.", "completion": [{"role": "assistant", "content": "Apple."}], "label": "Good"},
        {"prompt": "ignored", "completion": conv + [{"role": "assistant", "content": "Paris."}], "label": "up"},
        {"prompt": "Say hi.", "completion": "Hi!", "label": 0.0, "system": "Be kind."}])
    recs, stats = rows_of(unpaired_source(path))
    assert [(r["instruction"], r["completion"], r["label"]) for r in recs] == [
        ("Add 2 and 3.", "5", True), ("Add 2 and 3.", "6", False), ("Name a color.", "Red.", True),
        ("Name a color.", "Car.", False), ("Name a fruit.", "Apple.", True), ("Capital of France?", "Paris.", True),
        ("Say hi.", "Hi!", False)]
    assert recs[6]["system"] == "Be kind." and "chosen" not in recs[0]
    assert stats["kept"] == 7

    import pandas as pd  # CSV cells are text: "1", "false"

    pd.DataFrame([{"q": "a?", "answer": "b", "thumbs": "1"}, {"q": "c?", "answer": "d", "thumbs": "false"}]).to_csv(
        tmp_path / "kto.csv", index=False)
    recs, _ = rows_of(unpaired_source(tmp_path / "kto.csv", fields={"prompt": "q", "completion": "answer",
                                                               "label": "thumbs"}))
    assert [(r["instruction"], r["completion"], r["label"]) for r in recs] == [("a?", "b", True), ("c?", "d", False)]


def test_a_malformed_label_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"q": "a?", "completion": "b", "thumbs": "up"},
                                                {"q": "c?", "completion": "d", "thumbs": "meh"},
                                                {"q": "e?", "completion": "f", "thumbs": 2}])
    source = unpaired_source(path, fields={"prompt": "q", "label": "thumbs"})
    with pytest.raises(DataError, match=r"kto\.jsonl row 2: field 'thumbs' \(label\) should be true/false, 1/0, "
                                        r"up/down or good/bad, got 'meh'"):
        rows_of(source)
    recs, stats = rows_of(source, on_bad_row="skip")
    assert len(recs) == 1 and stats["skipped"] == {"bad_label": 2}
    no_label = write_jsonl(tmp_path / "nolabel.jsonl", [{"prompt": "a?", "completion": "b"}])
    with pytest.raises(DataError, match=r"nolabel\.jsonl row 1: missing field 'label' \(label\)"):
        rows_of(unpaired_source(no_label))


def test_csv_parquet_and_save_to_disk_files(tmp_path):
    import datasets
    import pandas as pd

    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    msgs = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(3)]
    datasets.Dataset.from_list(msgs).to_parquet(tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "disk")

    recs, _ = rows_of(local(tmp_path / "d.csv", "alpaca"))
    assert [r["output"] for r in recs] == ["0", "1", "2", "3"] and recs[0]["input"] == ""
    recs, _ = rows_of(local(tmp_path / "d.parquet", "messages"))
    assert [r["output"] for r in recs] == ["A0", "A1", "A2"]
    recs, _ = rows_of(local(tmp_path / "disk", "alpaca"))
    assert len(recs) == 4
    with pytest.raises(DataError, match="no split 'test'"):
        rows_of(local(tmp_path / "disk", "alpaca", split="test"))


def test_hub_source_loads_each_format_with_load_dataset(tmp_path):
    """``datasets.load_dataset`` on a folder of data files, as it would on a Hub repo."""
    samples = {
        "alpaca": [{"instruction": f"I{i}", "input": "", "output": f"O{i}"} for i in range(6)],
        "sharegpt": [{"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]}
                     for i in range(6)],
        "hh_rlhf": [{"chosen": f"\n\nHuman: Q{i}\n\nAssistant: good", "rejected": f"\n\nHuman: Q{i}\n\nAssistant: bad"}
                    for i in range(6)],
    }
    fetch = Fetch(val_fraction=0.2, test_fraction=0.2)
    for fmt, rows in samples.items():
        repo = tmp_path / fmt
        repo.mkdir()
        write_jsonl(repo / "train.jsonl", rows)
        role = "preference" if fmt == "hh_rlhf" else "sft"
        splits, info = load_data(DataSource(source="hub", id=str(repo), format=fmt), role, fetch, seed=0)
        # 20% of 6, within the quarter-of-the-rows cap
        assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 1, "test": 1}
        ids = [r["id"] for s in splits.values() for r in s]
        assert len(set(ids)) == 6 and info["rows"]["kept"] == 6


def test_max_rows_takes_a_seeded_sample_and_splits_are_seeded(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"I{i}", "output": f"O{i}"} for i in range(50)])
    fetch = Fetch()
    a, info = load_data(local(path, "alpaca", max_rows=20), "sft", fetch, seed=1)
    b, _ = load_data(local(path, "alpaca", max_rows=20), "sft", fetch, seed=1)
    c, _ = load_data(local(path, "alpaca", max_rows=20), "sft", fetch, seed=2)
    assert a == b and a != c and info["sampled"] == 20
    # the minimum held-out sizes, capped at a quarter of the 20 rows each
    assert sum(len(v) for v in a.values()) == 20 and len(a["val"]) == 5 and len(a["test"]) == 5


@pytest.mark.parametrize("n_rows, fraction, minimum, expected", [
    (144, 0.05, 50, 36),    # 5% would be 8 prompts; the minimum is capped at a quarter of the rows
    (400, 0.05, 50, 50),    # the minimum
    (4000, 0.05, 50, 200),  # the fraction
    (5, 0.05, 50, 1),
])
def test_held_out_sizes(n_rows, fraction, minimum, expected):
    from tunepipe.sources import held_out

    assert held_out(n_rows, fraction, minimum) == expected


def test_no_preference_data_gives_empty_splits_and_own_sft_refuses_generated_pairs(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"I{i}", "output": f"O{i}"} for i in range(50)])
    splits, _ = load_data(DataSource(source="none"), "preference", Fetch(), seed=0)
    assert splits == {"train": [], "val": [], "test": []}
    with pytest.raises(ValueError, match="fetch.preference.source=none"):
        Fetch(sft=local(path, "alpaca"))
    Fetch(sft=local(path, "alpaca"), allow_generated_preferences=True)
    Fetch(sft=local(path, "alpaca"), preference=DataSource(source="none"))


# --------------------------------------------------------------------------- bad rows


def test_malformed_json_line_and_non_utf8_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        rows_of(local(bad, "alpaca"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "ok", "output": "ok"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8"):
        rows_of(local(latin, "alpaca"))
    (tmp_path / "latin.csv").write_bytes(b"instruction,output\ncaf\xe9,x\n")
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8"):
        rows_of(local(tmp_path / "latin.csv", "alpaca"))


BAD_SFT = [
    {"instruction": "fine", "output": "ok"},
    {"instruction": "no output"},                       # missing_field
    {"instruction": "   ", "output": "x"},              # empty_text
    {"instruction": 3, "output": "x"},                  # wrong_type
    {"instruction": "fine", "output": "ok"},            # duplicate
]


@pytest.mark.parametrize("bad, message", [
    (1, r"missing field 'output'"), (2, r"field 'instruction' \(instruction\) is empty"),
    (3, r"field 'instruction' should be a string, got int"), (4, r"duplicate")])
def test_bad_sft_rows_raise_naming_source_and_row(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "sft.jsonl", [BAD_SFT[0], BAD_SFT[bad]])
    with pytest.raises(DataError, match=rf"sft\.jsonl row 2: {message}"):
        rows_of(local(path, "alpaca"))


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", BAD_SFT)
    recs, stats = rows_of(local(path, "alpaca"), on_bad_row="skip")
    assert len(recs) == 1
    assert stats["skipped"] == {"missing_field": 1, "empty_text": 1, "wrong_type": 1, "duplicate": 1}


def test_chosen_equal_to_rejected_and_mismatched_dialogues(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same "}])
    with pytest.raises(DataError, match=r"p\.jsonl row 1: chosen and rejected are the same"):
        rows_of(local(path, "preference"))
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: x"},
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y"}])
    recs, stats = rows_of(local(hh, "hh_rlhf"), on_bad_row="skip")
    assert len(recs) == 1 and stats["skipped"] == {"chosen_equals_rejected": 1, "prefix_mismatch": 1}


def test_empty_after_filtering_says_why(tmp_path):
    path = write_jsonl(tmp_path / "orca.jsonl", ORCA[2:] + [{"input": "x"}])
    ds = local(path, "preference", fields={"prompt": "input"}, filters=ORCA_FILTERS)
    with pytest.raises(DataError, match=r"no rows left \(read 4 rows; filter 'chosen_score ge 8' removed 1; "
                                        r"filter 'in_gsm8k_train eq False' removed 1; filter 'status ne 'tie'' "
                                        r"removed 1; skipped 1 as missing_field\)"):
        rows_of(ds, on_bad_row="skip")


def test_unknown_field_names_and_file_types_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"\['answer'\] are not fields of format 'alpaca'"):
        rows_of(local(path, "alpaca", fields={"answer": "output"}))
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        rows_of(local(tmp_path / "a.txt", "alpaca"))
    with pytest.raises(DataError, match="does not exist"):
        rows_of(local(tmp_path / "missing.jsonl", "alpaca"))
