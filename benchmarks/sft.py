"""train-sft throughput: the pipeline's configuration vs a plain TRL SFTTrainer, and one run per lever.

    python -m benchmarks.sft [--steps 4] [--repeats 2] [--examples 64] [--levers]

Both sides train the same LoRA (params.train_sft), learning rate, batch size and
number of steps on the same tokenized examples in the same order, each in its own
process (peak RSS = ru_maxrss). Reported: trained tokens/s (label != -100) over
steps 2..N (step 1 warms up), peak memory, the loss of every step and their mean (the loss
check: ours' mean at most the baseline's), and MFU: model FLOPs/s over this machine's fp32
matmul peak (benchmarks.peak).

    baseline     SFTConfig defaults (pad to the longest, no packing, gradient checkpointing on,
                 TRL's default), fp32 (TRL's bf16 default is forced off: see benchmarks.peak)
    ours         stages.train_sft.build_trainer with params.train_sft (padding-free with packed-aware
                 attention, LM head only at label positions, no checkpointing, precision auto: bf16
                 autocast where the CPU has native bf16)
    ours+bf16, ours-fp32, ours+group_by_length, ours+checkpointing, ours-padded,
    ours-masked_attention (padding-free on transformers' block-diagonal mask instead of
    tunepipe.attention), ours-all_positions (TRL's LM head over every position, as on a GPU
    it does only over labelled ones), ours-bernoulli_dropout (PEFT's nn.Dropout instead of
    tunepipe.dropout's), ours-unshared_prefix (every example computes the system prompt again
    instead of tunepipe.shared_prefix sending it once), ours-trl_log_probs (TRL's own CPU fold of the LM
    head's tiles instead of tunepipe.lm_head's), ours-bf16_attention (under bf16, attention in bf16
    too instead of tunepipe.attention's fp32), ours-bf16_deltas (under bf16, PEFT's bf16 sum of each
    LoRA delta instead of tunepipe.training.keep_lora_deltas_in_fp32's fp32), ours-recast_weights (under
    bf16, each frozen weight cast to bf16 at every use, as autocast does, instead of once:
    tunepipe.casts): one lever changed each (--levers)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import harness

VARIANTS = {
    "baseline": {},
    "ours": {},
    "ours+bf16": {"precision": "bf16"},
    "ours+group_by_length": {"group_by_length": True},
    "ours+checkpointing": {"gradient_checkpointing": True},
    "ours-padded": {"padding_free": False},
    "ours-fp32": {"precision": "fp32"},
    "ours-masked_attention": {},
    "ours-all_positions": {},
    "ours-bernoulli_dropout": {},
    "ours-unshared_prefix": {},
    "ours-trl_log_probs": {},
    "ours-bf16_attention": {},
    "ours-bf16_deltas": {},
    "ours-recast_weights": {},
}
# Levers that are code, not params: the variant switches the function off (module, name).
SWITCHED_OFF = {"ours-masked_attention": ("tunepipe.attention", "use_packed_sdpa"),
                "ours-all_positions": ("stages.train_sft", "score_only_labelled_positions"),
                "ours-bernoulli_dropout": ("stages.train_sft", "use_fast_lora_dropout"),
                "ours-unshared_prefix": ("stages.train_sft", "use_shared_prefix"),
                "ours-trl_log_probs": ("stages.train_sft", "use_tiled_log_probs"),
                "ours-bf16_attention": ("tunepipe.attention", "attend_in_fp32"),
                "ours-bf16_deltas": ("stages.train_sft", "keep_lora_deltas_in_fp32"),
                "ours-recast_weights": ("tunepipe.casts", "may_keep")}
LEVERS = [v for v in VARIANTS if v not in ("baseline", "ours")]


# --------------------------------------------------------------------------- worker (one process per run)


def train_once(spec: dict) -> dict:
    """One short training run of ``spec['variant']``; returns per-step timing, tokens and losses."""
    from transformers import set_seed

    from tunepipe.modeling import load_for_training, load_tokenizer, resolve_precision
    from tunepipe.params import load_params
    from tunepipe.training import TrainingRun

    ws = Path(spec["workspace"])
    params = load_params(spec.get("params") or harness.REPO / "params.yaml")
    overrides = dict(max_steps=spec["steps"], epochs=None, logging_steps=1, save_steps=10**6, eval_steps=10**6,
                     **VARIANTS.get(spec["variant"], {}), **spec.get("overrides", {}))
    cfg = params.train_sft.model_copy(update=overrides)
    seed = params.shared.seed
    precision = resolve_precision(cfg.precision)
    set_seed(seed)

    # ---- data: the same first examples for every variant
    from stages.train_sft import build_trainer, load_sft_data, padding_free_supported

    data = {"train": load_sft_data(ws / "data/tokenized/sft")["train"]}
    data["train"] = data["train"].select(range(min(spec["examples"], len(data["train"]))))

    # ---- tokenizer and model
    tokenizer = load_tokenizer(ws / "data/tokenized/tokenizer")
    tokenizer.padding_side = "right"
    model, peft_config = load_for_training(ws / "models/base", cfg, tokenizer, trust_remote_code=False)
    flops_per_token = model_flops_per_token(model)

    # ---- trainer
    if spec["variant"] in SWITCHED_OFF:
        harness.switch_off(*SWITCHED_OFF[spec["variant"]])
    out = Path(spec["scratch"])
    if spec["variant"] == "baseline":
        trainer = plain_trainer(model, tokenizer, data["train"], cfg, seed, peft_config, out / "ckpt")
    else:
        run = TrainingRun(out / "live", None)
        trainer = build_trainer(model, tokenizer, data, cfg, seed=seed, precision=precision,
                                padding_free=cfg.padding_free and padding_free_supported(model),
                                peft_config=peft_config, run=run, output_dir=out / "ckpt")
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    clock = StepClock()
    trainer.add_callback(clock)

    # ---- train
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return measured(spec["steps"], clock.ends, counter, flops_per_token, losses,
                    precision="bf16" if trainer.args.bf16 else "fp32",
                    checkpointing=bool(trainer.args.gradient_checkpointing),
                    padding_free=bool(getattr(trainer.args, "padding_free", False)))


def plain_trainer(model, tokenizer, train, cfg, seed, peft_config, output_dir):
    """TRL's SFTTrainer with its defaults; only what must match ours is set (and fp32, see the module doc)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(output_dir), seed=seed, learning_rate=cfg.learning_rate,
                     lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, max_steps=cfg.max_steps,
                     per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                     weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, logging_steps=1,
                     save_strategy="no", report_to="none", bf16=False, disable_tqdm=True)
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                      peft_config=peft_config)


