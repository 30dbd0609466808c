"""Online alignment: GRPO and RLOO through TRL, with a KL leash to the SFT model (docs/alignment.md).

    prompts = prompt_dataset(read_jsonl("data/templated/sft_train.jsonl"), tokenizer)
    rewards = Rewards(cfg.reward, with_checker=has_checks(rows), scorer=None,  # scorer: reward_model.RewardScorer
                      rollouts=StepLog(...))
    trainer = build_online_trainer("grpo", model, tokenizer, {"train": prompts}, cfg, seed=42, precision="fp32",
                                   peft_config=peft_config, run=run, rewards=rewards, output_dir="models/checkpoints/dpo")

Each step samples ``num_generations`` answers to each of ``batch_size`` prompts; the reward scores
them, and each answer is pushed up or down by how it compares with the others of its prompt (GRPO:
the group's mean and spread; RLOO: the mean of the other answers), less ``beta`` times its KL
divergence from the reference, the SFT model (the LoRA adapter switched off).

The reward is the task checker's verdict (1 pass, 0 fail: a verifiable reward) or the reward
model's score. With the reward model the checker is still computed, with weight 0, wherever the
data has checks: its pass share is logged beside the reward, so a reward that rises while the
checker's share falls (reward hacking) shows in the curves and the report.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional

log = logging.getLogger("tunepipe.online")

CHECKER = "checker"
MODEL = "model"


# --------------------------------------------------------------------------- data


def prompt_dataset(rows: list[dict], tokenizer):
    """The prompts TRL samples from, with what the rewards need beside them.

    The rendered prompt is tokenized by TRL with the tokenizer's special tokens; a tokenizer that
    adds a BOS itself would get a second one from the chat template's text, so that one is cut.
    ``meta`` travels as JSON text: Arrow would merge the checks' differing keys into one struct.
    """
    from datasets import Dataset

    from tunepipe.tokenization import adds_bos, pref_prompt_text

    bos = adds_bos(tokenizer)
    return Dataset.from_list([{"prompt": pref_prompt_text(r["prompt"], tokenizer, bos), "id": str(r.get("id")),
                               "instruction": r.get("instruction") or r["prompt"],
                               "reference": r.get("completion"), "meta_json": json.dumps(r.get("meta") or {})}
                              for r in rows])


def has_checks(rows: list[dict]) -> bool:
    from tunepipe.tasks import has_check

    return any(has_check(r.get("meta")) for r in rows)


# --------------------------------------------------------------------------- rewards


class Rewards:
    """The reward functions TRL calls, one per name, each scoring a whole batch of rollouts.

    TRL calls every function on the same batch in turn; the first call scores the batch with all
    of them and records it (``rollouts``: a StepLog), the others return their share of that work.
    """

    def __init__(self, source: str, *, with_checker: bool, scorer: Optional[Callable] = None, rollouts=None):
        if source == MODEL and scorer is None:
            raise ValueError("reward 'model' needs the reward model's scorer")
        self.names = ([MODEL, CHECKER] if with_checker else [MODEL]) if source == MODEL else [CHECKER]
        self.weights = [1.0] + [0.0] * (len(self.names) - 1)  # the checker beside a model reward is only watched
        self.scorer, self.rollouts = scorer, rollouts
        self._batch, self._scores = None, {}

    def functions(self) -> list[Callable]:
        return [self._function(name) for name in self.names]

    def _function(self, name: str) -> Callable:
        def reward(prompts, completions, **kwargs):
            if self._batch is not completions:
                self._score(prompts, completions, kwargs)
            return self._scores[name]

        reward.__name__ = name  # TRL logs each function's mean as rewards/<name>/mean
        return reward

    def _score(self, prompts, completions, kwargs) -> None:
        metas = [json.loads(m) for m in kwargs["meta_json"]]
        verdicts = [checker_verdict(meta, text) for meta, text in zip(metas, completions)]
        scores = {CHECKER: [None if v is None else float(v == "pass") for v in verdicts]}
        if MODEL in self.names:
            model_scores = self.scorer(prompts, completions, completion_ids=kwargs.get("completion_ids"))
            scores[MODEL] = [float(s) for s in model_scores]
        self._batch, self._scores = completions, scores
        if self.rollouts is not None:
            self.rollouts.extend(self._rows(completions, kwargs, verdicts, scores))

    def _rows(self, completions, kwargs, verdicts, scores) -> list[dict]:
        step = kwargs["trainer_state"].global_step
        lengths = [len(ids) for ids in kwargs.get("completion_ids") or [[]] * len(completions)]
        rows = []
        for i, text in enumerate(completions):
            per_function = {name: scores[name][i] for name in self.names}
            total = sum(w * v for w, v in zip(self.weights, per_function.values()) if v is not None)
            rows.append({"step": step, "id": kwargs["id"][i], "instruction": kwargs["instruction"][i],
                         "completion": text, "tokens": lengths[i], "reward": round(total, 5),
                         "rewards": {k: None if v is None else round(v, 5) for k, v in per_function.items()},
                         "checker": verdicts[i], "reference": kwargs["reference"][i]})
        return rows


def checker_verdict(meta: dict, text: str) -> Optional[str]:
    """"pass", the checker's failure kind, or None where the row has no check."""
    from tunepipe.tasks import check, has_check

    return (check(meta, text) or "pass") if has_check(meta) else None


# --------------------------------------------------------------------------- trainers


def online_arguments(cfg, *, output_dir, seed: int, precision: str, rewards: Rewards) -> dict:
    """GRPOConfig / RLOOConfig fields shared by both: the trainer arguments, the group and the leash.

    ``batch_size`` counts prompts, as it counts pairs for DPO: a step trains on
    batch_size x num_generations answers.
    """
    from tunepipe.training import trainer_arguments

    args = trainer_arguments(cfg, output_dir=output_dir, seed=seed, precision=precision, evaluate=False)
    args["per_device_train_batch_size"] = cfg.batch_size * cfg.num_generations
    return dict(args, num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                temperature=cfg.temperature, beta=cfg.beta, reward_weights=rewards.weights,
                remove_unused_columns=False)


def build_online_trainer(algorithm: str, model, tokenizer, data: dict, cfg, *, seed: int, precision: str,
                         peft_config, run, rewards: Rewards, output_dir):
    """TRL's GRPOTrainer or RLOOTrainer (``algorithm``) on the prompts of ``data["train"]``."""
    import trl

    from tunepipe.dropout import use_fast_lora_dropout

    name = algorithm.upper()
    config, trainer_class = getattr(trl, f"{name}Config"), getattr(trl, f"{name}Trainer")
    args = config(**online_arguments(cfg, output_dir=output_dir, seed=seed, precision=precision, rewards=rewards))
    trainer = trainer_class(model=model, reward_funcs=rewards.functions(), args=args, train_dataset=data["train"],
                            processing_class=tokenizer, peft_config=peft_config, callbacks=run.callbacks())
    use_fast_lora_dropout(trainer.model)
    return trainer


