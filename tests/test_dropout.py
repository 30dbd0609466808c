"""The CPU LoRA dropout: nn.Dropout's statistics and gradient, seeded masks, and where it is installed."""

from __future__ import annotations

import pytest


def test_drop_rate_and_mean_match_nn_dropout():
    import torch

    from tunepipe.dropout import FastDropout

    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    y = FastDropout(0.05).train()(x)
    kept = (y != 0).float().mean().item()
    # 400k Bernoulli draws: the standard error of the rate is 0.00034
    assert abs(kept - 0.95) < 0.002, kept
    assert abs(y.mean().item() - 1.0) < 0.003  # kept values are scaled by 1/(keep rate)
    values = torch.unique(y).tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(65536 / (65536 - round(0.05 * 65536)))]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_other_rates(p):
    import torch

    from tunepipe.dropout import keep_mask

    torch.manual_seed(1)
    keep, scale = keep_mask(torch.Size([300, 777]), p)  # an odd count: the last 64-bit draw is cut
    assert keep.shape == (300, 777) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - p)) < 0.005
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)


def test_gradient_is_the_mask_times_the_scale():
    import torch

    from tunepipe.dropout import FastDropout

    torch.manual_seed(2)
    x = torch.randn(8, 64, requires_grad=True)
    y = FastDropout(0.3).train()(x)
    y.backward(torch.ones_like(y))
    factor = y.detach() / x.detach()  # 0 or the scale, element by element
    assert torch.allclose(x.grad, factor)
    assert (x.grad == 0).any() and (x.grad > 1).any()


def test_same_seed_same_mask_and_eval_is_identity():
    import torch

    from tunepipe.dropout import FastDropout

    drop, x = FastDropout(0.2).train(), torch.randn(50, 50)
    torch.manual_seed(3)
    first = drop(x)
    torch.manual_seed(3)
    assert torch.equal(first, drop(x))
    assert not torch.equal(first, drop(x))  # the generator moved on
    assert torch.equal(drop.eval()(x), x)


def test_installed_in_every_lora_layer_of_the_sft_trainer(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from torch import nn
    from transformers import AutoTokenizer

    from stages.train_sft import build_trainer
    from tests.trainingdata import sft_rows, tiny_params
    from tunepipe.dropout import FastDropout
    from tunepipe.modeling import load_for_training
    from tunepipe.training import TrainingRun

    cfg = tiny_params(train_sft={"lora_dropout": 0.1}).train_sft
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = "<|endoftext|>"
    model, peft_config = load_for_training(tiny_model_dir, cfg, tokenizer, trust_remote_code=False)
    trainer = build_trainer(model, tokenizer, {"train": Dataset.from_list(sft_rows(tokenizer, 8))}, cfg, seed=0, precision="fp32",
                            padding_free=True, peft_config=peft_config, run=TrainingRun(tmp_path / "live", None),
                            output_dir=tmp_path / "ckpt")
    dropouts = [m for name, m in trainer.model.named_modules() if ".lora_dropout." in name]
    assert dropouts and all(type(m) is FastDropout and m.p == cfg.lora_dropout for m in dropouts)
    assert not any(type(m) is nn.Dropout for m in dropouts)


def test_online_trainer_installs_it_too(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from tests.trainingdata import templated_rows, tiny_params
    from tunepipe.dropout import FastDropout
    from tunepipe.modeling import load_for_training
    from tunepipe.online import Rewards, build_online_trainer, prompt_dataset
    from tunepipe.training import TrainingRun

    cfg = tiny_params(train_dpo={"algorithm": "grpo", "lora_dropout": 0.1, "max_steps": 1, "batch_size": 2,
                                 "num_generations": 2, "max_completion_length": 2}).train_dpo
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = "<|endoftext|>"
    model, peft_config = load_for_training(tiny_model_dir, cfg, tokenizer, trust_remote_code=False)
    prompts = prompt_dataset(templated_rows(tokenizer, "train", 4), tokenizer)
    trainer = build_online_trainer("grpo", model, tokenizer, {"train": prompts}, cfg, seed=0, precision="fp32",
                                   peft_config=peft_config, run=TrainingRun(tmp_path / "live", None),
                                   rewards=Rewards("checker", with_checker=True), output_dir=tmp_path / "ckpt")
    dropouts = [m for name, m in trainer.model.named_modules() if ".lora_dropout." in name]
    assert dropouts and all(type(m) is FastDropout for m in dropouts)


@pytest.mark.parametrize("p, replaced", [(1e-6, False), (0.05, True), (1 - 1e-6, False)])
def test_rates_the_16_bit_uniforms_cannot_draw_keep_nn_dropout(p, replaced):
    from torch import nn

    from tunepipe.dropout import FastDropout, use_fast_lora_dropout

    layer = nn.Module()
    layer.lora_dropout = nn.ModuleDict({"default": nn.Dropout(p)})
    assert use_fast_lora_dropout(layer) == int(replaced)
    assert type(layer.lora_dropout["default"]) is (FastDropout if replaced else nn.Dropout)
