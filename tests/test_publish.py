"""The publish stage: models/hub/ (models/final's files and a Hub model card built from
metrics/eval.json and metrics/export.json, one H1) and a push that never writes the token."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tunepipe import hub
from tunepipe.cli import StageError
from tunepipe.params import Params, load_params

SECRET = "hf_tunepipeTestTokenNeverWritten123"

FINAL = {"task_accuracy": 0.8333, "task_accuracy_ci_low": 0.4365, "task_accuracy_ci_high": 0.9699,
         "rougeL": 0.91, "rougeL_ci_low": 0.8, "rougeL_ci_high": 0.97,
         "pref_accuracy": 0.3333, "pref_accuracy_ci_low": 0.0615, "pref_accuracy_ci_high": 0.7923,
         "eos_rate": 1.0, "eos_rate_ci_low": 0.6097, "eos_rate_ci_high": 1.0}
EXPORTED = {**FINAL, "task_accuracy": 0.6667, "task_accuracy_ci_low": 0.3, "task_accuracy_ci_high": 0.9032}
EVAL = {"models": ["base", "final"], "base": {"task_accuracy": 0.1, "task_accuracy_ci_low": 0.0,
                                              "task_accuracy_ci_high": 0.4},
        "final": FINAL,
        "baseline_constant": {"task_accuracy": 0.2604, "task_accuracy_ci_low": 0.1831,
                              "task_accuracy_ci_high": 0.3562},
        "headline": {"model": "final", "text": "final: 57.3 points above the best trivial baseline (constant, 26.0%; "
                                               "95% CI +20.0 to +80.0 points, p=0.04)"},
        "settings": {"confidence": 0.9, "alpha": 0.05, "bootstrap_resamples": 1000}}
EXPORT_METRICS = {"gguf": {"file": "model-f16.gguf", "type": "f16"},
                  "round_trip": {"prompts": 3, "greedy_same": 3, "atol": 0.2, "max_logit_diff": 0.0312},
                  "llama_cpp": None}
MERGED_CARD = ("---\nbase_model: tiny-llama-test\ntags:\n- tunepipe\n- sft\n- dpo\n---\n\n"
               "# tiny-llama-test, fine-tuned with tunepipe (SFT + DPO)\n\nTraining details.\n\n## Data\n\n"
               "```bash\n# a shell comment, not a heading\n```\n")


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


@pytest.fixture()
def project(tmp_path, tiny_model_dir, monkeypatch):
    """What publish reads: models/final with merge's card, compare's and export's metrics, the
    manifest (a Hub data set), and models/export (stand-ins for the GGUF and Modelfile)."""
    final = tmp_path / "models/final"
    shutil.copytree(tiny_model_dir, final)
    (final / "README.md").write_text(MERGED_CARD)
    write_json(tmp_path / "metrics/eval.json", EVAL)
    write_json(tmp_path / "metrics/export.json", EXPORT_METRICS)
    write_json(tmp_path / "data/raw/manifest.json",
               {"sft": {"source": {"source": "hub", "id": "someone/sft-data"}}, "preference": {"source": {}}})
    (tmp_path / "models/export").mkdir()
    (tmp_path / "models/export/model-f16.gguf").write_bytes(b"GGUF stand-in")
    (tmp_path / "models/export/Modelfile").write_text("FROM ./model-f16.gguf\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_publish(**publish_params) -> str:
    from stages.publish import main

    defaults = Params().model_dump()
    defaults["publish"].update(publish_params)
    main(Params.model_validate(defaults))
    return Path("models/hub/README.md").read_text()


def headings(card: str) -> list[str]:
    return [line for line in re.sub(r"```.*?```", "", card, flags=re.DOTALL).splitlines() if line.startswith("#")]


def test_writes_the_model_files_and_a_card(project):
    run_publish()
    out = project / "models/hub"
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= files
    assert not any(p.suffix in {".bin", ".pt", ".gguf"} for p in out.iterdir())
    weights, source = out / "model.safetensors", project / "models/final/model.safetensors"
    assert weights.read_bytes() == source.read_bytes()
    assert os.path.samefile(weights, source)  # a hard link on one file system: no copy of the weights
    assert (project / "models/final/README.md").read_text() == MERGED_CARD


def test_card_metadata_and_one_top_level_heading(project):
    card = run_publish()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tiny-llama-test" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["someone/sft-data"]
    assert {"tunepipe", "sft", "dpo", "gguf"} <= set(meta["tags"])
    h1 = [h for h in headings(card) if re.match(r"# \S", h)]
    assert h1 == ["# tiny-llama-test, fine-tuned with tunepipe (SFT + DPO)"]
    assert "## Evaluation" in headings(card) and "## Data" in headings(card)
    assert "# a shell comment, not a heading" in card and "Training details." in card


def test_card_evaluation_comes_from_eval_json_with_intervals(project):
    card = run_publish()
    assert "each figure with its 90% interval" in card  # compare's confidence, as eval.json records it
    assert "| metric | final (safetensors) |" in card and "export" not in card.split("| metric |")[1].split("\n")[0]
    assert "| task accuracy | 83.3% [43.6%, 97.0%] |" in card
    assert "| ROUGE-L | 0.91 [0.8, 0.97] |" in card
    assert "| preference accuracy (summed log-prob) | 33.3% [6.2%, 79.2%] |" in card
    assert "| task accuracy of a trivial baseline: constant" in card and "26.0% [18.3%, 35.6%]" in card
    assert "perplexity" not in card  # not in eval.json: no row
    assert EVAL["headline"]["text"] in card
    assert "model-f16.gguf read back by transformers answered the same greedy tokens" in card
    assert "on 3 of 3 test prompts (max |logit difference| 0.0312, tolerance 0.2)" in card


def test_card_shows_export_beside_final_when_evaluated(project):
    write_json(project / "metrics/eval.json", {**EVAL, "models": ["base", "final", "export"], "export": EXPORTED})
    card = run_publish()
    assert "| metric | final (safetensors) | export (the GGUF read back) |" in card
    assert "| task accuracy | 83.3% [43.6%, 97.0%] | 66.7% [30.0%, 90.3%] |" in card


def test_license_null_leaves_it_out(project):
    card = run_publish(license=None)
    assert "license" not in yaml.safe_load(card.split("---")[1])


def test_missing_metrics_say_what_to_run(project):
    (project / "metrics/eval.json").unlink()
    with pytest.raises(StageError, match=r"metrics/eval.json: missing; run the earlier stages"):
        run_publish()
    assert not (project / "models/hub").exists()


def test_push_never_writes_the_token(project, monkeypatch, caplog, capsys):
    calls = []

    class FakeApi:
        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, kwargs))

    push = hub.push_to_hub
    monkeypatch.setattr(hub, "push_to_hub", lambda *args, **kwargs: push(*args, **kwargs, api=FakeApi()))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    run_publish(push_to_hub="someone/tiny-export", private=False)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder", "upload_file", "upload_file"]
    assert all(kwargs["token"] == SECRET for _, kwargs in calls)
    assert calls[0][1]["private"] is False
    assert calls[1][1]["folder_path"].endswith("models/hub")
    assert [Path(c[1]["path_or_fileobj"]).name for c in calls[2:]] == ["model-f16.gguf", "Modelfile"]
    for f in project.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    out = capsys.readouterr()
    assert SECRET not in caplog.text + out.out + out.err


def test_push_without_token_fails_before_any_upload(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(StageError, match="HF_TOKEN is not in the environment"):
        hub.push_to_hub("a/b", tmp_path, [], True, api=object())


def test_push_to_hub_param_is_validated(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("publish:\n  push_to_hub: not a repo id\n")
    with pytest.raises(Exception, match="push_to_hub must be a Hub repo id"):
        load_params(p)
    p.write_text("export:\n  push_to_hub: someone/model\n")  # moved to publish
    with pytest.raises(Exception, match="export.push_to_hub: unknown key"):
        load_params(p)
