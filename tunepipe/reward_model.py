"""The reward model: the SFT model with a scalar head, trained on the preference pairs (train-reward),
and the reward function the online alignment algorithms (GRPO, RLOO) score their samples with.

    needs_reward_model(params.train_dpo)          # grpo/rloo with train_dpo.reward: model
    model = build_reward_model("models/base", ["models/sft"], tokenizer, trust_remote_code=False)
    model, peft_config = reward_peft_config(model, params.train_reward)
    trainer = build_trainer(model, tokenizer, data, cfg, seed=..., precision=..., peft_config=peft_config,
                            run=run, output_dir="models/checkpoints/reward")
    scorer = RewardScorer("models/reward", "models/base", "models/sft", tokenizer)
    scorer(prompts, completions)                  # -> one float per completion
    pairwise_accuracy(scorer, pairs)              # share of pairs scored chosen > rejected, Wilson interval

Training and scoring tokenize a pair side the same way (``reward_input_ids``): the
chat-templated prompt, the answer and the EOS text, with the tokenizer's special
tokens, as TRL's RewardTrainer does with a standard-format pair. The score is the
head's output at the last token, the EOS of a finished answer.

torch, transformers, peft and trl are imported inside the functions, so the stage
decides whether it has anything to do without loading them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tunepipe.cli import StageError
from tunepipe.params import ONLINE_ALGORITHMS

log = logging.getLogger("tunepipe.reward_model")

# One sentence whatever train_dpo.algorithm is: switching between algorithms that need no reward
# model leaves models/reward/skipped.json byte-identical, so DVC reruns nothing after it.
SKIP_REASON = (f"no alignment method needs a reward model: it trains for train_dpo.algorithm "
               f"{' or '.join(ONLINE_ALGORITHMS)} with train_dpo.reward model")
PAIR_COLUMNS = ["prompt", "chosen", "rejected"]


def needs_reward_model(train_dpo_cfg) -> bool:
    """True when the alignment stage scores its own samples with the trained reward model."""
    return train_dpo_cfg.algorithm in ONLINE_ALGORITHMS and train_dpo_cfg.reward == "model"


# --------------------------------------------------------------------------- data


def load_pairs(path: str | Path) -> dict:
    """The preference pairs (prompt, chosen, rejected) of train and validation, in memory."""
    from tunepipe.training import load_splits

    return {split: ds.select_columns(PAIR_COLUMNS)
            for split, ds in load_splits(path, "the preference data", PAIR_COLUMNS).items()}


def reward_input_ids(tokenizer, prompts: Sequence[str], completions: Sequence[str],
                     ended: Optional[Sequence[bool]] = None) -> list[list[int]]:
    """The token ids the reward model scores for each prompt + completion.

    As TRL 1.16's RewardTrainer tokenizes a standard-format pair: the EOS text appended
    to the answer unless it ends with it, prompt + answer tokenized with the tokenizer's
    special tokens. ``ended[i]`` False (a sample cut at its length limit) leaves the EOS
    off: the model then scores the unfinished answer, not one that claims to be complete.
    A prompt that carries the BOS as text on a BOS-adding tokenizer loses it, so there is
    one BOS (data/tokenized/pref prompts come that way already; sampled prompts may not).
    """
    from tunepipe.tokenization import adds_bos, pref_prompt_text

    bos, eos = adds_bos(tokenizer), tokenizer.eos_token
    ended = [True] * len(completions) if ended is None else ended
    texts = [pref_prompt_text(p, tokenizer, bos) + (c + eos if done and not c.endswith(eos) else c)
             for p, c, done in zip(prompts, completions, ended, strict=True)]
    return tokenizer(texts)["input_ids"]


def fit_pairs(ds, tokenizer, max_length: int, split: str):
    """``ds`` with chosen_ids / rejected_ids (``reward_input_ids``), less the pairs where
    either side is over ``max_length`` tokens (logged with their count)."""

    def encode(batch):
        return {f"{side}_ids": reward_input_ids(tokenizer, batch["prompt"], batch[side])
                for side in ("chosen", "rejected")}

    ds = ds.map(encode, batched=True, desc=f"tokenizing {split} pairs", keep_in_memory=True)
    kept = ds.filter(lambda row: max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= max_length,
                     desc=f"dropping {split} pairs over max_length", keep_in_memory=True)
    if len(kept) < len(ds):
        log.warning("%s: dropped %d of %d pair(s) longer than max_length=%d tokens", split, len(ds) - len(kept),
                    len(ds), max_length)
    return kept


# --------------------------------------------------------------------------- model


def build_reward_model(base_dir: str | Path, stage_dirs: Iterable[str | Path], tokenizer, *,
                       trust_remote_code: bool = False):
    """A sequence classifier with one output whose backbone is the base with ``stage_dirs`` merged in
    (modeling.load_merged: safetensors only), in float32, padding with the tokenizer's pad.

    The classifier is built on the meta device and takes the merged model's backbone module
    itself, so no second backbone is allocated or randomly initialised; only the new head
    gets real weights, drawn from the current seed (the caller seeds first). Its
    ``score`` head sits on the last token that is not the pad.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from tunepipe.modeling import load_merged

    causal = load_merged(base_dir, stage_dirs, tokenizer, trust_remote_code=trust_remote_code)
    config = causal.config  # pad_token_id already set from the tokenizer (fit_embeddings)
    config.num_labels = 1
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32,
                                                                   trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise StageError(f"{base_dir}: transformers has no sequence-classification head for this model "
                         f"({type(config).__name__}): {exc}") from None
    setattr(model, model.base_model_prefix, causal.base_model)
    for module in model.modules():  # the head: the only weights left on the meta device
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=causal.device, recurse=False)
            model._init_weights(module)
    return model