class TokenCounter:
    """Wraps the collator: counts, for each batch in order, the trained (label != -100) tokens, the examples'
    tokens, and the tokens the model computes (more with padding, fewer with a shared prefix sent once)."""

    def __init__(self, collator):
        self.collator = collator
        self.trained: list[int] = []
        self.real: list[int] = []
        self.computed: list[int] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.trained.append(int((batch["labels"] != -100).sum()))
        self.real.append(sum(len(e["input_ids"]) for e in examples))
        self.computed.append(int(batch["input_ids"].numel()))
        return batch


def StepClock():  # noqa: N802 (a factory: transformers is imported only inside the worker)
    """A trainer callback recording when each optimizer step ends (``.ends``)."""
    from transformers import TrainerCallback

    class _StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    return _StepClock()


def model_flops_per_token(model) -> dict:
    """Matmul FLOPs of one token, LoRA training: forward 2N, backward to activations 2N (frozen weights get
    no weight gradient), for the body per example token and for the LM head per trained token (TRL 1.16
    projects only label positions). Attention score FLOPs are left out (<3% at these lengths)."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(m.weight.numel() for name, m in model.named_modules()
               if type(m).__name__ == "Linear" and "lm_head" not in name)
    return {"body": 4 * body, "head": 4 * head}


def measured(steps: int, ends: list[float], counter: TokenCounter, flops: dict, losses: list[float], **extra) -> dict:
    """Tokens and seconds of steps 2..N: batch k is step k (grad_accum 1), whatever the loader prefetched."""
    seconds = ends[-1] - ends[0] if len(ends) >= 2 else None
    trained = sum(counter.trained[1:steps])
    real = sum(counter.real[1:steps])
    computed = sum(counter.computed[1:steps])
    # MFU counts the FLOPs of the examples' tokens (padding is waste, a shared prefix counts once per example)
    model_flops = flops["body"] * real + flops["head"] * trained
    return {"steps": len(ends), "seconds": seconds, "trained_tokens": trained, "real_tokens": real,
            "computed_tokens": computed, "tokens_per_s": trained / seconds if seconds else None,
            "model_gflops_per_s": model_flops / seconds / 1e9 if seconds else None,
            "losses": losses, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "mean_loss": sum(losses) / len(losses) if losses else None, **extra}


# --------------------------------------------------------------------------- driver


def main(steps: int = 4, repeats: int = 2, examples: int = 64, levers: bool | list[str] = False,
         ws: Path | None = None, peak: dict | None = None, concurrent: bool = False) -> dict:
    from benchmarks import peak as peak_mod

    ws = harness.workspace(ws)
    peak = peak or peak_mod.main()
    chosen = LEVERS if levers is True else list(levers or [])
    variants = ["baseline", "ours"] + chosen
    spec = {"workspace": str(ws), "steps": steps, "examples": examples}
    schedule = harness.concurrent if concurrent else harness.interleaved
    runs = schedule(variants, repeats,
                               lambda v: harness.run_worker("benchmarks.sft", dict(spec, variant=v)))
    command = (f"python -m benchmarks.sft --steps {steps} --repeats {repeats} --examples {examples}"
               + (" --levers" if levers is True else f" --lever {' --lever '.join(chosen)}" if chosen else "")
               + (" --concurrent" if concurrent else ""))
    return result_of(runs, peak, command, ws, steps, repeats, examples)


def result_of(runs: dict[str, list[dict]], peak: dict, command: str, ws: Path, steps: int, repeats: int,
              examples: int) -> dict:
    rows = summarize(runs, peak)
    result = {"command": command, "workspace": str(ws), "steps": steps, "repeats": repeats, "examples": examples,
              "peak": peak, "rows": rows, "losses": {v: r[0]["losses"] for v, r in runs.items()}}
    base, ours = rows[0], rows[1]
    result["speedup"] = ours["speedup"]
    # the mean over the steps (the same batches on both sides), not the last batch's loss alone: that one
    # moved by 0.03 between numerically different runs of the default workload, either way
    result["loss_ok"] = ours["mean_loss"] <= base["mean_loss"] + 1e-3
    result["step1_loss_diff"] = abs(ours["first_loss"] - base["first_loss"])
    return result


def summarize(runs: dict[str, list[dict]], peak: dict) -> list[dict]:
    base_tps = harness.median(runs["baseline"], "tokens_per_s")
    rows = []
    for variant, rs in runs.items():
        tps = harness.median(rs, "tokens_per_s")
        gflops = harness.median(rs, "model_gflops_per_s")
        rows.append({
            "variant": variant, "tokens_per_s": round(tps, 4), "speedup": harness.ratio(tps, base_tps),
            "peak_rss_mib": harness.median(rs, "peak_rss_mib"),
            "computed_share": round(rs[0]["computed_tokens"] / rs[0]["real_tokens"], 3),
            "mfu_fp32": harness.ratio(gflops, peak["fp32_gflops"], 3),
            "mfu_bf16": harness.ratio(gflops, peak["bf16_gflops"], 3),
            "first_loss": round(rs[0]["first_loss"], 4), "final_loss": round(harness.median(rs, "final_loss"), 4),
            "mean_loss": round(harness.median(rs, "mean_loss"), 4),
            "precision": rs[0]["precision"], "checkpointing": rs[0]["checkpointing"],
            "padding_free": rs[0]["padding_free"],
        })
    return rows


COLUMNS = ["variant", "tokens_per_s", "speedup", "peak_rss_mib", "computed_share", "mfu_fp32", "mfu_bf16",
           "first_loss", "final_loss", "mean_loss", "precision", "checkpointing", "padding_free"]


def report(result: dict) -> str:
    return (f"train-sft: {result['steps']} steps x batch 8, median of {result['repeats']} interleaved runs; "
            f"tokens/s over steps 2..{result['steps']}\n" + harness.table(result["rows"], COLUMNS)
            + f"\nstep-1 loss |ours - baseline| = {result['step1_loss_diff']:.2e}; "
              f"mean loss over the {result['steps']} steps ours <= baseline: {result['loss_ok']}")


if __name__ == "__main__":
    if not harness.worker_main(sys.argv, train_once):
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--repeats", type=int, default=2)
        p.add_argument("--examples", type=int, default=64)
        p.add_argument("--levers", action="store_true", help="also run one variant per lever")
        p.add_argument("--lever", action="append", choices=LEVERS, help="also run this lever's variant (repeatable)")
        p.add_argument("--concurrent", action="store_true",
                       help="run the variants at the same time (a machine shared with other jobs)")
        a = p.parse_args()
        res = main(a.steps, a.repeats, a.examples, True if a.levers else (a.lever or []), concurrent=a.concurrent)
        harness.save_results("sft", res)
        print(report(res))
