"""GRPO and RLOO on the tiny model: rewards, the KL leash, rollout records, held-out checks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.trainingdata import templated_rows, tiny_params


def even_token_share(prompts, completions, completion_ids, **kwargs):
    """A reward a random tiny model can learn, starting near 0.5: the share of even token ids in its answer.
    (Raising every even id's logit at once is one direction of the last hidden state.)"""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def batch(rows, completions, step=0):
    """What TRL passes a reward function: the batch's dataset columns, repeated per completion."""
    return dict(prompts=[r["prompt"] for r in rows], completions=completions,
                completion_ids=[[1] * len(c.split()) for c in completions],
                meta_json=[json.dumps(r["meta"]) for r in rows], id=[r["id"] for r in rows],
                instruction=[r["instruction"] for r in rows], reference=[r["completion"] for r in rows],
                trainer_state=SimpleNamespace(global_step=step))


def test_checker_reward_is_one_for_a_pass_and_records_each_rollout(smol_tokenizer, tmp_path):
    from tunepipe.heldout import StepLog
    from tunepipe.online import Rewards

    rows = templated_rows(smol_tokenizer, "train", 2)
    log = StepLog(tmp_path / "rollouts.jsonl", None)
    rewards = Rewards("checker", with_checker=True, rollouts=log)
    (checker,) = rewards.functions()
    completions = [rows[0]["completion"], "certainly not the answer"]
    assert checker(**batch(rows, completions, step=3)) == [1.0, 0.0]
    recorded = log.rows()
    assert [r["checker"] for r in recorded] == ["pass", "wrong_answer"]
    assert [r["reward"] for r in recorded] == [1.0, 0.0] and {r["step"] for r in recorded} == {3}
    assert recorded[0]["reference"] == rows[0]["completion"] and recorded[1]["completion"] == completions[1]


def test_model_reward_scores_once_and_watches_the_checker_with_weight_zero(smol_tokenizer, tmp_path):
    from tunepipe.heldout import StepLog
    from tunepipe.online import Rewards

    calls = []

    def scorer(prompts, completions, **kwargs):
        calls.append(len(completions))
        return [0.5 * len(c) for c in completions]

    rows = templated_rows(smol_tokenizer, "train", 2)
    log = StepLog(tmp_path / "rollouts.jsonl", None)
    rewards = Rewards("model", with_checker=True, scorer=scorer, rollouts=log)
    assert rewards.names == ["model", "checker"] and rewards.weights == [1.0, 0.0]
    model, checker = rewards.functions()
    args = batch(rows, [rows[0]["completion"], "xx"])
    assert model(**args) == [0.5 * len(rows[0]["completion"]), 1.0]
    assert checker(**args) == [1.0, 0.0]
    assert calls == [2]  # one scoring per batch, however many functions read it
    assert [r["reward"] for r in log.rows()] == [0.5 * len(rows[0]["completion"]), 1.0]  # the checker weighs 0


def test_steplog_keeps_only_rows_before_the_resumed_step(tmp_path):
    from tunepipe.heldout import StepLog

    path = tmp_path / "log.jsonl"
    log = StepLog(path, None)
    log.extend([{"step": s, "x": s} for s in range(5)])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 5, "x"')  # torn by a kill mid-write
    resumed = StepLog(path, 3)
    assert [r["step"] for r in resumed.rows()] == [0, 1, 2]
    assert [r["step"] for r in StepLog(path, None).rows()] == []  # a fresh run starts empty


@pytest.fixture(scope="module")
def peaked_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with 25x embeddings: its next-token distribution is peaked (the random one is
    almost uniform over 49k tokens, where no sampled reward has any spread to learn from)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(25)
    out = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(out, safe_serialization=True)
    return out


def first_token_probability(model, tokenizer, prompts, token: int) -> float:
    import torch

    with torch.no_grad():
        return sum(float(torch.softmax(model(**tokenizer(p, return_tensors="pt")).logits[0, -1], -1)[token])
                   for p in prompts) / len(prompts)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_online_training_raises_a_learnable_reward(algorithm, peaked_model_dir, tiny_model_dir, tmp_path):
    """Reward 1 when the answer starts with the token the model already favours a little: the expected
    reward is that token's probability after the prompt, computed exactly before and after training."""
    from transformers import AutoTokenizer

    from tunepipe.modeling import load_for_training
    from tunepipe.online import Rewards, build_online_trainer, prompt_dataset
    from tunepipe.training import TrainingRun

    # full fine-tuning without a KL term (beta 0): the embeddings themselves can move
    cfg = tiny_params(train_dpo={"algorithm": algorithm, "method": "full", "beta": 0.0, "max_steps": 5,
                                 "batch_size": 2, "num_generations": 4, "max_completion_length": 2,
                                 "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 100}).train_dpo
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = "<|endoftext|>"
    model, peft_config = load_for_training(peaked_model_dir, cfg, tokenizer, trust_remote_code=False)
    prompts = prompt_dataset(templated_rows(tokenizer, "train", 8), tokenizer)
    with_ids = tokenizer(prompts[0]["prompt"], return_tensors="pt")
    favourite = int(model(**with_ids).logits[0, -1].argmax())
    before = first_token_probability(model, tokenizer, prompts["prompt"], favourite)

    def starts_with_favourite(prompts, completions, completion_ids, **kwargs):
        return [float(bool(ids) and ids[0] == favourite) for ids in completion_ids]

    run = TrainingRun(tmp_path / "live", None)
    rewards = Rewards("model", with_checker=True, scorer=starts_with_favourite)
    trainer = build_online_trainer(algorithm, model, tokenizer, {"train": prompts}, cfg, seed=0, precision="fp32",
                                   peft_config=peft_config, run=run, rewards=rewards, output_dir=tmp_path / "ckpt")
    run.train(trainer)

    after = first_token_probability(trainer.model.eval(), tokenizer, prompts["prompt"], favourite)
    assert after > before + 0.15, (before, after)
    history = [h for h in trainer.state.log_history if "reward" in h]
    assert len(history) == 5 and "rewards/checker/mean" in history[-1]  # the checker is watched beside the reward
    plots = tmp_path / "live/plots/metrics/train"
    for name in ("reward", "completion_length", "rewards/model", "rewards/checker"):
        assert (plots / f"{name}.tsv").is_file(), name


# --------------------------------------------------------------------------- the alignment stage


from tests.test_train_dpo import sft_workdir, workdir  # noqa: E402,F401  (fixtures: a folder where train-sft ran)


def online_params(**train_dpo):
    return tiny_params(train_dpo={"algorithm": "grpo", "max_steps": 2, "batch_size": 2, "num_generations": 2,
                                  "max_completion_length": 4, "eval_steps": 2, "save_steps": 1, "heldout_prompts": 4,
                                  "beta": 0.1, **train_dpo})


def test_grpo_stage_trains_with_the_checker_and_records_what_the_report_checks(workdir):
    from pathlib import Path

    from stages import train_dpo
    from tunepipe.artifacts import read_jsonl

    train_dpo.main(online_params())

    metrics = json.loads(Path("metrics/train_dpo.json").read_text())
    assert metrics["algorithm"] == "grpo" and metrics["reward_source"] == "checker" and metrics["steps"] == 2
    assert metrics["heldout_prompts"] == 4 and metrics["heldout_task_accuracy_last"] is not None
    assert json.loads(Path("models/dpo/adapter_config.json").read_text())["peft_type"] == "LORA"
    heldout = read_jsonl("data/alignment/heldout.jsonl")
    assert sorted({r["step"] for r in heldout}) == [0, 2] and len(heldout) == 8  # 4 prompts, step 0 and the last
    assert {r["checker"] for r in heldout} <= {"pass", "wrong_answer", "constraint_broken"}
    rollouts = read_jsonl("data/alignment/rollouts.jsonl")
    assert len(rollouts) == 2 * 2 * 2 and {r["step"] for r in rollouts} == {0, 1}  # steps x prompts x samples
    assert all(r["reward"] == (r["checker"] == "pass") for r in rollouts)
    plots = Path("metrics/train_dpo/plots/metrics")
    for name in ("train/reward", "train/kl", "train/completion_length", "train/rewards/checker", "eval/task_accuracy",
                 "eval/answer_tokens"):
        assert (plots / f"{name}.tsv").is_file(), name
    assert not Path("models/checkpoints/dpo").exists()


def test_grpo_resumes_its_logs_from_the_checkpoint(workdir, monkeypatch):
    from pathlib import Path

    from stages import train_dpo
    from tests.test_train_sft import interrupt_at
    from tunepipe.artifacts import read_jsonl

    params = online_params(max_steps=3, eval_steps=1)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_at(patch, 2)
        train_dpo.main(params)
    train_dpo.main(params)

    heldout = read_jsonl("data/alignment/heldout.jsonl")
    assert sorted(r["step"] for r in heldout) == sorted([0, 1, 2, 3] * 4)  # each evaluation once, none lost
    rollouts = read_jsonl("data/alignment/rollouts.jsonl")
    assert sorted({r["step"] for r in rollouts}) == [0, 1, 2] and len(rollouts) == 3 * 2 * 2
    assert json.loads(Path("metrics/train_dpo.json").read_text())["resumed_from_step"] == 2


def test_checker_reward_on_data_without_checks_names_the_fix(workdir):
    from pathlib import Path

    from stages import train_dpo
    from tunepipe.cli import StageError

    path = Path("data/templated/sft_train.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "meta": {}}) + "\n" for r in rows))
    with pytest.raises(StageError, match="train_dpo.reward=model"):
        train_dpo.main(online_params())


def test_dpo_also_checks_held_out_accuracy(workdir):
    from pathlib import Path

    from stages import train_dpo
    from tunepipe.artifacts import read_jsonl

    train_dpo.main(tiny_params(train_dpo={"max_steps": 2, "eval_steps": 2, "heldout_prompts": 3}))
    assert sorted({r["step"] for r in read_jsonl("data/alignment/heldout.jsonl")}) == [0, 2]
    assert read_jsonl("data/alignment/rollouts.jsonl") == []
    assert json.loads(Path("metrics/train_dpo.json").read_text())["algorithm"] == "dpo"