def reward_peft_config(model, cfg):
    """(model, LoRA config or None for method full), as modeling.prepare_for_training sets them up
    (DoRA and rsLoRA included), for a sequence classifier: PEFT then also trains and saves the new
    ``score`` head (modules_to_save)."""
    from dataclasses import replace

    from tunepipe.modeling import prepare_for_training

    if cfg.method == "qlora":
        raise StageError("train_reward.method: qlora is not supported for the reward model (4-bit loading would "
                         "quantize its new score head too); use lora")
    model, peft_config = prepare_for_training(model, cfg)
    if peft_config is not None:
        peft_config = replace(peft_config, task_type="SEQ_CLS")
    return model, peft_config


def build_trainer(model, tokenizer, data: dict, cfg, *, seed: int, precision: str, peft_config, run,
                  output_dir: str | Path):
    """TRL's RewardTrainer on pairs already tokenized by ``fit_pairs`` (chosen_ids, rejected_ids),
    so it neither appends the EOS again nor tokenizes differently from ``RewardScorer``."""
    from trl import RewardConfig, RewardTrainer

    from tunepipe.training import keep_lora_deltas_in_fp32, trainer_arguments

    if precision == "bf16":
        keep_lora_deltas_in_fp32()  # a young adapter's deltas would round away under bf16 autocast
    args = RewardConfig(
        **trainer_arguments(cfg, output_dir=output_dir, seed=seed, precision=precision,
                            evaluate="validation" in data),
        max_length=None,  # fit_pairs dropped the longer pairs already, and counted them
        disable_dropout=False,  # TRL's default zeroes every dropout, lora_dropout included: the section decides
    )
    ids = ["chosen_ids", "rejected_ids"]
    return RewardTrainer(model=model, args=args, train_dataset=data["train"].select_columns(ids),
                         eval_dataset=data["validation"].select_columns(ids) if "validation" in data else None,
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[*run.callbacks(), reward_plots(run)])


