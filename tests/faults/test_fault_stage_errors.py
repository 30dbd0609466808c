"""Faults a user meets without a crash: disk full, unwritable outputs, damaged models, unsafe weights, bad data.

Each one runs through a stage's real entry point (``run_stage``, as ``python -m
stages.X`` does) and must end in one clear message and exit code 2, with the
previous output untouched and no half-written file left behind. What the unit
tests already cover (tests/test_params.py, test_formats.py, test_tokenize.py,
test_modeling.py, test_templates.py) is not repeated here.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.test_tokenize import canonical
from tunepipe.artifacts import atomic_path, sha256_tree, write_json
from tunepipe.cli import StageError, run_stage


def stage_exit(module, params: dict, capsys) -> str:
    """Run a stage as its CLI does; assert it stops with exit code 2; return stderr."""
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(SystemExit) as stopped:
        run_stage(module.__doc__, module.main, argv=["--params", "params.yaml"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert "Traceback" not in err
    return err


def leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob(".tmp-*"))


def disk_full_after(monkeypatch, module, name: str, calls: int) -> None:
    """``module.name`` raises ENOSPC (as write() does on a full disk) from its ``calls``-th call on."""
    original, seen = getattr(module, name), []

    def failing(*args, **kwargs):
        seen.append(1)
        if len(seen) >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


# --------------------------------------------------------------------------- disk full / unwritable


def test_disk_full_inside_atomic_path_leaves_the_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "out" / "metrics.json"
    write_json(target, {"loss": 1.0})
    before = target.read_bytes()
    disk_full_after(monkeypatch, Path, "write_text", 1)
    with pytest.raises(OSError) as exc:
        write_json(target, {"loss": 2.0})
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)  # names the output
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_disk_full_midway_through_a_folder_keeps_the_old_folder(tmp_path):
    target = tmp_path / "data" / "tokenized"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(OSError):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "a.txt").write_text("new, half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


@pytest.fixture
def raw_project(tmp_path, monkeypatch, smol_tokenizer_dir):
    """data/raw with the base model's tokenizer, for the template and tokenize stages."""
    shutil.copytree(smol_tokenizer_dir, tmp_path / "data/raw/tokenizer")
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True, exist_ok=True)
    sft = [canonical(i) for i in range(6)]
    pref = [{**canonical(i), "chosen": "ok", "rejected": "no no no"} for i in range(4)]
    for split in ("train", "val", "test"):
        (raw / f"sft_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
        (raw / f"pref_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_template_stage_on_a_full_disk_says_so_and_keeps_the_previous_output(raw_project, monkeypatch, capsys):
    from stages import template
    from tunepipe.params import Params

    template_params = Params()
    template.main(template_params)
    before = sha256_tree(raw_project / "data/templated")
    disk_full_after(monkeypatch, json, "dumps", 5)  # a few rows in, as a real disk fills up
    err = stage_exit(template, template_params.model_dump(mode="json"), capsys)
    assert "No space left on device" in err and "data/" in err and "nothing was damaged" in err
    assert sha256_tree(raw_project / "data/templated") == before
    assert leftovers(raw_project) == []


def test_tokenize_stage_with_an_unwritable_output_folder(raw_project, monkeypatch, capsys):
    """What a read-only parent folder (or a read-only mount) does to the stage: EACCES when creating the temp."""
    import tempfile

    from stages import template, tokenize
    from tunepipe.params import Params

    template.main(Params())

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    err = stage_exit(tokenize, Params().model_dump(mode="json"), capsys)
    assert "error: data: Permission denied" in err
    assert not (raw_project / "data/tokenized").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_parent_folder_for_real(raw_project, capsys):
    from stages import template
    from tunepipe.params import Params

    data = raw_project / "data"
    data.chmod(0o555)
    try:
        err = stage_exit(template, Params().model_dump(mode="json"), capsys)
    finally:
        data.chmod(0o755)
    assert "Permission denied" in err and not (data / "templated").exists()


# --------------------------------------------------------------------------- bad data through the stages


def test_a_damaged_templated_file_names_file_and_line(raw_project, capsys):
    from stages import template, tokenize
    from tunepipe.params import Params

    template.main(Params())
    path = raw_project / "data/templated/sft_train.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + b"\n"  # a hand edit or a copy cut short
    path.write_bytes(b"".join(lines))
    err = stage_exit(tokenize, Params().model_dump(mode="json"), capsys)
    assert "data/templated/sft_train.jsonl:3: malformed JSON" in err
    assert not (raw_project / "data/tokenized").exists()


def test_non_utf8_raw_data_names_file_and_line(raw_project, capsys):
    from stages import template
    from tunepipe.params import Params

    path = raw_project / "data/raw/pref_val.jsonl"
    path.write_bytes(path.read_bytes() + b'{"id": "x", "instruction": "caf\xe9"}\n')
    err = stage_exit(template, Params().model_dump(mode="json"), capsys)
    assert "data/raw/pref_val.jsonl:5: not UTF-8" in err
    assert not (raw_project / "data/templated").exists()


def _fetch_params(base: Path, **fetch) -> dict:
    sizes = dict(n_train=8, n_val=4, n_test=4, n_pref_train=8, n_pref_val=4, n_pref_test=4)
    return {"shared": {"base_model": {"source": "local", "path": str(base), "name": "tiny"}},
            "fetch": {"generated": sizes, **fetch}}


def test_fetch_skips_and_counts_every_kind_of_bad_row(tmp_path, monkeypatch, tiny_model_dir, capsys):
    from stages import fetch

    good = [{"instruction": f"Say {i}", "output": str(i)} for i in range(12)]
    bad = [{"instruction": "no output"}, {"instruction": "", "output": "x"}, {"instruction": 3, "output": "x"},
           good[0]]
    pairs = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(12)]
    pairs.append({"prompt": "q", "chosen": "same", "rejected": "same"})
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    monkeypatch.chdir(tmp_path)
    sources = dict(sft={"source": "local", "path": "sft.jsonl", "format": "alpaca"},
                   preference={"source": "local", "path": "pref.jsonl", "format": "preference"})

    err = stage_exit(fetch, _fetch_params(tiny_model_dir, **sources), capsys)
    assert "sft.jsonl row 13: missing field 'output'" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()

    Path("params.yaml").write_text(yaml.safe_dump(_fetch_params(tiny_model_dir, on_bad_row="skip", **sources)))
    run_stage(fetch.__doc__, fetch.main, argv=["--params", "params.yaml"])
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text())
    assert manifest["sft"]["rows"]["skipped"] == {"missing_field": 1, "empty_text": 1, "wrong_type": 1,
                                                  "duplicate": 1}
    assert manifest["preference"]["rows"]["skipped"] == {"chosen_equals_rejected": 1}
    assert manifest["sft"]["rows"]["kept"] == 12 and manifest["preference"]["rows"]["kept"] == 12


