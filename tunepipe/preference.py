"""The offline preference methods of the alignment stage (train-dpo): DPO, KTO and ORPO with TRL.

    data = load_pref_data("data/tokenized/pref")         # {"train", "validation"}: paired or unpaired rows
    data = {split: fit_prompts(ds, tokenizer, cfg.max_prompt_length) for split, ds in data.items()}
    trainer = build_kto_trainer(model, ref_model, tokenizer, data, cfg, seed=seed, precision="fp32",
                                peft_config=peft_config, run=run, output_dir="models/checkpoints/dpo")
    summary = {**logged_figures("kto", trainer.state.log_history, run.last_eval), **data_summary(trainer, "kto")}

Every builder takes the same arguments and returns a TRL trainer that ``TrainingRun`` drives:

    dpo   pairs (prompt, chosen, rejected); the loss compares the policy's log-prob margin with the
          reference's (the SFT model: with LoRA, the same model with the new adapter switched off).
    kto   unpaired rows (prompt, completion, label): thumbs up/down data (fetch.preference.format:
          unpaired), or pairs split into a good and a bad row each. Each answer is pushed up or down
          against the reference on its own; the two classes are weighted to balance their counts.
    orpo  pairs; no reference model: the loss is the chosen answer's NLL (an SFT term) plus beta times
          the log odds ratio of chosen over rejected. It is meant to replace SFT; here it runs on top
          of the SFT model like the others, so the SFT term keeps the model near its SFT answers.

The data is kept in memory (TRL's dataset maps must not write cache files into data/).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from tunepipe.cli import StageError
from tunepipe.lm_head import use_tiled_log_probs
from tunepipe.training import (TrainingRun, keep_lora_deltas_in_fp32, load_splits, score_only_labelled_positions,
                               trainer_arguments)

log = logging.getLogger("tunepipe.preference")

COLUMNS = {"paired": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label")}
NEEDS_PAIRS = ("dpo", "orpo")        # KTO alone learns from unpaired rows
WITH_REFERENCE = ("dpo", "kto")      # ORPO has no reference model

# What metrics/train_dpo.json keeps of the trainer's logs: DPO its four reward figures (the report
# reads them, by these names); KTO and ORPO whatever they log of rewards, log-probs, odds ratios, NLL, KL.
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
LOGGED_PREFIXES = ("rewards/", "logps/", "log_odds_", "nll_loss", "kl")


# --------------------------------------------------------------------------- data


def kind_from_info(info: dict) -> Optional[str]:
    """"paired", "unpaired" or None (no preference data), as data/tokenized/info.json says.

    An info.json from before preference_kind existed says only whether there were pairs.
    """
    if "preference_kind" in info:
        return info["preference_kind"]
    return "paired" if info.get("preference_pairs", True) else None


def check_algorithm_fits(algorithm: str, kind: str) -> None:
    """DPO and ORPO compare two answers to one prompt: unpaired rows cannot train them."""
    if algorithm in NEEDS_PAIRS and kind == "unpaired":
        raise StageError(f"train_dpo.algorithm={algorithm} needs preference pairs (chosen and rejected), but the "
                         "preference data is unpaired (fetch.preference.format: unpaired, one answer and a label "
                         "per row); train on it with KTO: -S train_dpo.algorithm=kto")


def load_pref_data(path: Path) -> dict:
    """The preference splits (train, validation), in memory, with the columns of their kind (COLUMNS)."""
    data = load_splits(path, "the preference data", lambda splits: COLUMNS[data_kind(splits)])
    columns = list(COLUMNS[data_kind(data)])
    return {split: ds.select_columns(columns) for split, ds in data.items()}


def data_kind(data: dict) -> str:
    """"paired" or "unpaired", from the columns of the preference splits themselves."""
    return "unpaired" if "label" in data["train"].column_names else "paired"


def fit_prompts(ds, tokenizer, max_prompt_length: int):
    """Cut prompts longer than ``max_prompt_length`` tokens from the left, keeping the question's end.

    TRL 1.16 dropped its own ``max_prompt_length``; this keeps the param's meaning:
    the end of the prompt (the latest turn and the assistant header) survives.
    """
    cut = 0

    def fit(row):
        nonlocal cut
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt_length:
            return row
        cut += 1
        return {**row, "prompt": tokenizer.decode(ids[-max_prompt_length:])}

    ds = ds.map(fit, desc="fitting prompts to max_prompt_length", keep_in_memory=True)
    if cut:
        log.warning("%d prompt(s) longer than max_prompt_length=%d tokens were cut from the left", cut, max_prompt_length)
    return ds


def unpaired_rows(ds, seed: int):
    """KTO's rows: pairs split into (prompt, chosen, True) and (prompt, rejected, False), shuffled.

    KTO estimates its KL term from each batch's answers paired with the batch's other prompts,
    so TRL reads the rows in order: shuffled here (seeded), a batch mixes prompts and labels.
    Unpaired data comes shuffled by fetch's split already; shuffling it again costs nothing.
    """
    from datasets import concatenate_datasets

    if "label" not in ds.column_names:
        good = ds.map(lambda r: {"completion": r["chosen"], "label": True}, remove_columns=["chosen", "rejected"],
                      keep_in_memory=True)
        bad = ds.map(lambda r: {"completion": r["rejected"], "label": False}, remove_columns=["chosen", "rejected"],
                     keep_in_memory=True)
        ds = concatenate_datasets([good, bad])
    return ds.shuffle(seed=seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)


def balanced_weights(labels: list[bool]) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) that make both classes weigh the same in KTO's loss.

    The KTO paper (Ethayarajh et al. 2024, eq. 8) advises desirable_weight * n_desirable /
    (undesirable_weight * n_undesirable) in [1, 4/3]; the rarer class is weighted up to reach 1,
    the other keeps weight 1, so balanced data gets TRL's defaults (1, 1).
    """
    n_good = sum(bool(x) for x in labels)
    n_bad = len(labels) - n_good
    if not n_good or not n_bad:
        which = "desirable (label true)" if not n_good else "undesirable (label false)"
        raise StageError(f"KTO needs both kinds of answers, but the training data has no {which} rows")
    if n_good < n_bad:
        return round(n_bad / n_good, 4), 1.0
    return 1.0, round(n_good / n_bad, 4)


