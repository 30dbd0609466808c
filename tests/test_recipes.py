"""GPU recipes and distributed-training configs: valid, complete, pinned, and still the course's values.

No Hub access and no GPU: recipes are checked against the params schema, and the
accelerate configs are run through accelerate's own launch-time validation and
plugin construction (what `accelerate launch` does before it starts workers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tunepipe.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def recipe(name: str) -> Params:
    return load_params(REPO / "recipes" / name)


def test_recipes_folder_is_not_empty():
    assert len(RECIPES) >= 3


# --------------------------------------------------------------------------- every recipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_spells_out_every_section(path):
    params = load_params(path)
    raw = yaml.safe_load(path.read_text())
    # A missing section would silently fall back to the CPU default run's values.
    assert set(raw) == set(Params.model_fields)
    assert params.shared.trust_remote_code is False


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_pins_every_hub_model_and_data_set(path):
    params = load_params(path)
    base = params.shared.base_model
    assert base.source == "hub" and base.revision, f"{path.name}: base model not pinned"
    for name in ("sft", "preference"):
        source = getattr(params.fetch, name)
        assert source.source == "hub", f"{path.name}: fetch.{name} is not a Hub data set"
        assert source.revision, f"{path.name}: fetch.{name} ({source.id}) has no pinned revision"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_documents_its_one_command_run(path):
    assert f"cp recipes/{path.name} params.yaml && dvc repro" in path.read_text()


# --------------------------------------------------------------------------- the course values


def test_tinyllama_recipe_keeps_the_course_qlora_settings():
    p = recipe("tinyllama-qlora-ultrachat-orca-dpo.yaml")
    assert p.shared.base_model.name == "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
    sft = p.train_sft
    assert (sft.method, sft.lora_r, sft.lora_alpha, sft.lora_dropout) == ("qlora", 64, 32, 0.1)
    assert set(sft.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (sft.bnb_4bit_quant_type, sft.bnb_4bit_use_double_quant, sft.bnb_4bit_compute_dtype) == \
        ("nf4", True, "float16")
    assert (sft.optim, sft.learning_rate, sft.lr_scheduler) == ("paged_adamw_32bit", 2e-4, "cosine")
    assert (sft.epochs, sft.max_steps, sft.batch_size, sft.grad_accum) == (1, None, 2, 4)
    assert p.tokenize.max_length == 512 and p.template.kind == "chat"
    assert p.template.chat_template == "chatml"  # the base model has no chat template of its own


def test_tinyllama_recipe_samples_3000_ultrachat_conversations():
    sft = recipe("tinyllama-qlora-ultrachat-orca-dpo.yaml").fetch.sft
    assert (sft.id, sft.split, sft.format, sft.max_rows) == \
        ("HuggingFaceH4/ultrachat_200k", "train_sft", "messages", 3000)


def test_tinyllama_recipe_filters_orca_pairs_as_the_course_does():
    pref = recipe("tinyllama-qlora-ultrachat-orca-dpo.yaml").fetch.preference
    assert (pref.id, pref.format) == ("argilla/distilabel-intel-orca-dpo-pairs", "preference")
    filters = {(f.field, f.op, f.value) for f in pref.filters}
    assert filters == {("status", "ne", "tie"), ("chosen_score", "ge", 8), ("in_gsm8k_train", "eq", False)}
    assert pref.fields == {"instruction": "input", "system": "system", "chosen": "chosen", "rejected": "rejected"}


def test_tinyllama_recipe_keeps_the_course_dpo_settings():
    dpo = recipe("tinyllama-qlora-ultrachat-orca-dpo.yaml").train_dpo
    assert (dpo.beta, dpo.learning_rate, dpo.max_steps, dpo.warmup_ratio, dpo.max_length) == \
        (0.1, 1e-5, 200, 0.1, 512)
    assert dpo.epochs is None


def test_pythia_recipe_is_a_full_fine_tune_in_the_alpaca_template():
    p = recipe("pythia-70m-alpaca-full.yaml")
    assert p.shared.base_model.name == "EleutherAI/pythia-70m"
    assert p.train_sft.method == "full" and p.template.kind == "alpaca"
    assert (p.fetch.sft.id, p.fetch.sft.format) == ("tatsu-lab/alpaca", "alpaca")
    # GPT-NeoX layer names: the Llama defaults would match nothing in Pythia.
    assert "query_key_value" in p.train_dpo.target_modules


def test_qwen_recipe_uses_ultrafeedback_sft_and_preference_splits():
    p = recipe("qwen2.5-0.5b-instruct-ultrafeedback.yaml")
    assert p.shared.base_model.name == "Qwen/Qwen2.5-0.5B-Instruct"
    sft, pref = p.fetch.sft, p.fetch.preference
    assert sft.id == pref.id == "HuggingFaceH4/ultrafeedback_binarized"
    assert (sft.split, sft.format) == ("train_sft", "messages")
    assert (pref.split, pref.format) == ("train_prefs", "preference")
    # train_sft and train_prefs share prompts: both roles test on the data set's own held-out splits
    assert (sft.test_split, pref.test_split) == ("test_sft", "test_prefs")
    assert p.train_sft.method == p.train_dpo.method == "lora"


# --------------------------------------------------------------------------- accelerate configs


def test_every_distributed_strategy_has_a_config():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= names


def launch_env(config: Path, num_processes: int = 4) -> tuple[object, dict]:
    """What `accelerate launch --config_file CONFIG --num_processes N -m stages.train_sft`
    resolves before starting workers: the parsed args and the workers' environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(config), "--num_processes", str(num_processes), "-m", "stages.train_sft"]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    if not args.use_deepspeed:
        return args, prepare_multi_gpu_env(args)
    # as accelerate's launch_command does before calling the DeepSpeed launcher
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args, prepare_deepspeed_cmd_env(args)[1]


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_num_processes_is_set_at_launch(config, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.chdir(REPO)  # deepspeed_config_file paths are relative to the repo root, like dvc's cwd
    load_config_from_file(str(config))  # rejects unknown keys
    args, env = launch_env(config, num_processes=4)
    assert args.num_processes == 4
    # Precision lives in params (TrainingArguments bf16/fp16); the config must not force it.
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_ddp_config_launches_multi_gpu():
    args, env = launch_env(REPO / "configs/accelerate/ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed


def test_fsdp_config_builds_a_transformer_wrapping_fsdp2_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, env = launch_env(REPO / "configs/accelerate/fsdp.yaml")
    assert args.use_fsdp
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_builds_a_plugin_with_its_zero_stage(stage, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(REPO)
    args, env = launch_env(REPO / f"configs/accelerate/deepspeed_zero{stage}.yaml")
    assert args.use_deepspeed
    ds_json = json.loads(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
    # batch sizes, accumulation and precision come from the stage's params via "auto"
    assert ds_json["train_micro_batch_size_per_gpu"] == ds_json["gradient_accumulation_steps"] == "auto"
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()  # raises on fields that clash with the JSON
    assert plugin.zero_stage == stage
    assert plugin.zero3_init_flag == (stage == 3)
