"""params.yaml validation: every mistake names file, line, key and what is allowed."""

import subprocess
import sys

import pytest
import yaml
from pydantic import BaseModel

from tunepipe.params import Params, ParamsError, load_params

REPO_PARAMS = "params.yaml"


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def schema_keys_missing(model: type, raw: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the schema ``model`` that the mapping ``raw`` does not spell out."""
    missing = []
    for name, field in model.model_fields.items():
        if name not in raw:
            missing.append(prefix + name)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += schema_keys_missing(field.annotation, raw[name] or {}, f"{prefix}{name}.")
    return missing


def test_repo_params_validate_and_spell_out_every_schema_key():
    # No default hidden in code reaches a result: every key DVC could track is in the file
    # (and `dvc exp run -S fetch.sft.path=...` needs the key to exist to set it).
    params = load_params(REPO_PARAMS)
    raw = yaml.safe_load(open(REPO_PARAMS))
    assert schema_keys_missing(Params, raw) == []
    assert params.shared.trust_remote_code is False


def test_the_completeness_check_notices_a_missing_key():
    raw = yaml.safe_load(open(REPO_PARAMS))
    del raw["train_sft"]["weight_decay"], raw["fetch"]["sft"]["path"]
    assert schema_keys_missing(Params, raw) == ["fetch.sft.path", "train_sft.weight_decay"]


def test_unknown_key_names_path_line_and_suggestion(tmp_path):
    p = write(tmp_path, "train_sft:\n  max_steps: 5\n  lora_rr: 8\n")
    with pytest.raises(ParamsError) as exc:
        load_params(p)
    assert f"{p}:3: train_sft.lora_rr: unknown key; did you mean lora_r?" in str(exc.value)


def test_nested_unknown_key(tmp_path):
    p = write(tmp_path, "shared:\n  base_model:\n    revison: abc\n")
    with pytest.raises(ParamsError, match=r":3: shared\.base_model\.revison: unknown key; did you mean revision\?"):
        load_params(p)


def test_unknown_section(tmp_path):
    p = write(tmp_path, "evaluat:\n  batch_size: 2\n")
    with pytest.raises(ParamsError, match="evaluat: unknown key; did you mean evaluate"):
        load_params(p)


@pytest.mark.parametrize("section,key,value,expect", [
    ("train_sft", "lora_r", -4, "greater than 0"),
    ("train_dpo", "beta", 0, "greater than 0"),
    ("train_sft", "learning_rate", 0, "greater than 0"),
    ("train_sft", "batch_size", "eight", "valid integer"),
    ("template", "kind", "vicuna", "'alpaca' or 'chat'"),
    ("evaluate", "top_p", 1.5, "less than or equal to 1"),
])
def test_wrong_type_or_range_names_key_and_value(tmp_path, section, key, value, expect):
    extra = "\n  max_steps: 5" if section.startswith("train") else ""
    p = write(tmp_path, f"{section}:{extra}\n  {key}: {value!r}\n".replace("'", ""))
    with pytest.raises(ParamsError) as exc:
        load_params(p)
    msg = str(exc.value)
    assert f"{section}.{key}" in msg and expect in msg and repr(value).strip("'") in msg


def test_conflicting_epochs_and_max_steps(tmp_path):
    p = write(tmp_path, "train_sft:\n  epochs: 1\n  max_steps: 10\n")
    with pytest.raises(ParamsError, match="train_sft.*exactly one of 'epochs' and 'max_steps'"):
        load_params(p)


def test_dpo_prompt_length_must_fit(tmp_path):
    p = write(tmp_path, "train_dpo:\n  max_length: 128\n  max_prompt_length: 256\n")
    with pytest.raises(ParamsError, match="max_prompt_length must be below max_length"):
        load_params(p)


@pytest.mark.parametrize("text,expect", [
    ("train_sft:\n  method: qlora\n  num_processes: 2\n  distributed: fsdp\n",
     r"train_sft.*'qlora' with distributed 'fsdp' is not supported; use 'ddp'"),
    ("train_dpo:\n  num_processes: 2\n  precompute_ref_log_probs: true\n",
     r"train_dpo.*precompute_ref_log_probs needs num_processes 1"),
    ("train_sft:\n  distributed: deepspeed\n", r":2: train_sft\.distributed: .*deepspeed_zero2"),
])
def test_distributed_conflicts_are_refused(tmp_path, text, expect):
    with pytest.raises(ParamsError, match=expect):
        load_params(write(tmp_path, text))


def test_source_requirements(tmp_path):
    p = write(tmp_path, "fetch:\n  sft:\n    source: local\n")
    with pytest.raises(ParamsError, match="source=local needs 'path'"):
        load_params(p)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "train_sft: [\n"))
    with pytest.raises(ParamsError, match="cannot read params file"):
        load_params(tmp_path / "nope.yaml")


def test_stage_exits_2_with_message_before_heavy_imports(tmp_path):
    p = write(tmp_path, "train_sft:\n  max_steps: 5\n  lora_rr: 8\n")
    code = ("import sys; from tunepipe.cli import run_stage; "
            "run_stage('doc', lambda params: None, ['--params', sys.argv[1]]); "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "train_sft.lora_rr: unknown key; did you mean lora_r?" in out.stderr
