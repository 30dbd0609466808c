"""The evaluate stage on a tiny model, a real LoRA adapter and generated test tasks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tunepipe.artifacts import DataError, read_json, read_jsonl, write_jsonl
from tunepipe.cli import StageError
from tunepipe.params import Params

N_SFT, N_PREF = 6, 4


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """models/{base,sft,final}, the tokenizer and templated test files, built once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe import tasks, templates

    root = tmp_path_factory.mktemp("evalproject")
    shutil.copytree(tiny_model_dir, root / "models/base")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = "<|endoftext|>"  # what the tokenize stage picks for SmolLM2
    tok.save_pretrained(root / "data/tokenized/tokenizer")

    torch.manual_seed(1)  # a random, non-zero LoRA update, so sft differs from base
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(root / "models/sft")
    final = peft_model.merge_and_unload()
    final.save_pretrained(root / "models/final", safe_serialization=True)
    tok.save_pretrained(root / "models/final")

    render = templates.make_renderer("chat", tok)
    write_jsonl(root / "data/templated/sft_test.jsonl",
                [templates.template_sft(r, render) for r in tasks.generate_sft("test", N_SFT, 42)])
    write_jsonl(root / "data/templated/pref_test.jsonl",
                [templates.template_pref(r, render) for r in tasks.generate_preference("test", N_PREF, 42)])
    return root


