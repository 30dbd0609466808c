"""train-dpo, the alignment stage: preference tuning of the SFT model by DPO, KTO or ORPO (TRL).

    python -m stages.train_dpo [--params params.yaml]        # train_dpo.algorithm: dpo | kto | orpo

Reads   data/tokenized/pref (prompt, chosen, rejected strings; or prompt, completion, label rows
        from unpaired data, which only kto trains on), data/tokenized/tokenizer, models/base,
        models/sft; params: shared.seed, shared.trust_remote_code, train_dpo
Writes  models/dpo/ (a LoRA adapter trained on base+SFT merged; a whole model with method: full;
        only skipped.json when there is no preference data: fetch.preference.source none),
        models/checkpoints/dpo/ (checkpoints + fingerprint.json, deleted once the model is saved),
        metrics/train_dpo.json and metrics/train_dpo/plots/ (DVCLive: loss, rewards, margins,
        accuracies; KTO's KL, ORPO's NLL and log odds ratio)

The SFT adapter is merged into the base in memory and a fresh adapter is trained
on top. DPO and KTO measure the policy against a reference, the SFT model: with
LoRA that is the same model with the new adapter switched off, so no second copy is
held. ORPO has no reference. The methods themselves are in tunepipe/preference.py.
Resuming and Ctrl-C work as in train-sft.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from tunepipe.artifacts import atomic_path, read_jsonl, write_json
from tunepipe.cli import StageError, run_stage
from tunepipe.modeling import (SKIPPED, load_for_training, load_tokenizer, read_tokenizer_info, set_cpu_threads,
                               trainable_parameters)
from tunepipe.heldout import HeldOutCheck, StepLog, checkable_rows
from tunepipe.online import Rewards, build_online_trainer, has_checks, prompt_dataset
from tunepipe.params import ONLINE_ALGORITHMS, Params
from tunepipe.preference import (WITH_REFERENCE, build_dpo_trainer, build_kto_trainer, build_orpo_trainer,
                                 check_algorithm_fits, data_kind, data_summary, fit_prompts, kind_from_info,
                                 load_pref_data, logged_figures)
from tunepipe.training import (TrainingRun, checkpoint_step, choose_precision, finish_training, launch_processes,
                               provenance, resume_point, save_trained, training_record)

log = logging.getLogger("tunepipe.train_dpo")

TOKENIZED = Path("data/tokenized")
TEMPLATED = Path("data/templated")
BASE = Path("models/base")
SFT = Path("models/sft")
REWARD = Path("models/reward")
ALIGNMENT = Path("data/alignment")  # held-out answers at each evaluation, scored rollouts (grpo/rloo)
OUT = Path("models/dpo")
CHECKPOINTS = Path("models/checkpoints/dpo")
METRICS = Path("metrics/train_dpo.json")
LIVE_DIR = Path("metrics/train_dpo")

# The offline algorithms -> their trainers; each takes (model, ref_model, tokenizer, data, cfg, *, seed,
# precision, peft_config, run, output_dir) and learns from data/tokenized/pref. The online ones
# (build_online_trainer, tunepipe/online.py) learn from the model's own samples of the SFT prompts.
TRAINERS = {"dpo": build_dpo_trainer, "kto": build_kto_trainer, "orpo": build_orpo_trainer}


def main(params: Params) -> None:
    cfg, seed = params.train_dpo, params.shared.seed
    online = cfg.algorithm in ONLINE_ALGORITHMS
    if not online:
        kind = kind_from_info(read_tokenizer_info(TOKENIZED))
        if kind is None:
            return skip("no preference pairs (fetch.preference.source: none): the final model is the SFT model")
        check_algorithm_fits(cfg.algorithm, kind)
    for needed in (TOKENIZED / "tokenizer", BASE, SFT, *(() if online else (TOKENIZED / "pref",))):
        if not needed.exists():
            raise StageError(f"{needed}: missing; run the earlier stages first (dvc repro)")
    prompts = read_jsonl(TEMPLATED / "sft_train.jsonl") if online else []
    if online and cfg.reward == "checker" and not has_checks(prompts):
        raise StageError(f"train_dpo.reward: checker needs data with task checks ({TEMPLATED / 'sft_train.jsonl'} has "
                         "none: only the generated tasks do); use -S train_dpo.reward=model (a reward model trained "
                         "on your preference pairs)")
    inputs = {"data/tokenized": TOKENIZED, "models/base": BASE, "models/sft": SFT, "models/reward": REWARD,
              **{f"data/templated/{name}": TEMPLATED / name for name in ("sft_train.jsonl", "sft_val.jsonl")}}
    resume, fingerprint = resume_point(CHECKPOINTS, cfg, seed, {k: v for k, v in inputs.items() if v.exists()})
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
    if online:
        data = {"train": prompt_dataset(prompts, tokenizer)}
    else:
        data = {split: fit_prompts(ds, tokenizer, cfg.max_prompt_length)
                for split, ds in load_pref_data(TOKENIZED / "pref").items()}
        check_algorithm_fits(cfg.algorithm, data_kind(data))  # the data itself, whatever info.json says
    heldout_rows = checkable_rows(read_jsonl(TEMPLATED / "sft_val.jsonl"), cfg.heldout_prompts)

    # ---- model
    model, peft_config = load_for_training(BASE, cfg, tokenizer, trust_remote_code=params.shared.trust_remote_code,
                                           merged_stage_dirs=[SFT])
    ref_model = None
    if cfg.algorithm in WITH_REFERENCE and peft_config is None and not cfg.precompute_ref_log_probs:
        # TRL would otherwise reload the reference from models/base, without the SFT weights
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    log.info("algorithm=%s method=%s precision=%s loss=%s beta=%s resume=%s", cfg.algorithm, cfg.method, precision,
             cfg.loss_type if cfg.algorithm == "dpo" else cfg.algorithm, cfg.beta, bool(resume))

    # ---- train
    run = TrainingRun(LIVE_DIR, resume)
    logs = {name: StepLog(CHECKPOINTS / f"{name}.jsonl", checkpoint_step(resume)) for name in ("heldout", "rollouts")}
    if online:
        rewards = online_rewards(cfg, prompts, tokenizer, logs["rollouts"], params.shared.trust_remote_code)
        trainer = build_online_trainer(cfg.algorithm, model, tokenizer, data, cfg, seed=seed, precision=precision,
                                       peft_config=peft_config, run=run, rewards=rewards, output_dir=CHECKPOINTS)
    else:
        trainer = TRAINERS[cfg.algorithm](model, ref_model, tokenizer, data, cfg, seed=seed, precision=precision,
                                          peft_config=peft_config, run=run, output_dir=CHECKPOINTS)
    heldout = HeldOutCheck(heldout_rows, tokenizer, run, logs["heldout"], every=cfg.eval_steps,
                           max_new_tokens=cfg.max_completion_length)
    trainer.add_callback(heldout.callback())
    n_train, n_all = trainable_parameters(trainer.model)
    log.info("training %d of %d parameters on %d %s", n_train, n_all, len(trainer.train_dataset),
             {"kto": "rows", "grpo": "prompts", "rloo": "prompts"}.get(cfg.algorithm, "pairs"))
    run.train(trainer)

    # ---- evaluate
    run.final_evaluation(trainer, "validation" in data)

    # ---- save
    summary = run.summary(trainer)
    summary.update(logged_figures(cfg.algorithm, trainer.state.log_history, run.last_eval))
    summary.update(algorithm=cfg.algorithm, method=cfg.method, precision=precision, **precision_record,
                   **({"loss_type": cfg.loss_type} if cfg.algorithm == "dpo" else {}), beta=cfg.beta,
                   **data_summary(trainer, cfg.algorithm))
    summary.update(heldout.summary(), **({"reward_source": cfg.reward} if online else {}))
    summary.update(provenance(fingerprint, cfg))
    if not save_trained(trainer, tokenizer if cfg.method == "full" else None, OUT,
                        training_record(fingerprint, summary)):
        return  # one of several processes: the main one writes the metrics
    with atomic_path(ALIGNMENT, is_dir=True) as tmp:
        for name, steplog in logs.items():
            steplog.publish(tmp / f"{name}.jsonl")
    write_json(METRICS, summary)
    finish_training(CHECKPOINTS)  # the model is saved: nothing is left to resume
    log.info("saved %s; final loss %s (eval %s), reward margin %s (eval %s)", OUT, summary["train_loss"],
             summary["eval_loss"], summary.get("rewards_margins"), summary.get("eval_rewards_margins"))


def skip(reason: str) -> None:
    """No alignment: a models/dpo holding only the reason (merge passes over it), metrics that say so, no curves."""
    log.warning("alignment (train-dpo) skipped: %s", reason)
    with atomic_path(OUT, is_dir=True) as tmp:
        write_json(tmp / SKIPPED, {"skipped": reason})
    for folder in (LIVE_DIR / "plots", ALIGNMENT):
        with atomic_path(folder, is_dir=True):
            pass  # an empty folder: the outputs of dvc.yaml must exist
    write_json(METRICS, {"skipped": reason})


def online_rewards(cfg, prompts: list[dict], tokenizer, rollouts: StepLog, trust_remote_code: bool) -> Rewards:
    """GRPO/RLOO's reward: the task checker, or train-reward's model with the checker watched beside it."""
    scorer = None
    if cfg.reward == "model":
        from tunepipe.reward_model import RewardScorer

        scorer = RewardScorer(REWARD, BASE, SFT, tokenizer, trust_remote_code=trust_remote_code)
    return Rewards(cfg.reward, with_checker=has_checks(prompts), scorer=scorer, rollouts=rollouts)


if __name__ == "__main__":
    run_stage(__doc__, main)
