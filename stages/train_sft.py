"""train-sft: supervised fine-tuning (LoRA, QLoRA or full) of the base model with TRL's SFTTrainer.

    python -m stages.train_sft [--params params.yaml]

Reads   data/tokenized/sft (input_ids, labels), data/tokenized/tokenizer, data/tokenized/info.json,
        models/base; params: shared.seed, shared.trust_remote_code, train_sft
Writes  models/sft/ (the LoRA adapter; a whole model with method: full),
        models/checkpoints/sft/ (checkpoints + fingerprint.json, deleted once the model is saved),
        metrics/train_sft.json and metrics/train_sft/plots/ (DVCLive: loss, eval loss, lr, tokens/s)

Rerunning after a kill or Ctrl-C resumes from the last checkpoint when params and
inputs are unchanged (otherwise the stale checkpoints are deleted and it says so).
Ctrl-C saves a checkpoint first and exits 130, so DVC records nothing.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from tunepipe.artifacts import write_json
from tunepipe.cli import StageError, run_stage
from tunepipe.dropout import use_fast_lora_dropout
from tunepipe.lm_head import use_tiled_log_probs
from tunepipe.modeling import load_for_training, load_tokenizer, read_tokenizer_info, set_cpu_threads, trainable_parameters
from tunepipe.params import Params
from tunepipe.shared_prefix import use_shared_prefix
from tunepipe.training import (TrainingRun, choose_precision, finish_training, keep_lora_deltas_in_fp32,
                               launch_processes, load_splits, provenance, resume_point, save_trained,
                               score_only_labelled_positions, trainer_arguments, training_record)

log = logging.getLogger("tunepipe.train_sft")

TOKENIZED = Path("data/tokenized")
BASE = Path("models/base")
OUT = Path("models/sft")
CHECKPOINTS = Path("models/checkpoints/sft")
METRICS = Path("metrics/train_sft.json")
LIVE_DIR = Path("metrics/train_sft")

# Attention kernels that keep packed examples apart using the restarting position ids
# (transformers builds a block-diagonal mask for sdpa/eager/flex; flash uses cu_seq_lens;
# sdpa_packed, which build_trainer switches sdpa to, runs each example on its own).
PACKING_SAFE_ATTENTION = {"sdpa", "sdpa_packed", "eager", "flex_attention", "flash_attention_2",
                          "flash_attention_3"}


def main(params: Params) -> None:
    cfg, seed = params.train_sft, params.shared.seed
    for needed in (TOKENIZED / "sft", TOKENIZED / "tokenizer", BASE):
        if not needed.exists():
            raise StageError(f"{needed}: missing; run the earlier stages first (dvc repro)")
    resume, fingerprint = resume_point(CHECKPOINTS, cfg, seed, {"data/tokenized": TOKENIZED, "models/base": BASE})
    if launch_processes(params, "train_sft", CHECKPOINTS):  # num_processes > 1: this stage again, under accelerate
        return
    from transformers import set_seed

    set_cpu_threads()  # before the precision probe: it measures with the threads training gets
    precision, precision_record = choose_precision(cfg.precision, BASE)
    set_seed(seed)  # before the model and adapter exist: same seed, same adapter init and dropout

    # ---- data
    data = load_sft_data(TOKENIZED / "sft")

    # ---- tokenizer
    tokenizer = load_tokenizer(TOKENIZED / "tokenizer", trust_remote_code=params.shared.trust_remote_code)
    info = read_tokenizer_info(TOKENIZED)
    tokenizer.padding_side = "right"
    log.info("pad %r (id %s, added: %s), eos id %s", tokenizer.pad_token, tokenizer.pad_token_id,
             info.get("added_pad", False), tokenizer.eos_token_id)

    # ---- model
    model, peft_config = load_for_training(BASE, cfg, tokenizer, trust_remote_code=params.shared.trust_remote_code)
    padding_free = cfg.padding_free and padding_free_supported(model)
    log.info("method=%s precision=%s padding_free=%s resume=%s", cfg.method, precision, padding_free, bool(resume))

    # ---- train
    run = TrainingRun(LIVE_DIR, resume)
    trainer = build_trainer(model, tokenizer, data, cfg, seed=seed, precision=precision,
                            padding_free=padding_free, peft_config=peft_config, run=run)
    n_train, n_all = trainable_parameters(trainer.model)
    log.info("training %d of %d parameters (%.2f%%) on %d examples", n_train, n_all, 100 * n_train / n_all,
             len(data["train"]))
    run.train(trainer)

    # ---- evaluate
    run.final_evaluation(trainer, "validation" in data)

    # ---- save
    summary = run.summary(trainer)
    summary.update(method=cfg.method, precision=precision, **precision_record, padding_free=padding_free,
                   trainable_parameters=n_train, train_examples=len(data["train"]))
    summary.update(provenance(fingerprint, cfg))
    if not save_trained(trainer, tokenizer if cfg.method == "full" else None, OUT,
                        training_record(fingerprint, summary)):
        return  # one of several processes: the main one writes the metrics
    write_json(METRICS, summary)
    finish_training(CHECKPOINTS)  # the model is saved: nothing is left to resume
    log.info("saved %s; final train loss %s, eval loss %s, %s tokens/s", OUT, summary["train_loss"],
             summary["eval_loss"], summary["tokens_per_second"])


def load_sft_data(path: Path):
    """The tokenized SFT splits (train, validation), in memory."""
    return load_splits(path, "the tokenized SFT data", ["input_ids", "labels"])


def padding_free_supported(model) -> bool:
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl in PACKING_SAFE_ATTENTION:
        return True
    warnings.warn(f"padding_free: attention '{impl}' cannot keep packed examples apart; padding batches instead")
    log.warning("padding_free requested but attention '%s' cannot keep packed examples apart; padding instead", impl)
    return False


def build_trainer(model, tokenizer, data: dict, cfg, *, seed: int, precision: str, padding_free: bool,
                  peft_config, run: TrainingRun, output_dir: Path = CHECKPOINTS):
    from trl import SFTConfig, SFTTrainer

    from tunepipe.attention import use_packed_sdpa

    # same numbers as the block-diagonal mask, a fraction of the attention work
    packed_sdpa = padding_free and use_packed_sdpa(model)
    score_only_labelled_positions()
    use_tiled_log_probs()  # TRL's CPU fold swept each huge tile a dozen times: half of a long-answer step
    if precision == "bf16":  # PEFT's bf16 sum rounded the deltas away: long answers ended at a higher loss
        keep_lora_deltas_in_fp32()

    args = SFTConfig(
        **trainer_arguments(cfg, output_dir=output_dir, seed=seed, precision=precision,
                            evaluate="validation" in data),
        padding_free=padding_free,
        max_length=None,  # the tokenize stage already dropped or truncated long examples
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data.get("validation"),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=run.callbacks())
    use_fast_lora_dropout(trainer.model)  # once PEFT has added the LoRA layers: the draws were 12% of a step
    if packed_sdpa:  # the system prompt every example opens with: computed once per batch, not 8 times
        use_shared_prefix(trainer)
    return trainer


if __name__ == "__main__":
    run_stage(__doc__, main)
