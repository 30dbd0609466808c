"""train-dpo throughput: the pipeline's configuration vs a plain TRL DPOTrainer.

    python -m benchmarks.dpo [--steps 3] [--repeats 2]

Both sides train the same LoRA (params.train_dpo), learning rate, beta, batch
size and number of steps on the same first steps x batch_size preference pairs
of data/tokenized/pref (one pass, so a precomputed reference costs exactly what
it saves), each in its own process. The policy starts from models/base (the
speed does not depend on which weights it starts from; the stage merges SFT in).

    baseline   DPOConfig defaults (gradient checkpointing on, reference log-probs computed every step
               by a forward with the adapter switched off), fp32 (TRL's bf16 default forced off)
    ours       tunepipe.preference.build_dpo_trainer with params.train_dpo (LM head only at completion
               positions, each shared prefix computed once (tunepipe.shared_prefix: a prompt for
               both answers, the system prompt for the batch), no checkpointing, params' precision; the default
               params compute the reference each step too, as the default run trains on fewer
               pairs than the data set holds and precomputing all of them would cost more)
    ours+precompute  ours with reference log-probs precomputed once (--levers)
    ours+bf16 (bf16 autocast; with tunepipe.training.keep_lora_deltas_in_fp32 it learns as fp32 does,
                     see benchmarks.dpo_precision), ours+checkpointing, ours-all_positions (TRL's
                     LM head over every position, prompt included, as TRL does off Triton devices),
                     ours-unshared_prefix (the padded batch as it comes), ours-trl_log_probs (TRL's
                     own CPU fold of the LM head's tiles), ours-bf16_attention (under bf16, attention
                     in bf16 too instead of tunepipe.attention's fp32), ours-recast_weights (under
                     bf16, each frozen weight cast to bf16 at every use, as autocast does, instead of
                     once: tunepipe.casts): one lever changed each (--levers)

Reported: pairs/s over steps 2..N (steady state) and end to end (trainer
construction, which precomputes the reference, through the last step), peak RSS,
and the losses of every step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import harness

VARIANTS = {"baseline": {}, "ours": {}, "ours+precompute": {"precompute_ref_log_probs": True},
            "ours+checkpointing": {"gradient_checkpointing": True}, "ours+bf16": {"precision": "bf16"},
            "ours-all_positions": {}, "ours-unshared_prefix": {}, "ours-trl_log_probs": {},
            "ours-bf16_attention": {}, "ours-recast_weights": {}}
LEVERS = [v for v in VARIANTS if v not in ("baseline", "ours")]
SWITCHED_OFF = {"ours-all_positions": ("tunepipe.preference", "score_only_labelled_positions"),
                "ours-unshared_prefix": ("tunepipe.shared_prefix", "share_prefixes_in_backbone"),
                "ours-trl_log_probs": ("tunepipe.preference", "use_tiled_log_probs"),
                "ours-bf16_attention": ("tunepipe.attention", "attend_in_fp32"),
                "ours-recast_weights": ("tunepipe.casts", "may_keep")}


def train_once(spec: dict) -> dict:
    from transformers import set_seed

    from benchmarks.sft import StepClock
    from tunepipe.modeling import load_for_training, load_tokenizer, resolve_precision
    from tunepipe.params import load_params
    from tunepipe.preference import build_dpo_trainer, fit_prompts, load_pref_data
    from tunepipe.training import TrainingRun

    ws = Path(spec["workspace"])
    params = load_params(spec.get("params") or harness.REPO / "params.yaml")
    cfg = params.train_dpo.model_copy(update=dict(
        max_steps=spec["steps"], epochs=None, logging_steps=1, save_steps=10**6, eval_steps=10**6,
        **VARIANTS.get(spec["variant"], {}), **spec.get("overrides", {})))
    seed = params.shared.seed
    set_seed(seed)

    # ---- tokenizer and data: the first steps x batch pairs
    tokenizer = load_tokenizer(ws / "data/tokenized/tokenizer")
    tokenizer.padding_side = "right"
    train = load_pref_data(ws / "data/tokenized/pref")["train"]
    train = train.select(range(min(spec["steps"] * cfg.batch_size * cfg.grad_accum, len(train))))
    data = {"train": fit_prompts(train, tokenizer, cfg.max_prompt_length)}

    # ---- model
    model, peft_config = load_for_training(ws / "models/base", cfg, tokenizer, trust_remote_code=False)

    # ---- trainer (construction is timed: precomputing the reference happens there)
    if spec["variant"] in SWITCHED_OFF:
        harness.switch_off(*SWITCHED_OFF[spec["variant"]])
    out = Path(spec["scratch"])
    started = time.perf_counter()
    if spec["variant"] == "baseline":
        trainer = plain_trainer(model, tokenizer, data["train"], cfg, seed, peft_config, out / "ckpt")
    else:
        trainer = build_dpo_trainer(model, None, tokenizer, data, cfg, seed=seed,
                                    precision=resolve_precision(cfg.precision), peft_config=peft_config,
                                    run=TrainingRun(out / "live", None), output_dir=out / "ckpt")
    built = time.perf_counter()
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    ends = clock.ends
    steady = ends[-1] - ends[0] if len(ends) >= 2 else None
    pairs_per_step = cfg.batch_size * cfg.grad_accum
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": len(ends), "pairs": pairs_per_step * len(ends), "construct_seconds": built - started,
            "total_seconds": ends[-1] - started,
            "pairs_per_s": pairs_per_step * (len(ends) - 1) / steady if steady else None,
            "pairs_per_s_end_to_end": pairs_per_step * len(ends) / (ends[-1] - started),
            "losses": losses, "final_loss": losses[-1] if losses else None,
            "checkpointing": bool(trainer.args.gradient_checkpointing),
            "precompute": bool(trainer.args.precompute_ref_log_probs), "bf16": bool(trainer.args.bf16)}


def plain_trainer(model, tokenizer, train, cfg, seed, peft_config, output_dir):
    """TRL's DPOTrainer with its defaults; only what must match ours is set (and fp32)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(output_dir), seed=seed, learning_rate=cfg.learning_rate,
                     lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, max_steps=cfg.max_steps,
                     per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                     weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, beta=cfg.beta,
                     logging_steps=1, save_strategy="no", report_to="none", bf16=False, disable_tqdm=True)
    return DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config)


