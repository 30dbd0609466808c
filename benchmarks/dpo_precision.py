"""Where bf16 loses DPO's signal: train-dpo in fp32 and in bf16 autocast, compared step by step.

    python -m benchmarks.dpo_precision [--steps 4] [--rounded-deltas]

(--rounded-deltas: without tunepipe.training.keep_lora_deltas_in_fp32, PEFT's bf16 sum, as before the fix)

Trains the same LoRA on the same pairs twice in one process (fp32, then bf16 autocast, as
train-dpo does with params.train_dpo), logging every step: loss, policy and reference
log-prob sums, rewards, gradient norm. Then it separates *learning* from *measuring*: both
trained adapters are scored on the same pairs in both precisions (a 2x2 table), and the
bf16 adapter's update is compared with the fp32 one (cosine of the LoRA weight changes).
If bf16-trained weights score like fp32-trained ones when measured in fp32, bf16 learned as
much and only its measurement of the loss is off; if not, the update itself is worse.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import harness

LOG_KEYS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "grad_norm")


def run(steps: int, ws: Path, precision: str, params_path=None, scratch: Path | None = None):
    """One short DPO run; returns (trainer, per-step logs, the LoRA weights before the first step)."""
    import tempfile

    from transformers import set_seed

    from tunepipe.modeling import load_for_training, load_tokenizer
    from tunepipe.params import load_params
    from tunepipe.preference import build_dpo_trainer, fit_prompts, load_pref_data
    from tunepipe.training import TrainingRun

    params = load_params(params_path or ws / "params.yaml")
    cfg = params.train_dpo.model_copy(update=dict(max_steps=steps, epochs=None, logging_steps=1, save_steps=10**6,
                                                  eval_steps=10**6, precision=precision))
    set_seed(params.shared.seed)
    tokenizer = load_tokenizer(ws / "data/tokenized/tokenizer")
    tokenizer.padding_side = "right"
    train = load_pref_data(ws / "data/tokenized/pref")["train"]
    train = fit_prompts(train.select(range(steps * cfg.batch_size)), tokenizer, cfg.max_prompt_length)
    model, peft_config = load_for_training(ws / "models/base", cfg, tokenizer, trust_remote_code=False)
    out = Path(scratch or tempfile.mkdtemp(prefix="tunepipe-dpo-precision-"))
    trainer = build_dpo_trainer(model, None, tokenizer, {"train": train}, cfg, seed=params.shared.seed,
                                precision=precision, peft_config=peft_config,
                                run=TrainingRun(out / precision, None), output_dir=out / precision / "ckpt")
    initial = lora_state(trainer.model)
    trainer.train()
    logs = [{k: h.get(k) for k in LOG_KEYS} | {"step": h["step"]} for h in trainer.state.log_history if "loss" in h]
    return trainer, logs, initial


def lora_state(model) -> dict:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def scored(trainer, state: dict, batches: list, bf16: bool) -> float:
    """The DPO loss of the LoRA weights ``state`` on ``batches``, in fp32 or under bf16 autocast."""
    import torch

    model = trainer.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in batches:
            losses.append(float(trainer.compute_loss(model, batch)))
    return sum(losses) / len(losses)


def cosine(a: dict, b: dict, a0: dict) -> float:
    """Cosine between the two runs' LoRA weight changes from their common start ``a0`` (same seed)."""
    import torch

    da = torch.cat([(a[n] - a0[n]).flatten() for n in a0])
    db = torch.cat([(b[n] - a0[n]).flatten() for n in a0])
    return float(torch.nn.functional.cosine_similarity(da, db, dim=0))


def main(steps: int = 4, ws: Path | None = None, params_path=None, rounded_deltas: bool = False) -> dict:
    from tunepipe.modeling import set_cpu_threads

    ws = harness.workspace(ws)
    set_cpu_threads()
    if rounded_deltas:
        harness.switch_off("tunepipe.preference", "keep_lora_deltas_in_fp32")
    fp32, fp32_logs, start = run(steps, ws, "fp32", params_path)
    trained = {"fp32": lora_state(fp32.model)}
    bf16, bf16_logs, _ = run(steps, ws, "bf16", params_path)
    trained["bf16"] = lora_state(bf16.model)
    batches = [fp32._prepare_inputs(b) for b in fp32.get_train_dataloader()]
    table = {f"{w}-trained": {mode: round(scored(fp32, trained[w], batches, mode == "bf16"), 5)
                              for mode in ("fp32", "bf16")} for w in ("fp32", "bf16")}
    return {"command": f"python -m benchmarks.dpo_precision --steps {steps}"
                       + (" --rounded-deltas" if rounded_deltas else ""), "steps": steps,
            "per_step": {"fp32": fp32_logs, "bf16": bf16_logs}, "scored_on_trained_pairs": table,
            "update_cosine": round(cosine(trained["fp32"], trained["bf16"], start), 4)}


def report(result: dict) -> str:
    rows = []
    for f, b in zip(result["per_step"]["fp32"], result["per_step"]["bf16"]):
        rows.append({"step": f["step"], **{f"{k} fp32": f[k] for k in ("loss", "rewards/margins", "grad_norm")},
                     **{f"{k} bf16": b[k] for k in ("loss", "rewards/margins", "grad_norm")},
                     "logps/chosen fp32": f["logps/chosen"], "logps/chosen bf16": b["logps/chosen"]})
    cols = list(rows[0]) if rows else []
    score = [{"weights": w, "scored fp32": s["fp32"], "scored bf16": s["bf16"]}
             for w, s in result["scored_on_trained_pairs"].items()]
    return ("train-dpo fp32 vs bf16 autocast, step by step\n" + harness.table(rows, cols)
            + "\n\nDPO loss of each run's final LoRA weights on the pairs it trained on, measured both ways\n"
            + harness.table(score, ["weights", "scored fp32", "scored bf16"])
            + f"\ncosine(fp32 update, bf16 update) of the LoRA weights: {result['update_cosine']}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounded-deltas", action="store_true", help="without the fix (PEFT's bf16 sum)")
    a = p.parse_args()
    res = main(a.steps, rounded_deltas=a.rounded_deltas)
    harness.save_results("dpo_precision" + ("_rounded" if a.rounded_deltas else ""), res)
    print(report(res))