@pytest.fixture
def project(built, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(built, root)
    monkeypatch.chdir(root)
    return root


def params(**evaluate) -> Params:
    return Params.model_validate({"evaluate": {"max_new_tokens": 6, "batch_size": 4, "dtype": "float32", **evaluate}})


def run(p: Params, model: str) -> tuple[list[dict], list[dict]]:
    """One evaluate@<model> run: its generation and preference rows."""
    from stages import evaluate

    evaluate.main(p, model=model)
    return read_jsonl(f"data/eval/{model}/generations.jsonl"), read_jsonl(f"data/eval/{model}/preferences.jsonl")


def test_rows_for_every_prompt_and_pair(project):
    tests = read_jsonl("data/templated/sft_test.jsonl")
    for model in ("base", "sft", "final"):
        gens, prefs = run(params(), model)
        assert len(gens) == N_SFT and len(prefs) == N_PREF and {g["model"] for g in gens} == {model}
        for g, t in zip(gens, tests):
            assert (g["id"], g["prompt"], g["reference"]) == (t["id"], t["prompt"], t["completion"])
            assert g["task"] in ("pass", "wrong_answer", "constraint_broken")
            assert (g["task"] != "pass") == any(f in ("wrong_answer", "constraint_broken") for f in g["failures"])
            assert g["stopped_at_eos"] == ({"no_stop", "truncated"}.isdisjoint(g["failures"]))
            assert g["truncated"] == ("truncated" in g["failures"])  # cut by the limit: not "no_stop"
            assert 1 <= g["n_new_tokens"] <= 6 and g["ref_tokens"] >= 1
            assert g["ref_nll"] == pytest.approx(-g["ref_logp"] / g["ref_tokens"], abs=2e-4)
            assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(g)
        for p in prefs:
            assert p["correct"] == (p["margin"] > 0) and p["chosen_tokens"] >= 1 and p["rejected_tokens"] >= 1
            assert p["margin"] == pytest.approx(p["chosen_logp"] - p["rejected_logp"], abs=2e-4)
            assert p["rejected_kind"] in ("wrong_answer", "ignored_constraint", "rambling", "repetition", "no_stop")


def test_sft_merged_in_memory_scores_as_the_saved_merged_model(project):
    sft, final = run(params(), "sft"), run(params(), "final")
    assert [g["output"] for g in sft[0]] == [g["output"] for g in final[0]]
    assert [g["ref_logp"] for g in sft[0]] == pytest.approx([g["ref_logp"] for g in final[0]], abs=1e-3)
    base = run(params(), "base")
    assert [g["ref_logp"] for g in base[0]] != pytest.approx([g["ref_logp"] for g in sft[0]], abs=1e-3)


def test_same_params_same_outputs_even_when_sampling(project):
    p = params(do_sample=True, temperature=1.3)
    run(p, "final")
    first = Path("data/eval/final/generations.jsonl").read_bytes()
    run(p, "final")
    assert Path("data/eval/final/generations.jsonl").read_bytes() == first


def test_max_examples(project):
    gens, prefs = run(params(max_examples=2), "final")
    assert len(gens) == 2 and len(prefs) == 2


def test_missing_model_is_a_clear_error(project):
    shutil.rmtree("models/sft")
    with pytest.raises(StageError, match="models/sft is missing"):
        run(params(), "sft")
    assert not Path("data/eval/sft").exists()


def test_malformed_test_row_names_the_file_and_row(project):
    rows = read_jsonl("data/templated/sft_test.jsonl")
    del rows[1]["completion"]
    write_jsonl("data/templated/sft_test.jsonl", rows)
    with pytest.raises(DataError, match=r"sft_test.jsonl: row 2 .*'completion'"):
        run(params(), "base")


def test_auto_answer_limit_comes_from_the_training_answers(project):
    """max_new_tokens: auto sizes generation from the training references (95th percentile)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained("data/tokenized/tokenizer")
    answers = [" ".join(["word"] * n) for n in range(1, 21)]  # 1..20 words
    write_jsonl("data/templated/sft_train.jsonl", [{"id": str(i), "prompt": "p", "completion": a}
                                                   for i, a in enumerate(answers)])
    lengths = sorted(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    gens, _ = run(params(max_new_tokens="auto"), "base")
    limit = read_json("data/eval/base/generation.json")
    assert lengths[-2] * 1.25 + 8 <= limit["max_new_tokens"] <= lengths[-1] * 1.25 + 9
    assert "95th percentile of 20 training answers" in limit["derived"]
    assert max(g["n_new_tokens"] for g in gens) <= limit["max_new_tokens"]
    run(params(max_new_tokens="auto", max_new_tokens_cap=5), "base")
    assert read_json("data/eval/base/generation.json")["max_new_tokens"] == 5


def test_dtype_auto_follows_the_precision_probe_and_is_recorded(project, monkeypatch, tmp_path):
    """auto: bfloat16 where the (replaced) probe measures bf16 faster, else float32; the model runs in it."""
    from tunepipe import precision

    scores = {}
    for ratio, expected in ((1.77, "bfloat16"), (0.59, "float32")):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"cache{ratio}"))  # the probe's cache: one per ratio
        monkeypatch.setattr(precision, "measure",
                            lambda shapes, tokens, r=ratio: {"fp32_ms": 100.0, "bf16_ms": 100.0 / r, "tokens": tokens})
        gens, prefs = run(params(dtype="auto"), "final")
        assert read_json("data/eval/final/generation.json")["dtype"] == expected
        scores[expected] = [g["ref_logp"] for g in gens] + [p["chosen_logp"] for p in prefs]
    assert scores["bfloat16"] != scores["float32"]  # bf16 rounding: the model did run in bf16
    assert scores["bfloat16"] == pytest.approx(scores["float32"], rel=0.05)


def test_instruction_as_written_and_no_preference_pairs(project):
    """Rows carry the user's instruction (not the templated prompt); no pairs, no preference rows."""
    tests = read_jsonl("data/templated/sft_test.jsonl")
    write_jsonl("data/templated/pref_test.jsonl", [])
    gens, prefs = run(params(), "final")
    assert prefs == []
    assert [g["instruction"] for g in gens] == [t["instruction"] for t in tests]
    assert all("<|im_start|>" in g["prompt"] and "<|im_start|>" not in g["instruction"] for g in gens)


def test_unpaired_preference_rows_are_not_scored(project, caplog):
    """Thumbs up/down rows (fetch.preference.format: unpaired) have no second answer to prefer: skipped, said so."""
    import logging

    rows = read_jsonl("data/templated/pref_test.jsonl")
    write_jsonl("data/templated/pref_test.jsonl", [{"id": r["id"], "prompt": r["prompt"], "completion": r["chosen"],
                                                   "label": True, "meta": r["meta"]} for r in rows])
    with caplog.at_level(logging.INFO, logger="tunepipe"):
        gens, prefs = run(params(), "base")
    assert prefs == [] and len(gens) == N_SFT
    assert "pref_test.jsonl holds unpaired rows" in caplog.text and "not measured" in caplog.text