def main(steps: int = 3, repeats: int = 2, levers: bool | list[str] = False, ws: Path | None = None,
         concurrent: bool = False, overrides: dict | None = None) -> dict:
    ws = harness.workspace(ws)
    chosen = LEVERS if levers is True else list(levers or [])
    variants = ["baseline", "ours"] + chosen
    spec = {"workspace": str(ws), "steps": steps, "overrides": overrides or {}}
    schedule = harness.concurrent if concurrent else harness.interleaved
    runs = schedule(variants, repeats,
                               lambda v: harness.run_worker("benchmarks.dpo", dict(spec, variant=v)))
    return summarize(runs, f"python -m benchmarks.dpo --steps {steps} --repeats {repeats}"
                     + (" --levers" if levers is True else f" --lever {' --lever '.join(chosen)}" if chosen else "")
                     + (" --concurrent" if concurrent else ""), ws, steps, repeats)


def summarize(runs: dict[str, list[dict]], command: str, ws: Path, steps: int, repeats: int) -> dict:
    base = harness.median(runs["baseline"], "pairs_per_s")
    base_e2e = harness.median(runs["baseline"], "pairs_per_s_end_to_end")
    rows = []
    for variant, rs in runs.items():
        pps, e2e = harness.median(rs, "pairs_per_s"), harness.median(rs, "pairs_per_s_end_to_end")
        rows.append({"variant": variant, "pairs_per_s": round(pps, 3), "speedup": harness.ratio(pps, base),
                     "pairs_per_s_end_to_end": round(e2e, 3), "speedup_end_to_end": harness.ratio(e2e, base_e2e),
                     "construct_s": round(harness.median(rs, "construct_seconds"), 1),
                     "peak_rss_mib": harness.median(rs, "peak_rss_mib"),
                     "final_loss": round(harness.median(rs, "final_loss"), 4),
                     "checkpointing": rs[0]["checkpointing"], "precompute": rs[0]["precompute"]})
    return {"command": command, "workspace": str(ws), "steps": steps, "repeats": repeats, "rows": rows,
            "speedup": rows[1]["speedup"], "speedup_end_to_end": rows[1]["speedup_end_to_end"],
            "losses": {v: r[0]["losses"] for v, r in runs.items()}}


COLUMNS = ["variant", "pairs_per_s", "speedup", "pairs_per_s_end_to_end", "speedup_end_to_end", "construct_s",
           "peak_rss_mib", "final_loss", "checkpointing", "precompute"]


def report(result: dict) -> str:
    return (f"train-dpo: {result['steps']} steps of params.train_dpo.batch_size pairs, "
            f"median of {result['repeats']} runs\n"
            + harness.table(result["rows"], COLUMNS))


if __name__ == "__main__":
    if not harness.worker_main(sys.argv, train_once):
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--repeats", type=int, default=2)
        p.add_argument("--levers", action="store_true", help="also run one variant per lever")
        p.add_argument("--lever", action="append", choices=LEVERS, help="also run this lever's variant (repeatable)")
        p.add_argument("--concurrent", action="store_true",
                       help="run the variants at the same time (a machine shared with other jobs)")
        a = p.parse_args()
        res = main(a.steps, a.repeats, True if a.levers else (a.lever or []), concurrent=a.concurrent)
        harness.save_results("dpo", res)
        print(report(res))