# --------------------------------------------------------------------------- trainers


def build_dpo_trainer(model, ref_model, tokenizer, data: dict, cfg, *, seed: int, precision: str, peft_config,
                      run: TrainingRun, output_dir: Path):
    from trl import DPOConfig, DPOTrainer

    from tunepipe.attention import use_packed_sdpa
    from tunepipe.shared_prefix import share_prefixes_in_backbone

    packed_sdpa = use_packed_sdpa(model)
    args = DPOConfig(**_against_reference(cfg, data, output_dir=output_dir, seed=seed, precision=precision),
                     loss_type=[cfg.loss_type], label_smoothing=cfg.label_smoothing)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data["train"],
                         eval_dataset=data.get("validation"), processing_class=tokenizer, peft_config=peft_config,
                         callbacks=run.callbacks())
    if packed_sdpa:  # each prompt once for both its answers, the system prompt once per batch
        share_prefixes_in_backbone(trainer.model)
    return trainer


def build_kto_trainer(model, ref_model, tokenizer, data: dict, cfg, *, seed: int, precision: str, peft_config,
                      run: TrainingRun, output_dir: Path):
    from trl import KTOConfig, KTOTrainer

    if cfg.batch_size < 2:
        raise StageError("train_dpo.batch_size: KTO needs at least 2 rows per batch (its KL estimate pairs each "
                         "answer with another prompt of the batch)")
    data = {split: unpaired_rows(ds, seed) for split, ds in data.items()}
    desirable, undesirable = balanced_weights(data["train"]["label"])
    log.info("KTO weights: desirable %s, undesirable %s (%d rows, %d of them desirable)", desirable, undesirable,
             len(data["train"]), sum(data["train"]["label"]))
    args = KTOConfig(**_against_reference(cfg, data, output_dir=output_dir, seed=seed, precision=precision),
                     desirable_weight=desirable, undesirable_weight=undesirable)
    return KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data["train"],
                      eval_dataset=data.get("validation"), processing_class=tokenizer, peft_config=peft_config,
                      callbacks=run.callbacks())


