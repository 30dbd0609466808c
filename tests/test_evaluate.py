"""The evaluate stage on a tiny model, a real LoRA adapter and generated test tasks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunepipe.artifacts import DataError, read_jsonl, write_jsonl
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
    return Params.model_validate({"evaluate": {"max_new_tokens": 6, "batch_size": 4, **evaluate}})


def run(p: Params):
    from stages import evaluate

    evaluate.main(p)
    return json.loads(Path("metrics/eval.json").read_text())


def test_metrics_for_every_model(project):
    metrics = run(params())
    assert set(metrics) == {"base", "sft", "final"}
    families = {r["meta"]["family"] for r in read_jsonl("data/templated/sft_test.jsonl")}
    for m in metrics.values():
        for key in ("task_accuracy", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "perplexity", "nll",
                    "pref_accuracy", "pref_margin", "mean_new_tokens", "eos_rate", "repeat_rate", "truncated_rate"):
            assert isinstance(m[key], (int, float)), key
        assert {k[4:] for k in m if k.startswith("acc_")} == families
        assert m["n_prompts"] == N_SFT and m["n_pairs"] == N_PREF
        assert 0 <= m["task_accuracy"] <= 1 and m["perplexity"] > 1 and 0 < m["mean_new_tokens"] <= 6
    # the adapter merged in memory (sft) is the saved merged model (final)
    assert metrics["sft"] == pytest.approx(metrics["final"], abs=1e-3)
    assert metrics["sft"]["perplexity"] != metrics["base"]["perplexity"]


def test_generations_and_preferences_files(project):
    run(params())
    gens = read_jsonl("data/eval/generations.jsonl")
    assert len(gens) == 3 * N_SFT
    assert [g["model"] for g in gens] == ["base"] * N_SFT + ["sft"] * N_SFT + ["final"] * N_SFT
    tests = read_jsonl("data/templated/sft_test.jsonl")
    for g, t in zip(gens, tests):
        assert (g["id"], g["prompt"], g["reference"]) == (t["id"], t["prompt"], t["completion"])
        assert g["task"] in ("pass", "wrong_answer", "constraint_broken")
        assert (g["task"] != "pass") == any(f in ("wrong_answer", "constraint_broken") for f in g["failures"])
        assert g["stopped_at_eos"] == ("no_stop" not in g["failures"])
        assert 1 <= g["n_new_tokens"] <= 6 and g["ref_nll"] > 0
    prefs = read_jsonl("data/eval/preferences.jsonl")
    assert len(prefs) == 3 * N_PREF
    for p in prefs:
        assert p["correct"] == (p["margin"] > 0)
        assert p["margin"] == pytest.approx(p["chosen_logp"] - p["rejected_logp"], abs=2e-4)
        assert p["rejected_kind"] in ("wrong_answer", "ignored_constraint", "rambling", "repetition", "no_stop")


def test_same_params_same_outputs_even_when_sampling(project):
    p = params(do_sample=True, temperature=1.3, models=["base", "final"])
    first = run(p)
    first_gens = Path("data/eval/generations.jsonl").read_bytes()
    assert run(p) == first
    assert Path("data/eval/generations.jsonl").read_bytes() == first_gens


def test_max_examples_and_model_subset(project):
    metrics = run(params(max_examples=2, models=["final"]))
    assert list(metrics) == ["final"]
    assert metrics["final"]["n_prompts"] == 2 and metrics["final"]["n_pairs"] == 2
    assert len(read_jsonl("data/eval/generations.jsonl")) == 2


def test_missing_model_is_a_clear_error(project):
    shutil.rmtree("models/sft")
    with pytest.raises(StageError, match="models/sft is missing"):
        run(params(models=["sft"]))
    assert not Path("metrics/eval.json").exists()


def test_malformed_test_row_names_the_file_and_row(project):
    rows = read_jsonl("data/templated/sft_test.jsonl")
    del rows[1]["completion"]
    write_jsonl("data/templated/sft_test.jsonl", rows)
    with pytest.raises(DataError, match=r"sft_test.jsonl: row 2 .*'completion'"):
        run(params())