def reward_plots(run):
    """Plot RewardTrainer's pairwise accuracy and margin (train and eval) beside TrainingRun's curves,
    which know the DPO and GRPO keys but not these."""
    from transformers import TrainerCallback

    class _RewardPlots(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            figures = {}
            for key, value in (logs or {}).items():
                name = key[len("eval_"):] if key.startswith("eval_") else key
                if name in ("accuracy", "margin"):
                    figures[("eval/" if key.startswith("eval_") else "train/") + name] = value
            if figures:
                run.log_metrics(state.global_step, figures)  # a no-op outside the main process

    return _RewardPlots()


# --------------------------------------------------------------------------- scoring


def score_ids(model, id_lists: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16) -> list[float]:
    """The model's scalar score of each token sequence: right-padded batches, eval mode, no gradients."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(id_lists), batch_size):
                rows = [torch.tensor(ids, dtype=torch.long) for ids in id_lists[start:start + batch_size]]
                input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_token_id)
                mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                scores.extend(logits[:, 0].float().tolist())
    finally:
        model.train(was_training)
    return scores


def load_reward_model(reward_dir: str | Path, base_dir: str | Path, sft_dir: str | Path, tokenizer, *,
                      trust_remote_code: bool = False):
    """The trained reward model of ``reward_dir`` in float32: base + SFT merged with the reward adapter
    (and its score head) merged in; or the whole classifier that method: full saved."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tunepipe.modeling import check_safetensors, is_adapter_dir, skipped_reason, with_adapters_merged

    reward_dir = Path(reward_dir)
    reason = skipped_reason(reward_dir)
    if reason is not None:
        raise StageError(f"{reward_dir}: no reward model was trained ({reason})")
    if is_adapter_dir(reward_dir):
        return with_adapters_merged(build_reward_model(base_dir, [sft_dir], tokenizer,
                                                       trust_remote_code=trust_remote_code), [reward_dir])
    if not (reward_dir / "config.json").is_file():
        raise StageError(f"{reward_dir}: not a reward model folder; run the train-reward stage "
                         "(dvc repro train-reward)")
    check_safetensors(reward_dir)
    return AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32, use_safetensors=True,
                                                              trust_remote_code=trust_remote_code)


class RewardScorer:
    """The reward model of models/reward as a TRL reward function (GRPOTrainer, RLOOTrainer).

        scorer = RewardScorer("models/reward", "models/base", "models/sft", tokenizer)
        GRPOTrainer(..., reward_funcs=[scorer])     # logged as rewards/model

    ``prompts`` are chat-templated strings, ``completions`` the decoded answers. TRL passes
    ``completion_ids`` too: an answer whose ids end in an EOS (finished) is scored with the
    EOS text, as training saw every answer; one cut at the length limit without it.
    """

    __name__ = "model"  # TRL names a reward function by __name__

    def __init__(self, reward_dir: str | Path, base_dir: str | Path, sft_dir: str | Path, tokenizer,
                 trust_remote_code: bool = False, batch_size: int = 16, device: Optional[str] = None):
        import torch

        from tunepipe.tokenization import generation_eos_ids

        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.eos_ids = {tokenizer.eos_token_id, *generation_eos_ids(base_dir)}
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_reward_model(reward_dir, base_dir, sft_dir, tokenizer,
                                       trust_remote_code=trust_remote_code).to(device).eval()
        self.model.config.pad_token_id = tokenizer.pad_token_id

    def __call__(self, prompts: list[str], completions: list[str], completion_ids=None, **kwargs) -> list[float]:
        ended = None if completion_ids is None else [bool(ids) and ids[-1] in self.eos_ids for ids in completion_ids]
        ids = reward_input_ids(self.tokenizer, prompts, completions, ended)
        return score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)


def pairwise_accuracy(scorer, pairs, confidence: float = 0.95) -> dict:
    """How often ``scorer`` ranks chosen over rejected on ``pairs`` (prompt, chosen, rejected):
    {"accuracy": {value, ci_low, ci_high (Wilson), n}, "mean_margin": mean of chosen - rejected}.
    A tie counts as wrong."""
    from tunepipe.stats import wilson_interval

    prompts = list(pairs["prompt"])
    margins = [c - r for c, r in zip(scorer(prompts, list(pairs["chosen"])), scorer(prompts, list(pairs["rejected"])),
                                     strict=True)]
    n, wins = len(margins), sum(m > 0 for m in margins)
    low, high = wilson_interval(wins, n, confidence)
    return {"accuracy": {"value": _round(wins / n) if n else None, "ci_low": _round(low), "ci_high": _round(high),
                         "n": n},
            "mean_margin": _round(sum(margins) / n) if n else None}


def _round(value: float) -> float:
    return round(float(value), 5)
