"""train-reward on the tiny model: skipped unless GRPO/RLOO score with it, trained on the preference
pairs, loaded back as a reward function, and it learns a preference it can learn."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainingdata import QUESTIONS, make_workdir, prompt_text, tiny_params

REPO = Path(__file__).resolve().parents[1]
ONLINE = {"algorithm": "grpo", "reward": "model"}
# ~20 steps of 4 pairs: the tiny model learns the toy preference in about 2 s of training
REWARD = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, max_steps=20, batch_size=4, learning_rate=1e-2,
              warmup_ratio=0.0, logging_steps=1, eval_steps=10, save_steps=10, precision="fp32", max_length=128)
N_TEST = 12


def toy_pairs(tokenizer, n: int, offset: int, swap: bool = False) -> list[dict]:
    """A preference a tiny model can learn: a short fixed answer over a long repetitive one (or the reverse)."""
    short, long = "Sure.", "no " * 12
    chosen, rejected = (long, short) if swap else (short, long)
    return [{"prompt": prompt_text(tokenizer, QUESTIONS[(offset + i) % len(QUESTIONS)][0]), "chosen": chosen,
             "rejected": rejected} for i in range(n)]


def write_pairs(root: Path, tokenizer, swap: bool = False) -> None:
    """data/tokenized/pref (train, validation) and the test pairs in data/templated/pref_test.jsonl."""
    from datasets import Dataset, DatasetDict

    pref = root / "data/tokenized/pref"
    shutil.rmtree(pref, ignore_errors=True)
    DatasetDict({split: Dataset.from_list(toy_pairs(tokenizer, n, offset, swap))
                 for split, n, offset in (("train", 16, 0), ("validation", 4, 3))}).save_to_disk(str(pref))
    (root / "data/templated").mkdir(parents=True, exist_ok=True)
    with open(root / "data/templated/pref_test.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in toy_pairs(tokenizer, N_TEST, 5, swap))


def write_sft_adapter(root: Path) -> None:
    """models/sft: a LoRA adapter with random (non-zero) weights, so merging it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(root / "models/base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(root / "models/sft", safe_serialization=True)


@pytest.fixture(scope="module")
def reward_workdir(tmp_path_factory, tiny_model_dir, smol_tokenizer):
    """The tokenize outputs, models/base and an SFT adapter, with the toy preference pairs."""
    root = make_workdir(tmp_path_factory.mktemp("reward"), tiny_model_dir, smol_tokenizer)
    write_sft_adapter(root)
    write_pairs(root, smol_tokenizer)
    return root


def train_in(root: Path, **reward) -> dict:
    from stages import train_reward

    cwd = os.getcwd()
    os.chdir(root)
    try:
        train_reward.main(tiny_params(train_dpo=ONLINE, train_reward=dict(REWARD, **reward)))
    finally:
        os.chdir(cwd)
    return json.loads((root / "metrics/train_reward.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, reward_workdir):
    """(work folder, metrics) after train-reward ran on the toy preference."""
    root = Path(shutil.copytree(reward_workdir, tmp_path_factory.mktemp("trained") / "work"))
    return root, train_in(root)


def tokenizer_of(root: Path):
    from tunepipe.modeling import load_tokenizer

    return load_tokenizer(root / "data/tokenized/tokenizer")


# --------------------------------------------------------------------------- skipping


@pytest.mark.parametrize("train_dpo", [{"algorithm": "dpo"}, {"algorithm": "kto"},
                                       {"algorithm": "grpo", "reward": "checker"}])
def test_skipped_when_no_method_needs_a_reward_model(tmp_path, monkeypatch, train_dpo):
    from stages import train_reward

    monkeypatch.chdir(tmp_path)  # an empty folder: skipping reads nothing
    train_reward.main(tiny_params(train_dpo=train_dpo))
    assert sorted(p.name for p in Path("models/reward").iterdir()) == ["skipped.json"]
    assert json.loads(Path("metrics/train_reward.json").read_text()) == {"skipped": train_reward.SKIP_REASON}
    assert Path("metrics/train_reward/plots").is_dir() and not any(Path("metrics/train_reward/plots").iterdir())


def test_skipped_outputs_are_the_same_bytes_for_every_algorithm_and_load_no_torch(tmp_path):
    """Switching dpo -> kto must leave the outputs byte-identical (DVC then reruns nothing after them),
    and deciding to skip takes about a second: no torch."""
    outputs = {}
    for algorithm in ("dpo", "kto"):
        work = tmp_path / algorithm
        work.mkdir()
        code = ("import sys; from stages import train_reward; from tests.trainingdata import tiny_params; "
                f"train_reward.main(tiny_params(train_dpo={{'algorithm': '{algorithm}'}})); "
                "assert 'torch' not in sys.modules, 'torch was imported'")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=work, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        assert time.perf_counter() - started < 15  # generous on a busy 2-core machine; typically ~1 s
        outputs[algorithm] = [(work / p).read_bytes()
                              for p in ("models/reward/skipped.json", "metrics/train_reward.json")]
    assert outputs["dpo"] == outputs["kto"]


@pytest.mark.parametrize("kind, why", [(None, "there is none"), ("unpaired", "the preference data is unpaired")])
def test_reward_model_without_preference_pairs_names_the_fix(tmp_path, monkeypatch, kind, why):
    from stages import train_reward
    from tunepipe.cli import StageError

    monkeypatch.chdir(tmp_path)
    Path("data/tokenized").mkdir(parents=True)
    Path("data/tokenized/info.json").write_text(json.dumps({"preference_kind": kind, "preference_pairs": False}))
    with pytest.raises(StageError, match=rf"{why} .*; set train_dpo.reward: checker, or give fetch.preference paired"):
        train_reward.main(tiny_params(train_dpo=ONLINE))
    assert not Path("models/reward").exists()


# --------------------------------------------------------------------------- the model


def test_backbone_carries_the_sft_weights_and_the_head_is_seeded(reward_workdir):
    import torch
    from transformers import set_seed

    from tunepipe.modeling import load_merged
    from tunepipe.reward_model import build_reward_model

    tok = tokenizer_of(reward_workdir)
    base, sft = reward_workdir / "models/base", reward_workdir / "models/sft"

    def build(seed):
        set_seed(seed)
        return build_reward_model(base, [sft], tok)

    model = build(1)
    merged = load_merged(base, [sft], tok).base_model.state_dict()
    plain = load_merged(base, [], tok).base_model.state_dict()
    backbone = model.base_model.state_dict()
    assert all(torch.equal(backbone[k], v) for k, v in merged.items())
    assert not all(torch.equal(backbone[k], v) for k, v in plain.items())  # the SFT adapter is in there
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert torch.equal(model.score.weight, build(1).score.weight)
    assert not torch.equal(model.score.weight, build(2).score.weight)


def test_adapter_config_is_for_a_classifier_with_the_sections_switches():
    import torch

    from tunepipe.cli import StageError
    from tunepipe.params import TrainReward
    from tunepipe.reward_model import reward_peft_config

    net = torch.nn.Linear(2, 1).requires_grad_(False)
    _, config = reward_peft_config(net, TrainReward(use_dora=True, use_rslora=True, lora_r=8, lora_dropout=0.1))
    assert (config.task_type, config.use_dora, config.use_rslora, config.r, config.lora_dropout) == \
        ("SEQ_CLS", True, True, 8, 0.1)
    full, config = reward_peft_config(net, TrainReward(method="full"))
    assert config is None and all(p.requires_grad for p in full.parameters())
    with pytest.raises(StageError, match="qlora is not supported"):
        reward_peft_config(net, TrainReward(method="qlora"))


def test_fit_pairs_drops_pairs_over_max_length(smol_tokenizer, caplog):
    from datasets import Dataset

    from tunepipe.reward_model import fit_pairs

    prompt = prompt_text(smol_tokenizer, "Hi?")
    ds = Dataset.from_list([{"prompt": prompt, "chosen": "ok", "rejected": "no " * 200},
                            {"prompt": prompt, "chosen": "ok", "rejected": "no"}])
    with caplog.at_level("WARNING", logger="tunepipe"):
        out = fit_pairs(ds, smol_tokenizer, 64, "train")
    assert len(out) == 1 and "dropped 1 of 2 pair(s) longer than max_length=64" in caplog.text
    ids = out[0]["chosen_ids"]
    assert ids[-1] == smol_tokenizer.eos_token_id  # as TRL's RewardTrainer: the EOS ends every answer
    assert ids == smol_tokenizer(prompt + "ok" + smol_tokenizer.eos_token)["input_ids"]


# --------------------------------------------------------------------------- training


def test_training_saves_the_adapter_with_its_score_head(trained):
    from safetensors import safe_open

    root, metrics = trained
    out = root / "models/reward"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["r"] == 4
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any("score" in k for k in keys), keys
    assert not list(out.glob("*.bin")) and (out / "training.json").is_file()
    assert not (root / "models/checkpoints/reward").exists()  # finished: nothing left to resume
    acc = metrics["pairwise_accuracy"]
    assert 0 <= acc["ci_low"] <= acc["value"] <= acc["ci_high"] <= 1 and acc["n"] == N_TEST
    assert metrics["scored_split"] == "test" and metrics["steps"] == REWARD["max_steps"]
    assert metrics["train_pairs"] == 16 and metrics["eval_accuracy"] is not None
    for name in ("train/loss", "train/accuracy", "train/margin", "eval/loss", "eval/accuracy"):
        assert (root / "metrics/train_reward/plots/metrics" / f"{name}.tsv").is_file(), name


def test_scorer_loads_the_saved_model_as_a_reward_function(trained):
    from tunepipe.reward_model import RewardScorer

    root, _ = trained
    tok = tokenizer_of(root)
    scorer = RewardScorer(root / "models/reward", root / "models/base", root / "models/sft", tok, batch_size=2)
    assert scorer.__name__ == "model"
    prompts = [prompt_text(tok, q) for q, _ in QUESTIONS[:3]]
    completions = ["Sure.", "no " * 12, "maybe"]
    first = scorer(prompts, completions)
    assert len(first) == 3 and all(isinstance(s, float) for s in first)
    assert scorer(prompts, completions) == first  # deterministic: eval mode, no dropout
    assert len(set(first)) == 3
    assert first[0] > first[1]  # the preference it was trained on
    # TRL passes the sampled ids: an answer cut before its EOS is scored without one
    ids = [tok("Sure." + tok.eos_token)["input_ids"], tok("Sure.")["input_ids"]]
    finished, cut = scorer(prompts[:2], ["Sure.", "Sure."], completion_ids=ids)
    assert finished == pytest.approx(scorer(prompts[:1], ["Sure."])[0], abs=1e-5) and cut != finished


def test_learns_the_toy_preference_in_either_direction(trained, reward_workdir, tmp_path):
    """Trained both ways round on the same prompts, it ranks the held-out pairs right both times:
    an untrained model prefers one side of every pair alike, so it could pass at most one."""
    root = Path(shutil.copytree(reward_workdir, tmp_path / "swapped"))
    write_pairs(root, tokenizer_of(root), swap=True)
    for metrics in (trained[1], train_in(root)):
        assert metrics["pairwise_accuracy"]["value"] >= 0.9, metrics["pairwise_accuracy"]
        assert metrics["pairwise_accuracy"]["ci_low"] > 0.5
        assert metrics["mean_margin"] > 0
