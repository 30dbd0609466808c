"""train-dpo: preference tuning (DPO and its variants) of the SFT model with TRL's DPOTrainer.

    python -m stages.train_dpo [--params params.yaml]

Reads   data/tokenized/pref (prompt, chosen, rejected strings), data/tokenized/tokenizer,
        models/base, models/sft; params: shared.seed, shared.trust_remote_code, train_dpo
Writes  models/dpo/ (a LoRA adapter trained on base+SFT merged; a whole model with method: full;
        only skipped.json when there are no preference pairs: fetch.preference.source none),
        models/checkpoints/dpo/ (checkpoints + fingerprint.json, deleted once the model is saved),
        metrics/train_dpo.json and metrics/train_dpo/plots/ (DVCLive: loss, rewards, margins, accuracies)

The SFT adapter is merged into the base in memory and a fresh adapter is trained
on top; with LoRA the reference model is that same SFT model with the new adapter
switched off, so no second copy is held. Resuming and Ctrl-C work as in train-sft.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from tunepipe.artifacts import atomic_path, write_json
from tunepipe.cli import StageError, run_stage
from tunepipe.modeling import (SKIPPED, load_for_training, load_tokenizer, read_tokenizer_info, set_cpu_threads,
                               trainable_parameters)
from tunepipe.params import Params
from tunepipe.training import (TrainingRun, choose_precision, finish_training, keep_lora_deltas_in_fp32,
                               launch_processes, provenance, resume_point, save_trained,
                               score_only_labelled_positions, trainer_arguments, training_record)

log = logging.getLogger("tunepipe.train_dpo")

TOKENIZED = Path("data/tokenized")
BASE = Path("models/base")
SFT = Path("models/sft")
OUT = Path("models/dpo")
CHECKPOINTS = Path("models/checkpoints/dpo")
METRICS = Path("metrics/train_dpo.json")
LIVE_DIR = Path("metrics/train_dpo")
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def main(params: Params) -> None:
    cfg, seed = params.train_dpo, params.shared.seed
    if not read_tokenizer_info(TOKENIZED).get("preference_pairs", True):
        return skip("no preference pairs (fetch.preference.source: none): the final model is the SFT model")
    for needed in (TOKENIZED / "pref", TOKENIZED / "tokenizer", BASE, SFT):
        if not needed.exists():
            raise StageError(f"{needed}: missing; run the earlier stages first (dvc repro)")
    resume, fingerprint = resume_point(CHECKPOINTS, cfg, seed, {"data/tokenized": TOKENIZED, "models/base": BASE, "models/sft": SFT})
    if launch_processes(params, "train_dpo", CHECKPOINTS):  # num_processes > 1: this stage again, under accelerate
        return
    from transformers import set_seed

    set_cpu_threads()  # before the precision probe: it measures with the threads training gets
    precision, precision_record = choose_precision(cfg.precision, BASE)
    set_seed(seed)  # before the model and adapter exist

    # ---- tokenizer
    tokenizer = load_tokenizer(TOKENIZED / "tokenizer", trust_remote_code=params.shared.trust_remote_code)
    tokenizer.padding_side = "right"

    # ---- data
    data = {split: fit_prompts(ds, tokenizer, cfg.max_prompt_length)
            for split, ds in load_pref_data(TOKENIZED / "pref").items()}

    # ---- model
    model, peft_config = load_for_training(BASE, cfg, tokenizer, trust_remote_code=params.shared.trust_remote_code,
                                           merged_stage_dirs=[SFT])
    ref_model = None
    if peft_config is None and not cfg.precompute_ref_log_probs:
        # TRL would otherwise reload the reference from models/base, without the SFT weights
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    log.info("method=%s precision=%s loss=%s beta=%s resume=%s", cfg.method, precision, cfg.loss_type, cfg.beta,
             bool(resume))

    # ---- train
    run = TrainingRun(LIVE_DIR, resume)
    trainer = build_trainer(model, ref_model, tokenizer, data, cfg, seed=seed, precision=precision,
                            peft_config=peft_config, run=run)
    n_train, n_all = trainable_parameters(trainer.model)
    log.info("training %d of %d parameters on %d pairs", n_train, n_all, len(trainer.train_dataset))
    run.train(trainer)

    # ---- evaluate
    run.final_evaluation(trainer, "validation" in data)

    # ---- save
    summary = run.summary(trainer)
    last = next((h for h in reversed(trainer.state.log_history) if "rewards/accuracies" in h), {})
    summary.update({k.replace("/", "_"): _round(last.get(k)) for k in REWARD_KEYS})
    summary.update({"eval_" + k.replace("/", "_"): _round(run.last_eval.get(k)) for k in REWARD_KEYS})
    summary.update(method=cfg.method, precision=precision, **precision_record, loss_type=cfg.loss_type, beta=cfg.beta,
                   train_pairs=len(trainer.train_dataset))
    summary.update(provenance(fingerprint, cfg))
    if not save_trained(trainer, tokenizer if cfg.method == "full" else None, OUT,
                        training_record(fingerprint, summary)):
        return  # one of several processes: the main one writes the metrics
    write_json(METRICS, summary)
    finish_training(CHECKPOINTS)  # the model is saved: nothing is left to resume
    log.info("saved %s; final loss %s, reward accuracy %s (eval %s)", OUT, summary["train_loss"],
             summary["rewards_accuracies"], summary["eval_rewards_accuracies"])


def skip(reason: str) -> None:
    """No DPO: a models/dpo holding only the reason (merge passes over it), metrics that say so, no curves."""
    log.warning("DPO skipped: %s", reason)
    with atomic_path(OUT, is_dir=True) as tmp:
        write_json(tmp / SKIPPED, {"skipped": reason})
    with atomic_path(LIVE_DIR / "plots", is_dir=True):
        pass  # an empty folder: the plots output of dvc.yaml must exist
    write_json(METRICS, {"skipped": reason})


def _round(value):
    return None if value is None else round(float(value), 5)


def load_pref_data(path: Path) -> dict:
    """The preference splits, in memory (TRL's dataset maps must not write cache files into data/)."""
    from datasets import load_from_disk

    try:
        data = load_from_disk(str(path), keep_in_memory=True)
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(f"{path}: cannot load the preference data: {exc}") from None
    if "train" not in data:
        raise StageError(f"{path}: no 'train' split (found {sorted(data)})")
    out = {}
    for split, ds in data.items():
        if split not in ("train", "validation"):
            continue
        missing = {"prompt", "chosen", "rejected"} - set(ds.column_names)
        if missing:
            raise StageError(f"{path}/{split}: missing column(s) {sorted(missing)}")
        if len(ds) == 0:
            raise StageError(f"{path}/{split}: empty split")
        out[split] = ds.select_columns(["prompt", "chosen", "rejected"])
    return out


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


def build_trainer(model, ref_model, tokenizer, data: dict, cfg, *, seed: int, precision: str, peft_config,
                  run: TrainingRun, output_dir: Path = CHECKPOINTS):
    from trl import DPOConfig, DPOTrainer

    score_only_labelled_positions()
    if precision == "bf16":
        keep_lora_deltas_in_fp32()  # else bf16 measures policy - reference as ~0 and the loss barely moves

    args = DPOConfig(
        **trainer_arguments(cfg, output_dir=output_dir, seed=seed, precision=precision,
                            evaluate="validation" in data),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        max_length=cfg.max_length,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=cfg.batch_size * 2,  # forward only: twice the batch fits
    )
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data["train"],
                      eval_dataset=data.get("validation"), processing_class=tokenizer, peft_config=peft_config,
                      callbacks=run.callbacks())


if __name__ == "__main__":
    run_stage(__doc__, main)