def build_orpo_trainer(model, ref_model, tokenizer, data: dict, cfg, *, seed: int, precision: str, peft_config,
                       run: TrainingRun, output_dir: Path):
    """ORPO has no reference model: ``ref_model`` must be None (the stage builds none for it).

    TRL's ORPO computes the SFT term over the prompt as well as the chosen answer (its own
    choice; train-sft masks the prompt), and scores the whole vocabulary at every position.
    """
    from trl.experimental.orpo import ORPOConfig

    if ref_model is not None:
        raise ValueError("ORPO trains without a reference model; pass ref_model=None")
    args = ORPOConfig(
        **trainer_arguments(cfg, output_dir=output_dir, seed=seed, precision=precision,
                            evaluate="validation" in data),
        beta=cfg.beta,
        max_length=cfg.max_length,
        remove_unused_columns=False,  # its collator needs the tokenized columns TRL would drop
    )
    return _orpo_trainer()(model=model, args=args, train_dataset=data["train"], eval_dataset=data.get("validation"),
                           processing_class=tokenizer, peft_config=peft_config, callbacks=run.callbacks())


def _against_reference(cfg, data: dict, *, output_dir: Path, seed: int, precision: str) -> dict:
    """The DPOConfig / KTOConfig fields both take, once what they need to measure the policy against
    the reference is set up (both score log-probs with TRL's fused LM head, and compare the adapter
    on with the adapter off)."""
    score_only_labelled_positions()
    use_tiled_log_probs()
    if precision == "bf16":
        keep_lora_deltas_in_fp32()  # else bf16 measures policy - reference as ~0 and the loss barely moves
    return dict(trainer_arguments(cfg, output_dir=output_dir, seed=seed, precision=precision,
                                  evaluate="validation" in data),
                beta=cfg.beta, max_length=cfg.max_length, precompute_ref_log_probs=cfg.precompute_ref_log_probs,
                precompute_ref_batch_size=cfg.batch_size * 2)  # forward only: twice the batch fits


def _orpo_trainer():
    """TRL's ORPOTrainer, with its token count and its BOS made like the other trainers'."""
    import torch
    from trl.experimental.orpo import ORPOTrainer

    from tunepipe.tokenization import adds_bos

    class Orpo(ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            # TRL puts the BOS in front of every prompt that lacks it; a tokenizer that adds no BOS
            # (SmolLM2, Pythia) would then train on prompts that SFT and generation never see
            row = super().tokenize_row(feature, model)
            bos = self.processing_class.bos_token
            if bos and not adds_bos(self.processing_class) and not feature["prompt"].startswith(bos):
                row = {key: value[1:] for key, value in row.items()}
            return row

        def _track_num_input_tokens(self, inputs):
            # its batches hold chosen_* and rejected_* sequences, no input_ids: transformers would count nothing
            if self.args.include_num_input_tokens_seen == "no":
                return
            tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    return Orpo


# --------------------------------------------------------------------------- summary


def logged_figures(algorithm: str, history: list[dict], last_eval: dict) -> dict:
    """The trainer's last logged preference figures (train, and eval_*), named for metrics/train_dpo.json."""
    if algorithm == "dpo":
        last = next((h for h in reversed(history) if "rewards/accuracies" in h), {})
        train = {k: last.get(k) for k in REWARD_KEYS}
        evaluated = {k: last_eval.get(k) for k in REWARD_KEYS}
    else:
        train = {}
        for h in history:  # KTO logs a class's figures only when the batch held that class: the last of each
            if "loss" in h:
                train.update({k: v for k, v in h.items() if k.startswith(LOGGED_PREFIXES)})
        evaluated = {k: v for k, v in last_eval.items() if k.startswith(LOGGED_PREFIXES)}
    return {**{_name(k): _round(v) for k, v in train.items()},
            **{"eval_" + _name(k): _round(v) for k, v in evaluated.items()}}


def data_summary(trainer, algorithm: str) -> dict:
    """What metrics/train_dpo.json records of the data trained on: pairs, or KTO's rows and class weights."""
    if algorithm != "kto":
        return {"train_pairs": len(trainer.train_dataset)}
    labels = trainer.train_dataset["label"]
    return {"train_rows": len(labels), "desirable_rows": int(sum(labels)),
            "undesirable_rows": len(labels) - int(sum(labels)), "desirable_weight": trainer.args.desirable_weight,
            "undesirable_weight": trainer.args.undesirable_weight}


def _name(key: str) -> str:
    return key.replace("/", "_")


def _round(value):
    return None if value is None else round(float(value), 5)
