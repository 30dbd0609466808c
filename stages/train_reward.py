"""train-reward: the reward model GRPO and RLOO score their samples with, trained with TRL's RewardTrainer.

    python -m stages.train_reward [--params params.yaml]

Reads   data/tokenized/pref (prompt, chosen, rejected strings), data/templated/pref_test.jsonl (the test
        pairs evaluate scores, scored after training), data/tokenized/tokenizer, data/tokenized/info.json,
        models/base, models/sft;
        params: shared.seed, shared.trust_remote_code, train_dpo.algorithm, train_dpo.reward, train_reward
Writes  models/reward/ (a LoRA adapter with the trained score head, on base+SFT merged as a scalar
        classifier; a whole classifier with method: full; only skipped.json when no alignment
        method needs it: train_dpo.algorithm grpo or rloo with train_dpo.reward model),
        models/checkpoints/reward/ (checkpoints + fingerprint.json, deleted once the model is saved),
        metrics/train_reward.json (training summary, pairwise accuracy with its Wilson interval and
        mean margin on the held-out pairs) and metrics/train_reward/plots/ (DVCLive: loss, accuracy, margin)

The model scores prompt + answer + EOS at the last token; a pair counts as right when
chosen scores above rejected. The held-out pairs are scored by the saved model loaded
back as the alignment stage loads it (tunepipe.reward_model.RewardScorer). Resuming and
Ctrl-C work as in train-sft.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunepipe.artifacts import atomic_path, read_jsonl, write_json
from tunepipe.cli import StageError, run_stage
from tunepipe.modeling import SKIPPED, load_tokenizer, read_tokenizer_info, set_cpu_threads, trainable_parameters
from tunepipe.params import Params
from tunepipe.reward_model import (SKIP_REASON, RewardScorer, build_reward_model, build_trainer, fit_pairs, load_pairs,
                                   needs_reward_model, pairwise_accuracy, reward_peft_config)
from tunepipe.training import (TrainingRun, choose_precision, finish_training, launch_processes, provenance,
                               resume_point, save_trained, training_record)

log = logging.getLogger("tunepipe.train_reward")

TOKENIZED = Path("data/tokenized")
TEST_PAIRS = Path("data/templated/pref_test.jsonl")
BASE = Path("models/base")
SFT = Path("models/sft")
OUT = Path("models/reward")
CHECKPOINTS = Path("models/checkpoints/reward")
METRICS = Path("metrics/train_reward.json")
LIVE_DIR = Path("metrics/train_reward")
REWARD_KEYS = ("accuracy", "margin")


def main(params: Params) -> None:
    cfg, seed = params.train_reward, params.shared.seed
    if not needs_reward_model(params.train_dpo):
        return skip()
    info = read_tokenizer_info(TOKENIZED)
    if not info.get("preference_pairs", True):
        why = ("the preference data is unpaired (fetch.preference.format: unpaired)"
               if info.get("preference_kind") == "unpaired" else "there is none (fetch.preference.source: none)")
        raise StageError(f"train_dpo.reward: model trains the reward model on preference pairs, and {why}; "
                         "set train_dpo.reward: checker, or give fetch.preference paired data")
    for needed in (TOKENIZED / "pref", TOKENIZED / "tokenizer", BASE, SFT):
        if not needed.exists():
            raise StageError(f"{needed}: missing; run the earlier stages first (dvc repro)")
    resume, fingerprint = resume_point(CHECKPOINTS, cfg, seed, {"data/tokenized": TOKENIZED, "models/base": BASE,
                                                                "models/sft": SFT})
    if launch_processes(params, "train_reward", CHECKPOINTS):  # num_processes > 1: this stage again, under accelerate
        return
    from transformers import set_seed

    set_cpu_threads()  # before the precision probe: it measures with the threads training gets
    precision, precision_record = choose_precision(cfg.precision, BASE)
    trust_remote_code = params.shared.trust_remote_code

    # ---- tokenizer
    tokenizer = load_tokenizer(TOKENIZED / "tokenizer", trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"

    # ---- data
    pairs = {split: fit_pairs(ds, tokenizer, cfg.max_length, split)
             for split, ds in load_pairs(TOKENIZED / "pref").items()}
    pairs = {split: ds for split, ds in pairs.items() if len(ds)}  # an empty split is no split
    if "train" not in pairs:
        raise StageError(f"{TOKENIZED / 'pref'}/train: no pair fits in train_reward.max_length={cfg.max_length} tokens")

    # ---- model
    set_seed(seed)  # before the score head and the adapter exist
    model, peft_config = reward_peft_config(build_reward_model(BASE, [SFT], tokenizer,
                                                               trust_remote_code=trust_remote_code), cfg)
    log.info("method=%s precision=%s resume=%s", cfg.method, precision, bool(resume))

    # ---- train
    run = TrainingRun(LIVE_DIR, resume)
    data = {split: pairs[split] for split in ("train", "validation") if split in pairs}
    trainer = build_trainer(model, tokenizer, data, cfg, seed=seed, precision=precision, peft_config=peft_config,
                            run=run, output_dir=CHECKPOINTS)
    n_train, n_all = trainable_parameters(trainer.model)
    log.info("training %d of %d parameters on %d pairs", n_train, n_all, len(trainer.train_dataset))
    run.train(trainer)
    run.final_evaluation(trainer, "validation" in data)

    # ---- save
    summary = run.summary(trainer)
    last = next((h for h in reversed(trainer.state.log_history) if "accuracy" in h), {})
    summary.update({f"train_{k}": _round(last.get(k)) for k in REWARD_KEYS})
    summary.update({f"eval_{k}": _round(run.last_eval.get(k)) for k in REWARD_KEYS})
    summary.update(method=cfg.method, precision=precision, **precision_record, train_pairs=len(trainer.train_dataset))
    summary.update(provenance(fingerprint, cfg))
    if not save_trained(trainer, tokenizer if cfg.method == "full" else None, OUT,
                        training_record(fingerprint, summary)):
        return  # one of several processes: the main one scores and writes the metrics

    # ---- evaluate: the saved model, loaded back as the alignment stage loads it, on pairs it never saw
    test = read_jsonl(TEST_PAIRS) if TEST_PAIRS.is_file() else []
    if not test:
        log.warning("%s: no test pairs; pairwise accuracy not measured", TEST_PAIRS)
    else:
        del trainer, model  # the scorer loads the saved model back: do not hold two
        scorer = RewardScorer(OUT, BASE, SFT, tokenizer, trust_remote_code=trust_remote_code)
        result = pairwise_accuracy(scorer, {key: [r[key] for r in test] for key in ("prompt", "chosen", "rejected")})
        summary.update(pairwise_accuracy=result["accuracy"], mean_margin=result["mean_margin"], scored_split="test")
        log.info("%s pairwise accuracy %s (95%% CI %s-%s, n=%d), mean margin %s", "test",
                 result["accuracy"]["value"], result["accuracy"]["ci_low"], result["accuracy"]["ci_high"],
                 result["accuracy"]["n"], result["mean_margin"])
    write_json(METRICS, summary)
    finish_training(CHECKPOINTS)  # the model is saved: nothing is left to resume
    log.info("saved %s; final loss %s, train accuracy %s (eval %s)", OUT, summary["train_loss"],
             summary["train_accuracy"], summary["eval_accuracy"])


def skip() -> None:
    """No reward model: a models/reward holding only the reason, metrics that say so, no curves."""
    log.info("train-reward skipped: %s", SKIP_REASON)
    with atomic_path(OUT, is_dir=True) as tmp:
        write_json(tmp / SKIPPED, {"skipped": SKIP_REASON})
    with atomic_path(LIVE_DIR / "plots", is_dir=True):
        pass  # an empty folder: the plots output of dvc.yaml must exist
    write_json(METRICS, {"skipped": SKIP_REASON})


def _round(value):
    return None if value is None else round(float(value), 5)


if __name__ == "__main__":
    run_stage(__doc__, main)
