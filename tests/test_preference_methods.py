"""The alignment stage's other methods on the tiny model: KTO (from pairs and from unpaired
thumbs up/down data), ORPO (no reference model), and DoRA / rsLoRA adapters through training and merge."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.test_train_dpo import sft_workdir, workdir  # noqa: F401  (fixtures: a folder where train-sft ran)
from tests.trainingdata import make_workdir, tiny_params, unpaired_source, write_unpaired_pref
from tunepipe.cli import StageError


def _in(folder: Path, action):
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return action()
    finally:
        os.chdir(cwd)


def metrics() -> dict:
    return json.loads(Path("metrics/train_dpo.json").read_text())


def plotted(name: str) -> list[dict]:
    with open(Path("metrics/train_dpo/plots/metrics") / f"{name}.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# --------------------------------------------------------------------------- KTO


def test_kto_trains_from_pairs_split_into_good_and_bad_rows(workdir):
    from stages import train_dpo

    train_dpo.main(tiny_params(train_dpo={"algorithm": "kto", "max_steps": 3, "eval_steps": 3, "save_steps": 3}))

    assert json.loads(Path("models/dpo/adapter_config.json").read_text())["peft_type"] == "LORA"
    m = metrics()
    assert m["algorithm"] == "kto" and m["steps"] == 3 and m["train_loss"] is not None
    # 8 pairs -> 16 rows, one good and one bad answer per prompt: balanced, so TRL's default weights
    assert (m["train_rows"], m["desirable_rows"], m["undesirable_rows"]) == (16, 8, 8)
    assert m["desirable_weight"] == m["undesirable_weight"] == 1.0
    assert {"kl", "rewards_chosen", "rewards_rejected", "logps_chosen", "eval_kl", "eval_rewards_margins"} <= set(m)
    assert "rewards_accuracies" not in m and "loss_type" not in m and "train_pairs" not in m
    # the reference is the SFT model: the untrained adapter's rewards are 0
    assert float(plotted("train/rewards/chosen")[0]["chosen"]) == pytest.approx(0.0, abs=1e-4)
    assert plotted("train/loss") and plotted("eval/loss")


def test_unpaired_rows_hold_both_answers_of_every_pair_shuffled():
    from datasets import Dataset

    from tunepipe.preference import unpaired_rows

    pairs = Dataset.from_list([{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(20)])
    rows = unpaired_rows(pairs, seed=3)
    assert rows.column_names == ["prompt", "completion", "label"] and len(rows) == 40
    assert sorted((r["prompt"], r["completion"], r["label"]) for r in rows) == sorted(
        [(f"p{i}", f"good{i}", True) for i in range(20)] + [(f"p{i}", f"bad{i}", False) for i in range(20)])
    # KTO reads rows in order and estimates its KL term within a batch: the classes must be mixed
    assert rows["label"][:20] != [True] * 20
    assert rows["completion"] == unpaired_rows(pairs, seed=3)["completion"]  # seeded: the same order again


def test_kto_weights_balance_the_two_classes():
    from tunepipe.preference import balanced_weights

    assert balanced_weights([True] * 5 + [False] * 5) == (1.0, 1.0)
    assert balanced_weights([True] * 2 + [False] * 6) == (3.0, 1.0)
    assert balanced_weights([True] * 6 + [False] * 2) == (1.0, 3.0)
    with pytest.raises(StageError, match="no undesirable"):
        balanced_weights([True] * 4)


def test_kto_trains_on_unpaired_data_with_balanced_weights(workdir, smol_tokenizer):
    from stages import train_dpo

    write_unpaired_pref(workdir, smol_tokenizer, n_good=6, n_bad=2)
    train_dpo.main(tiny_params(train_dpo={"algorithm": "kto", "max_steps": 2, "eval_steps": 2}))
    m = metrics()
    assert (m["train_rows"], m["desirable_rows"], m["undesirable_rows"]) == (8, 6, 2)
    # the rarer bad answers weigh 3x: both classes count as much in the loss (KTO paper, eq. 8)
    assert (m["desirable_weight"], m["undesirable_weight"]) == (1.0, 3.0)
    assert Path("models/dpo/adapter_model.safetensors").is_file()


def test_kto_trains_on_a_thumbs_up_and_down_file(tmp_path, monkeypatch, tiny_model_dir):
    """fetch.preference.format unpaired, from the file through fetch, template and tokenize into KTO."""
    from stages import fetch, template, tokenize, train_dpo, train_sft
    from tests.test_fetch import _params_file
    from tunepipe.params import load_params

    labels = [True, "down", 1, "BAD", "good", 0, "up", "false"]
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(
        {"question": f"Spell the number {i}.", "answer": f"number {i}" if i % 3 else f"{i}?", "thumbs": label}) + "\n"
        for i, label in enumerate(labels * 3)))
    params = load_params(_params_file(tmp_path, tiny_model_dir))
    source = unpaired_source(tmp_path / "kto.jsonl", fields={"prompt": "question", "completion": "answer",
                                                             "label": "thumbs"})
    params = params.model_copy(update={"fetch": params.fetch.model_copy(update={"preference": source})})
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    fetch.main(params)
    template.main(params)
    tokenize.main(params)
    assert json.loads(Path("data/tokenized/info.json").read_text())["preference_kind"] == "unpaired"

    small = tiny_params(train_sft={"max_steps": 1}, train_dpo={"algorithm": "kto", "max_steps": 2, "eval_steps": 2})
    train_sft.main(small)
    train_dpo.main(small)
    m = metrics()
    written = json.loads(Path("data/raw/manifest.json").read_text())["files"]["pref_train.jsonl"]["rows"]
    assert m["algorithm"] == "kto" and m["train_rows"] == written and m["steps"] == 2
    assert m["desirable_rows"] + m["undesirable_rows"] == written and m["undesirable_rows"] > 0
    assert Path("models/dpo/adapter_model.safetensors").is_file()


@pytest.mark.parametrize("algorithm", ["dpo", "orpo"])
@pytest.mark.parametrize("said_by", ["info.json", "the data"])
def test_pair_methods_on_unpaired_data_name_the_fix(workdir, smol_tokenizer, algorithm, said_by):
    from stages import train_dpo

    write_unpaired_pref(workdir, smol_tokenizer, n_good=2, n_bad=2)
    if said_by == "the data":  # an info.json from before preference_kind: the columns still tell
        info = json.loads(Path("data/tokenized/info.json").read_text())
        del info["preference_kind"], info["preference_pairs"]
        Path("data/tokenized/info.json").write_text(json.dumps(info))
    with pytest.raises(StageError, match=f"algorithm={algorithm} needs preference pairs.*train_dpo.algorithm=kto"):
        train_dpo.main(tiny_params(train_dpo={"algorithm": algorithm}))
    assert not Path("models/dpo").exists()


# --------------------------------------------------------------------------- ORPO


def spy_on(monkeypatch, algorithm: str) -> list:
    """Record the ref_model the stage hands the trainer of ``algorithm``."""
    from stages import train_dpo

    seen, build = [], train_dpo.TRAINERS[algorithm]

    def spy(model, ref_model, *args, **kwargs):
        seen.append(ref_model)
        return build(model, ref_model, *args, **kwargs)

    monkeypatch.setitem(train_dpo.TRAINERS, algorithm, spy)
    return seen


def test_orpo_trains_an_adapter_without_a_reference(workdir, monkeypatch):
    from stages import train_dpo

    seen = spy_on(monkeypatch, "orpo")
    train_dpo.main(tiny_params(train_dpo={"algorithm": "orpo", "max_steps": 2, "eval_steps": 2}))

    assert seen == [None]
    assert json.loads(Path("models/dpo/adapter_config.json").read_text())["peft_type"] == "LORA"
    m = metrics()
    assert m["algorithm"] == "orpo" and m["train_pairs"] == 8 and m["beta"] == 0.1
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards_accuracies", "eval_nll_loss"} <= set(m)
    assert m["trained_tokens"] > 0 and m["tokens_per_second"] > 0  # counted from its chosen and rejected rows
    assert plotted("train/loss") and plotted("train/rewards/margins")


def test_orpo_full_fine_tuning_builds_no_reference_copy(workdir, monkeypatch):
    """Where DPO and KTO keep a frozen copy of the SFT model (method full, no precomputing), ORPO keeps none."""
    from stages import train_dpo

    seen = spy_on(monkeypatch, "orpo")
    train_dpo.main(tiny_params(train_dpo={"algorithm": "orpo", "method": "full", "max_steps": 1,
                                          "learning_rate": 1e-3, "precompute_ref_log_probs": False}))
    assert seen == [None] and Path("models/dpo/config.json").is_file()


def test_orpo_adds_no_bos_the_tokenizer_does_not(tiny_model_dir, smol_tokenizer, tmp_path):
    """TRL's ORPO prepends the BOS to every prompt without one; SmolLM2's tokenizer never adds it."""
    from datasets import Dataset

    from tunepipe.modeling import load_model, prepare_for_training
    from tunepipe.preference import build_orpo_trainer
    from tunepipe.training import TrainingRun

    cfg = tiny_params(train_dpo={"algorithm": "orpo"}).train_dpo
    alpaca = "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    chat = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)  # starts with <|im_start|>, the BOS
    data = {"train": Dataset.from_list([{"prompt": p, "chosen": "5", "rejected": "6"} for p in (alpaca, chat)])}
    model, peft_config = prepare_for_training(load_model(tiny_model_dir), cfg)
    trainer = build_orpo_trainer(model, None, smol_tokenizer, data, cfg, seed=0, precision="fp32",
                                 peft_config=peft_config, run=TrainingRun(tmp_path / "live", None),
                                 output_dir=tmp_path / "ckpt")
    for row, prompt in zip(trainer.train_dataset, (alpaca, chat)):
        assert row["prompt_input_ids"] == smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert row["chosen_input_ids"][-2:] == [smol_tokenizer("5", add_special_tokens=False)["input_ids"][0],
                                               smol_tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="without a reference model"):
        build_orpo_trainer(model, model, smol_tokenizer, data, cfg, seed=0, precision="fp32", peft_config=None,
                           run=TrainingRun(tmp_path / "live", None), output_dir=tmp_path / "ckpt")


# --------------------------------------------------------------------------- DoRA and rsLoRA


@pytest.fixture(scope="module")
def dora_workdir(tmp_path_factory, tiny_model_dir, smol_tokenizer):
    """train-sft and train-dpo with DoRA adapters (2 steps each, a high learning rate so they matter)."""
    from stages import train_dpo, train_sft

    root = make_workdir(tmp_path_factory.mktemp("dora"), tiny_model_dir, smol_tokenizer)
    params = tiny_params(train_sft={"max_steps": 2, "learning_rate": 0.05, "use_dora": True},
                         train_dpo={"max_steps": 2, "learning_rate": 0.05, "use_dora": True})
    _in(root, lambda: (train_sft.main(params), train_dpo.main(params)))
    return root


def test_dora_adapters_train_and_merge_within_the_check(dora_workdir, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stages import merge
    from tunepipe.modeling import load_merged

    work = shutil.copytree(dora_workdir, tmp_path / "work")
    monkeypatch.chdir(work)
    for stage in ("sft", "dpo"):
        config = json.loads(Path(f"models/{stage}/adapter_config.json").read_text())
        assert config["use_dora"] is True and config["use_rslora"] is False, stage
        magnitudes = [v for k, v in load_file(f"models/{stage}/adapter_model.safetensors").items()
                      if "lora_magnitude_vector" in k]
        assert magnitudes, stage  # DoRA's own trained part is saved

    merge.main(tiny_params())  # its own check: each merge vs its adapter unmerged, within merge.check_atol (1e-3)
    final = AutoModelForCausalLM.from_pretrained("models/final")
    # what train-dpo trained: the DPO adapter on the base with the SFT adapter merged
    trained = PeftModel.from_pretrained(load_merged("models/base", ["models/sft"]), "models/dpo").eval()
    # both adapters active on the base: right for LoRA, not for DoRA (its norm is of the SFT-merged weight)
    stacked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("models/base"), "models/sft",
                                        adapter_name="sft")
    stacked.load_adapter("models/dpo", adapter_name="dpo")
    stacked.base_model.set_adapter(["sft", "dpo"], inference_mode=True)
    base = AutoModelForCausalLM.from_pretrained("models/base")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        got, want, both, before = final(ids).logits, trained(ids).logits, stacked(ids).logits, base(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert (got - both).abs().max() > 1e-3 and (got - before).abs().max() > 1e-3


def test_rslora_trains_with_its_scaling(workdir, tiny_model_dir):
    from stages import train_dpo, train_sft
    from tunepipe.modeling import load_model, prepare_for_training

    params = tiny_params(train_sft={"max_steps": 1, "use_rslora": True},
                         train_dpo={"max_steps": 1, "use_rslora": True})
    train_sft.main(params)
    train_dpo.main(params)
    for stage in ("sft", "dpo"):
        assert json.loads(Path(f"models/{stage}/adapter_config.json").read_text())["use_rslora"] is True
    # lora_alpha / sqrt(r) = 8 / 2, not lora_alpha / r = 2
    from peft import get_peft_model

    model, config = prepare_for_training(load_model(tiny_model_dir), params.train_dpo)
    layer = get_peft_model(model, config).base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(4.0)


def test_fp32_lora_deltas_leave_dora_to_peft():
    """keep_lora_deltas_in_fp32 adds plain LoRA deltas itself; DoRA's forward (a variant) stays PEFT's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import layer

    from tunepipe.training import keep_lora_deltas_in_fp32

    torch.manual_seed(0)
    nets = {dora: get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)),
                                 LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=dora,
                                            init_lora_weights=False))
            for dora in (False, True)}
    assert not nets[False].base_model.model[0].lora_variant and nets[True].base_model.model[0].lora_variant
    x = torch.randn(4, 16)
    original = layer.Linear.forward
    try:
        layer.Linear.forward = getattr(original, "plain", original)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            peft_own = {dora: net(x) for dora, net in nets.items()}
        keep_lora_deltas_in_fp32()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = {dora: net(x) for dora, net in nets.items()}
        assert torch.equal(ours[True], peft_own[True])              # DoRA: PEFT's forward, untouched
        assert ours[False].dtype == torch.float32 != peft_own[False].dtype  # LoRA: the fp32 sum
    finally:
        layer.Linear.forward = original
