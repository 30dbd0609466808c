"""tunepipe.modeling: safe loading, LoRA/QLoRA setup from params, precision choice, adapter merging."""

from __future__ import annotations

import shutil

import pytest

from tests.trainingdata import tiny_params
from tunepipe.cli import StageError


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_truncated_safetensors_is_a_clear_error(model_copy):
    from tunepipe.modeling import load_model

    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(StageError, match=r"model\.safetensors: (corrupt or )?truncated"):
        load_model(model_copy)


def test_garbage_safetensors_is_a_clear_error(model_copy):
    from tunepipe.modeling import load_model

    (model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(StageError, match=r"model\.safetensors: corrupt"):
        load_model(model_copy)


def test_pickle_weights_are_refused(model_copy):
    from tunepipe.modeling import load_model

    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(StageError, match="only safetensors weights are loaded"):
        load_model(model_copy)


def test_lora_and_qlora_configs_follow_params():
    import torch

    from tunepipe.modeling import lora_config, quantization_config

    cfg = tiny_params(train_sft={"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                                 "target_modules": ["q_proj", "v_proj"]}).train_sft
    lora = lora_config(cfg)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.1)
    assert set(lora.target_modules) == {"q_proj", "v_proj"} and lora.task_type == "CAUSAL_LM"
    bnb = quantization_config(cfg)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16


def test_precision_auto_follows_the_measurement(monkeypatch):
    """The probe itself is tested in tests/test_precision.py; here resolve_precision follows it."""
    import torch

    from tunepipe import modeling, precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_choice", lambda shapes: {"precision": "fp32", "source": "probe"})
    assert modeling.resolve_precision("auto") == "fp32"  # bf16 measured slower here
    monkeypatch.setattr(precision, "cpu_choice", lambda shapes: {"precision": "bf16", "source": "probe"})
    assert modeling.resolve_precision("auto") == "bf16"
    assert modeling.resolve_precision("fp32") == "fp32"
    with pytest.raises(StageError, match="fp16 needs a CUDA GPU"):
        modeling.resolve_precision("fp16")


def test_adapters_change_outputs_and_merge_in_order(tmp_path, tiny_model_dir):
    """Two adapters saved from training stages compose: merged weights == both adapters applied."""
    import torch
    from peft import PeftModel, get_peft_model

    from tunepipe.modeling import load_model, lora_config, with_adapters_merged

    cfg = tiny_params().train_sft
    ids = torch.tensor([[1, 520, 33, 1810, 2, 198, 41, 7]])
    with torch.no_grad():
        base_logits = load_model(tiny_model_dir)(input_ids=ids).logits

    dirs = []
    for i in range(2):  # stage i trains on top of stage i-1 merged, like train-dpo on the SFT model
        torch.manual_seed(i)
        model = with_adapters_merged(load_model(tiny_model_dir), dirs)
        peft = get_peft_model(model, lora_config(cfg))
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # stands in for training: LoRA starts as a no-op
                p.data.normal_(0, 0.5)
        peft.save_pretrained(tmp_path / f"adapter{i}")
        dirs.append(tmp_path / f"adapter{i}")

    merged = with_adapters_merged(load_model(tiny_model_dir), dirs)
    stacked = PeftModel.from_pretrained(load_model(tiny_model_dir), dirs[0], adapter_name="a0")
    stacked.load_adapter(dirs[1], adapter_name="a1")
    stacked.base_model.set_adapter(["a0", "a1"], inference_mode=True)
    with torch.no_grad():
        merged_logits, stacked_logits = merged(input_ids=ids).logits, stacked(input_ids=ids).logits
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapters do something
    assert torch.allclose(merged_logits, stacked_logits, atol=1e-4)


def test_not_an_adapter_is_refused(tiny_model_dir):
    from tunepipe.modeling import load_model, with_adapters_merged

    with pytest.raises(StageError, match="not a PEFT adapter folder"):
        with_adapters_merged(load_model(tiny_model_dir), [tiny_model_dir])
