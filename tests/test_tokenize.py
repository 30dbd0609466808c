"""The tokenize stage: exact loss masks, one EOS, one BOS, a pad that is not the EOS, filtering and stats."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from tunepipe.artifacts import DataError, read_json, sha256_tree
from tunepipe.cli import StageError
from tunepipe.params import Params
from tunepipe.templates import CHATML, make_renderer
from tunepipe.tokenization import (
    IGNORE_INDEX, OVERLONG, PROMPT_TOO_LONG, TRUNCATED, adds_bos, choose_pad, encode_prompt, encode_prompts,
    encode_sft_batch, fit_example, generation_eos_ids, length_stats, measure_pref_batch, pref_prompt_text, split_stats,
)

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def bos_tokenizer(smol_tokenizer_dir):
    """SmolLM2's tokenizer made to prepend its BOS (<|im_start|>, id 1), like Llama's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir, add_bos_token=True)


def chat_prompt(tokenizer, instruction="Add 2 and 3.", template=None):
    rec = {"id": "r", "instruction": instruction, "input": "", "history": []}
    return make_renderer("chat", tokenizer, chat_template=template)(rec)


def encode(tokenizer, prompts, completions, max_length=256, overlong="drop", train_on_prompt=False):
    return encode_sft_batch({"prompt": prompts, "completion": completions}, tokenizer, adds_bos(tokenizer),
                            max_length, overlong, train_on_prompt)


# --------------------------------------------------------------------------- masks and special tokens


@pytest.mark.parametrize("completion", ["5", "5" + EOS, "5" + EOS + EOS])
def test_eos_exactly_once_and_last(smol_tokenizer, completion):
    out = encode(smol_tokenizer, [chat_prompt(smol_tokenizer)], [completion])
    ids = out["input_ids"][0]
    assert ids[-1] == smol_tokenizer.eos_token_id
    answer = ids[len(encode_prompt(smol_tokenizer, chat_prompt(smol_tokenizer))):]
    assert answer.count(smol_tokenizer.eos_token_id) == 1