# --------------------------------------------------------------------------- damaged or unsafe models


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    return shutil.copytree(tiny_model_dir, tmp_path / "base_src")


def test_fetch_refuses_a_truncated_local_model_naming_the_file(model_copy, tmp_path, monkeypatch, capsys):
    from stages import fetch

    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    monkeypatch.chdir(tmp_path)
    err = stage_exit(fetch, _fetch_params(model_copy), capsys)
    assert f"{weights}: " in err and "truncated" in err
    assert not (tmp_path / "models/base").exists()


def test_fetch_refuses_pickled_weights(model_copy, tmp_path, monkeypatch, capsys):
    """A folder with only pytorch_model.bin is refused before anything unpickles it."""
    import torch

    from stages import fetch

    (model_copy / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, model_copy / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called on pickled weights"))
    monkeypatch.chdir(tmp_path)
    err = stage_exit(fetch, _fetch_params(model_copy), capsys)
    assert "pytorch_model.bin" in err and "only safetensors" in err


def test_remote_code_is_never_run_unless_params_allow_it(model_copy, tmp_path, monkeypatch, capsys):
    from stages import fetch

    marker = tmp_path / "remote_code_ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig\n"
    (model_copy / "configuration_evil.py").write_text(code)
    config = json.loads((model_copy / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (model_copy / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    err = stage_exit(fetch, _fetch_params(model_copy), capsys)
    assert "custom code" in err and "shared.trust_remote_code: true" in err
    assert not marker.exists()


def test_train_sft_stops_on_a_damaged_base_model_before_training(tmp_path, monkeypatch, tiny_model_dir,
                                                                 smol_tokenizer, capsys):
    from stages import train_sft
    from tests.trainingdata import make_workdir, tiny_params

    make_workdir(tmp_path, tiny_model_dir, smol_tokenizer)
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "models/base/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    err = stage_exit(train_sft, tiny_params().model_dump(mode="json"), capsys)
    assert "models/base/model.safetensors: " in err and "truncated" in err
    assert not (tmp_path / "models/sft").exists()
    assert not list((tmp_path / "models/checkpoints/sft").glob("checkpoint-*"))


def test_qlora_without_bitsandbytes_stops_before_loading_the_model(tmp_path, monkeypatch, tiny_model_dir,
                                                                   smol_tokenizer):
    """4-bit needs bitsandbytes (0.50 also runs 4-bit on CPU, so CPU alone is allowed: see test_train_sft)."""
    import importlib.util

    from stages import train_sft
    from tests.trainingdata import make_workdir, tiny_params
    from tunepipe import modeling

    make_workdir(tmp_path, tiny_model_dir, smol_tokenizer)
    monkeypatch.chdir(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(StageError, match="method: qlora needs the bitsandbytes package"):
        train_sft.main(tiny_params(train_sft={"method": "qlora"}))
