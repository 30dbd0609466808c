"""train-dpo on the tiny model: the reference is the SFT model, metrics are logged, stale checkpoints are dropped."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.test_train_sft import interrupt_at
from tests.trainingdata import make_workdir, tiny_params


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory, tiny_model_dir, smol_tokenizer):
    """A work folder where train-sft already ran (2 steps)."""
    import os

    root = make_workdir(tmp_path_factory.mktemp("dpo"), tiny_model_dir, smol_tokenizer)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from stages import train_sft

        train_sft.main(tiny_params(train_sft={"max_steps": 2}))
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def workdir(sft_workdir, tmp_path, monkeypatch):
    work = shutil.copytree(sft_workdir, tmp_path / "work")
    shutil.rmtree(work / "models/checkpoints", ignore_errors=True)
    monkeypatch.chdir(work)
    return work


def rows(path: str) -> list[dict]:
    with open(Path("metrics/train_dpo/plots/metrics") / f"{path}.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dpo_trains_against_the_sft_model(workdir, precision):
    """In bf16 too: with the reference computed each step (the default params), the held-out check's
    generation (inference mode, under accelerate's autocast) makes the first kept weight casts
    (tunepipe.casts), which the policy's backward then uses."""
    from stages import train_dpo

    train_dpo.main(tiny_params(train_dpo={"max_steps": 3, "eval_steps": 3, "save_steps": 3, "precision": precision,
                                          "heldout_prompts": 2, "precompute_ref_log_probs": False}))

    config = json.loads(Path("models/dpo/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    metrics = json.loads(Path("metrics/train_dpo.json").read_text())
    assert metrics["steps"] == 3 and metrics["rewards_accuracies"] is not None
    assert metrics["eval_rewards_margins"] is not None
    # Step 1's rewards come from the untrained (zero) adapter: policy == reference, so the reference
    # is exactly the SFT-merged model. A reference without the SFT weights would give non-zero rewards.
    assert float(rows("train/rewards/chosen")[0]["chosen"]) == pytest.approx(0.0, abs=1e-4)
    assert float(rows("train/rewards/rejected")[0]["rejected"]) == pytest.approx(0.0, abs=1e-4)
    # and training moves the margin in the preferred direction
    assert float(rows("train/rewards/margins")[-1]["margins"]) > 0
    for name in ("train/loss", "train/rewards/accuracies", "train/learning_rate", "eval/loss", "eval/rewards/margins"):
        assert rows(name), name


def test_changed_sft_model_does_not_resume(workdir, monkeypatch, caplog):
    from stages import train_dpo

    params = tiny_params(train_dpo={"max_steps": 2, "eval_steps": 10, "save_steps": 1})
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train_dpo.main(params)
    assert (workdir / "models/checkpoints/dpo/checkpoint-1").is_dir()

    (workdir / "models/sft/NOTE.md").write_text("retrained")  # any change to an input invalidates checkpoints
    with caplog.at_level(logging.WARNING, logger="tunepipe"):
        train_dpo.main(params)
    assert "not resuming: checkpoints were written under different params/inputs" in caplog.text
    assert json.loads(Path("metrics/train_dpo.json").read_text())["resumed_from_step"] is None


def test_long_prompts_are_cut_from_the_left(smol_tokenizer):
    from datasets import Dataset

    from tunepipe.preference import fit_prompts

    long_prompt = "word " * 300 + "<|im_start|>assistant\n"
    ds = Dataset.from_list([{"prompt": long_prompt, "chosen": "a", "rejected": "b"},
                            {"prompt": "short<|im_start|>assistant\n", "chosen": "a", "rejected": "b"}])
    out = fit_prompts(ds, smol_tokenizer, 32)
    assert len(smol_tokenizer(out[0]["prompt"], add_special_tokens=False)["input_ids"]) <= 32
    assert out[0]["prompt"].endswith("<|im_start|>assistant\n")  # the end of the prompt survives
    assert out[1]["prompt"] == "short<|im_start|>assistant\n"


def test_lora_deltas_under_half_a_bf16_step_survive_autocast():
    """PEFT's bf16 sum rounds a young adapter's small delta away; keep_lora_deltas_in_fp32 keeps it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import layer

    from tunepipe.training import keep_lora_deltas_in_fp32

    torch.manual_seed(0)
    net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64)),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0))
    lora = net.base_model.model[0]
    torch.nn.init.constant_(lora.lora_B["default"].weight, 1e-5)  # delta ~1e-4, far under bf16's step at ~1
    x = torch.randn(8, 64)

    def delta(autocast=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            on = net(x)
            with net.disable_adapter():
                off = net(x)
        return (on.float() - off.float()).abs().mean().item()

    original = layer.Linear.forward
    try:
        layer.Linear.forward = getattr(original, "plain", original)
        exact = delta(autocast=False)
        assert delta() < 0.2 * exact  # PEFT's own sum: most of the adapter's effect is rounded away
        keep_lora_deltas_in_fp32()
        assert delta() == pytest.approx(exact, rel=0.05)
        torch.nn.init.zeros_(lora.lora_B["default"].weight)
        assert delta() == 0.0  # a fresh adapter: policy and reference passes agree exactly
        assert net(x).dtype == torch.float32  # outside autocast: PEFT's forward, unchanged
    finally:
        layer.Linear.forward = original