def test_labels_mask_exactly_the_prompt(smol_tokenizer):
    prompt = chat_prompt(smol_tokenizer)
    out = encode(smol_tokenizer, [prompt], ["The answer is 5."])
    ids, labels = out["input_ids"][0], out["labels"][0]
    n_prompt = len(smol_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert IGNORE_INDEX not in labels[n_prompt:]
    assert smol_tokenizer.decode(labels[n_prompt:]) == "The answer is 5." + EOS
    assert smol_tokenizer.decode(ids) == prompt + "The answer is 5." + EOS
    assert out["length"][0] == len(ids) == len(labels)


def test_train_on_prompt_keeps_every_label(smol_tokenizer):
    out = encode(smol_tokenizer, [chat_prompt(smol_tokenizer)], ["5"], train_on_prompt=True)
    assert out["labels"][0] == out["input_ids"][0]


def test_no_bos_added_for_smollm2(smol_tokenizer):
    assert not adds_bos(smol_tokenizer)
    alpaca = "### Instruction:\nHi\n\n### Response:\n"
    assert encode_prompt(smol_tokenizer, alpaca) == smol_tokenizer(alpaca, add_special_tokens=False)["input_ids"]


def test_single_bos_on_a_bos_adding_tokenizer(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    assert adds_bos(bos_tokenizer)
    alpaca = encode_prompt(bos_tokenizer, "### Instruction:\nHi\n\n### Response:\n")
    chat = encode_prompt(bos_tokenizer, chat_prompt(bos_tokenizer))  # the template writes <|im_start|> = BOS
    for ids in (alpaca, chat):
        assert ids[0] == bos and ids[1] != bos
    assert alpaca.count(bos) == 1


def test_pref_prompt_gives_trl_exactly_one_bos(bos_tokenizer, smol_tokenizer):
    prompt = chat_prompt(bos_tokenizer)
    text = pref_prompt_text(prompt, bos_tokenizer, True)
    # TRL tokenizes a string prompt with the tokenizer's special tokens
    assert bos_tokenizer(text)["input_ids"] == encode_prompts(bos_tokenizer, [prompt], True)[0]
    assert pref_prompt_text(prompt, smol_tokenizer, False) == prompt


# --------------------------------------------------------------------------- pad token


def test_smollm2_pads_with_endoftext_not_eos(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    assert tok.pad_token_id == tok.eos_token_id  # the problem being solved
    info = choose_pad(tok)
    assert info == {"pad_token": "<|endoftext|>", "pad_token_id": 0, "added_pad": False,
                    "pad_source": "existing token"}
    assert tok.pad_token_id == 0 != tok.eos_token_id


def test_distinct_pad_is_kept_and_generation_eos_is_avoided(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.pad_token = "<empty_output>"
    assert choose_pad(tok)["pad_source"] == "tokenizer" and tok.pad_token == "<empty_output>"
    tok = copy.deepcopy(smol_tokenizer)
    info = choose_pad(tok, extra_eos_ids={0})  # generation_config also stops on <|endoftext|>
    assert info["pad_token_id"] not in (0, tok.eos_token_id) and tok.pad_token_id == info["pad_token_id"]


def test_generation_config_eos_ids(tmp_path):
    assert generation_eos_ids(tmp_path) == set()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert generation_eos_ids(tmp_path) == {0, 2}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert generation_eos_ids(tmp_path) == {2}


def test_pad_is_added_when_no_token_fits():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="</s>")
    info = choose_pad(tok)
    assert info == {"pad_token": "<|pad|>", "pad_token_id": 3, "added_pad": True, "pad_source": "added"}
    assert len(tok) == 4 and tok.pad_token_id == 3


# --------------------------------------------------------------------------- over-long examples


def test_fit_example_drop_truncate_and_prompt_too_long():
    prompt, answer, eos = [7, 7, 7], [1, 2, 3, 4], 2
    assert fit_example(prompt, answer, eos, 8, "drop", False)[2] == "kept"
    assert fit_example(prompt, answer, eos, 7, "drop", False) == ([], [], OVERLONG)
    ids, labels, status = fit_example(prompt, answer, eos, 5, "truncate", False)
    assert (ids, labels, status) == ([7, 7, 7, 1, 2], [-100, -100, -100, 1, 2], TRUNCATED)  # cut answer: no EOS
    assert fit_example(prompt, answer, eos, 4, "truncate", False)[1] == [-100, -100, -100, 1]
    for mode in ("drop", "truncate"):
        assert fit_example(prompt, answer, eos, 3, mode, False)[2] == PROMPT_TOO_LONG
    assert fit_example(prompt, [], eos, 4, "drop", False)[0] == [7, 7, 7, 2]  # prompt + EOS just fits


def test_drop_vs_truncate_counts(smol_tokenizer):
    prompt = chat_prompt(smol_tokenizer)
    n_prompt = len(encode_prompt(smol_tokenizer, prompt))
    completions = ["5", "word " * 60, "word " * 120]
    max_length = n_prompt + 50
    for mode, expect in (("drop", [1, 0, 2, 0]), ("truncate", [3, 2, 0, 0])):
        out = encode(smol_tokenizer, [prompt] * 3, completions, max_length=max_length, overlong=mode)
        stats = split_stats(out["status"], out["raw_length"], out["length"])
        assert [stats["kept"], stats["truncated"], stats["dropped"], stats["dropped_prompt_too_long"]] == expect
        assert stats["length"]["max"] <= max_length
    out = encode(smol_tokenizer, [prompt], ["5"], max_length=n_prompt, overlong="truncate")
    assert out["status"] == [PROMPT_TOO_LONG]


def test_pref_pairs_dropped_by_their_longer_side(smol_tokenizer):
    prompt = chat_prompt(smol_tokenizer)
    n_prompt = len(encode_prompt(smol_tokenizer, prompt))
    batch = {"prompt": [prompt] * 3, "chosen": ["5", "5", "x " * 30], "rejected": ["6", "6 " * 30, "6"]}
    out = measure_pref_batch(batch, smol_tokenizer, False, n_prompt + 10)
    assert out["status"] == ["kept", OVERLONG, OVERLONG]
    assert out["raw_length"][0] == n_prompt + 2 and out["prompt_length"] == [n_prompt] * 3


# --------------------------------------------------------------------------- statistics


def test_length_stats_hand_made():
    assert length_stats(list(range(1, 21))) == {"min": 1, "mean": 10.5, "p95": 19.05, "max": 20}
    assert length_stats([]) == {"min": 0, "mean": 0.0, "p95": 0.0, "max": 0}
    stats = split_stats(["kept", "truncated", "overlong", "prompt_too_long"], [10, 40, 50, 60], [10, 32, 0, 0])
    assert stats == {"examples": 4, "kept": 2, "truncated": 1, "dropped": 2, "dropped_prompt_too_long": 1,
                     "raw_length": {"min": 10, "mean": 40.0, "p95": 58.5, "max": 60},
                     "length": {"min": 10, "mean": 21.0, "p95": 30.9, "max": 32}}


# --------------------------------------------------------------------------- the stages, end to end


def canonical(i: int, **kw) -> dict:
    rec = {"id": f"s{i}", "instruction": f"Add {i} and 1.", "input": "ctx" if i % 2 else "", "output": str(i + 1),
           "system": None, "history": [], "meta": {"family": "arithmetic"}}
    return {**rec, **kw}


@pytest.fixture
def project(tmp_path, monkeypatch, smol_tokenizer_dir):
    shutil.copytree(smol_tokenizer_dir, tmp_path / "data/raw/tokenizer")
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True, exist_ok=True)
    sft = [canonical(i) for i in range(5)] + [canonical(9, output="long answer " * 100)]
    pref = [{**canonical(i), "chosen": "ok", "rejected": "no no no"} for i in range(4)]
    pref.append({**canonical(8), "chosen": "ok", "rejected": "very long " * 100})
    for split in ("train", "val", "test"):
        (raw / f"sft_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
        (raw / f"pref_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_template_then_tokenize(project):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from stages import template, tokenize

    template.main(Params(template={"chat_template": "chatml"}))
    params = Params(tokenize={"max_length": 64, "overlong": "drop"})
    tokenize.main(params)

    out = project / "data/tokenized"
    sft, pref = load_from_disk(str(out / "sft")), load_from_disk(str(out / "pref"))
    assert set(sft) == set(pref) == {"train", "validation"}  # the test split is left to evaluate
    assert sft["train"].column_names == ["input_ids", "labels", "length"] and sft["train"].num_rows == 5
    assert pref["train"].column_names == ["prompt", "chosen", "rejected"] and pref["train"].num_rows == 4
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tok.padding_side == "right" and tok.pad_token_id == 0 != tok.eos_token_id
    assert tok.chat_template == CHATML  # template.chat_template travels with the tokenizer
    row = sft["validation"][1]
    assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "2" + EOS

    info = read_json(out / "info.json")
    assert (info["pad_token_id"], info["eos_token_id"], info["added_pad"]) == (0, 2, False)
    assert info["generation_padding_side"] == "left"
    assert (info["preference_kind"], info["preference_pairs"]) == ("paired", True)
    metrics = read_json(project / "metrics/tokenize.json")
    assert metrics["sft"]["train"]["dropped"] == 1 and metrics["sft"]["validation"]["kept"] == 5
    assert metrics["pref"]["train"]["dropped"] == 1 and metrics["pref"]["train"]["length"]["max"] <= 64

    first = sha256_tree(out), sha256_tree(project / "metrics")
    tokenize.main(params)
    assert (sha256_tree(out), sha256_tree(project / "metrics")) == first  # reruns are byte-identical


def test_empty_after_filtering_says_why(project):
    from stages import template, tokenize

    template.main(Params())
    with pytest.raises(StageError, match=r"sft_train.jsonl: all 6 examples were dropped.*max_length=16.*truncate"):
        tokenize.main(Params(tokenize={"max_length": 16}))
    assert not (project / "data/tokenized").exists()


def test_unpaired_rows_through_template_and_tokenize(project):
    """Thumbs up/down data (fetch.preference.format: unpaired) keeps one answer and its label per row."""
    from datasets import load_from_disk

    from stages import template, tokenize

    rows = [{**canonical(i), "completion": "ok" if i % 3 else "no no no", "label": bool(i % 3)} for i in range(6)]
    rows.append({**canonical(8), "completion": "very long " * 100, "label": True})
    for split in ("train", "val", "test"):
        (project / f"data/raw/pref_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    template.main(Params())
    templated = [json.loads(line) for line in (project / "data/templated/pref_train.jsonl").read_text().splitlines()]
    assert set(templated[0]) == {"id", "prompt", "completion", "label", "meta"} and templated[0]["label"] is False

    tokenize.main(Params(tokenize={"max_length": 64}))
    pref = load_from_disk(str(project / "data/tokenized/pref"))
    assert set(pref["train"].column_names) == {"prompt", "completion", "label"} and pref["train"].num_rows == 6
    assert pref["train"]["label"] == [False, True, True, False, True, True]
    info = read_json(project / "data/tokenized/info.json")
    assert (info["preference_kind"], info["preference_pairs"]) == ("unpaired", False)
    stats = read_json(project / "metrics/tokenize.json")["pref"]["train"]
    assert (stats["kept"], stats["dropped"], stats["desirable"], stats["undesirable"]) == (6, 1, 4, 2)


def test_pairs_and_unpaired_rows_do_not_mix(project):
    from stages import template

    unpaired = {**canonical(1), "completion": "ok", "label": "yes"}
    (project / "data/raw/pref_test.jsonl").write_text(json.dumps(unpaired) + "\n")
    with pytest.raises(DataError, match=r"pref_test.jsonl: record 1: field 'label' must be true or false"):
        template.main(Params())
    (project / "data/raw/pref_test.jsonl").write_text(json.dumps({**unpaired, "label": True}) + "\n")
    with pytest.raises(DataError, match="mixes preference pairs and unpaired rows"):
        template.main(Params())
    assert not (project / "data/templated").exists()
