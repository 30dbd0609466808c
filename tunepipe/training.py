"""What train-sft and train-dpo share: trainer arguments, safe resuming, Ctrl-C, and metrics.

    resume, fp = resume_point("models/checkpoints/sft", cfg, seed, {"data/tokenized": ..., "models/base": ...})
    args = trainer_arguments(cfg, output_dir=..., seed=seed, precision="fp32", evaluate=True)
    run = TrainingRun("metrics/train_sft", resume)                # DVCLive + Ctrl-C handling
    trainer = SFTTrainer(..., callbacks=run.callbacks())
    run.train(trainer)                                            # KeyboardInterrupt after a saved checkpoint
    run.final_evaluation(trainer, has_eval=True)
    summary = {**run.summary(trainer), **provenance(fp, cfg)}
    save_trained(trainer, tokenizer, "models/sft", training_record(fp, summary))  # + training.json
    write_json("metrics/train_sft.json", summary)
    finish_training("models/checkpoints/sft")                     # nothing left to resume

With ``num_processes > 1`` the stage reruns itself under ``accelerate launch``
(``launch_processes``); the launching process checks the fingerprint first, and
only the main training process writes outputs.

Checkpoints resume only when they were written under the same params, inputs,
code, accelerate config and library versions (the fingerprint); anything else is
deleted with a log line saying so, so a run never silently continues a stale one.
A finished run deletes its checkpoints: they exist only between a kill and the
rerun that resumes from them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from tunepipe.artifacts import sha256_json, sha256_tree, write_json, write_text
from tunepipe.environment import library_versions
from tunepipe.params import BOOKKEEPING_KEYS

log = logging.getLogger("tunepipe.training")

FINGERPRINT_FILE = "fingerprint.json"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_RECORD = "training.json"  # written into the saved model folder
CODE_PACKAGES = [Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "stages"]


# --------------------------------------------------------------------------- fingerprint and resume


def stage_fingerprint(section, seed: int, inputs: dict[str, str | Path]) -> dict:
    """Everything a training run's result depends on, and a hash of it all.

    The stage's params (less BOOKKEEPING_KEYS), the seed, a hash of each input, of the
    pipeline's code and of the accelerate config a multi-process run uses, and the library
    versions. A checkpoint is resumed only under the same fingerprint; the saved model
    records it (``training.json``), so a model always says what made it.
    """
    files = dict(inputs)
    if section.num_processes > 1:
        files["accelerate_config"] = accelerate_config(section)
    record = {
        "params": section.model_dump(mode="json", exclude=set(BOOKKEEPING_KEYS)),
        "seed": seed,
        "inputs": {name: sha256_tree(path) for name, path in sorted(files.items())},
        "code": code_sha256(),
        "versions": library_versions(),
    }
    return {"fingerprint": sha256_json(record), **record}


def code_sha256() -> str:
    """One hash over the pipeline's Python code (tunepipe/ and stages/).

    All of it, not only the modules a stage imports today: a checkpoint is cheap to lose
    and a stale one must never be resumed.
    """
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted(package.rglob("*.py")):
            h.update(path.relative_to(package.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint folders oldest first; trainer_state.json is written last, so without it a save was cut short."""
    found = []
    for p in Path(ckpt_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and step.isdigit() and _readable_json(p / "trainer_state.json"):
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def prepare_checkpoints(ckpt_dir: str | Path, fingerprint: dict) -> Optional[Path]:
    """The checkpoint to resume from, or None after clearing checkpoints that do not match ``fingerprint``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stored = _read_fingerprint(ckpt_dir / FINGERPRINT_FILE)
    complete = complete_checkpoints(ckpt_dir)
    everything = [p for p in ckpt_dir.iterdir() if p.name != FINGERPRINT_FILE]
    resume = None
    if stored == fingerprint["fingerprint"] and complete:
        resume = complete[-1]
        stale = [p for p in everything if p.name.startswith(CHECKPOINT_PREFIX) and p not in complete]
        if stale:
            log.warning("removing unfinished checkpoint(s): %s", ", ".join(p.name for p in stale))
    else:
        stale = everything
        if complete:
            log.warning("not resuming: checkpoints were written under different params/inputs "
                        "(%s); deleting %d checkpoint(s) in %s and starting fresh",
                        "no fingerprint" if stored is None else f"fingerprint {stored[:12]} != {fingerprint['fingerprint'][:12]}",
                        len(complete), ckpt_dir)
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    write_json(ckpt_dir / FINGERPRINT_FILE, fingerprint)
    if resume is not None:
        log.info("resuming from %s (same params and inputs)", resume)
    return resume


def resume_point(ckpt_dir: str | Path, section, seed: int, inputs: dict[str, str | Path]) -> tuple[Optional[Path], dict]:
    """The checkpoint this process resumes from (None: start fresh), and the run's fingerprint.

    A process started by ``launch_processes`` takes the newest complete checkpoint and the
    fingerprint the launching process stored: that process has already checked it and
    deleted stale checkpoints, and hashing the inputs once per process would be wasted work.
    """
    if is_launched_process():
        complete = complete_checkpoints(ckpt_dir)
        stored = json.loads((Path(ckpt_dir) / FINGERPRINT_FILE).read_text(encoding="utf-8"))
        return (complete[-1] if complete else None), stored
    fingerprint = stage_fingerprint(section, seed, inputs)
    return prepare_checkpoints(ckpt_dir, fingerprint), fingerprint


def finish_training(ckpt_dir: str | Path) -> None:
    """After the model and metrics are saved: delete the checkpoints.

    A finished run leaves nothing that a later run (``dvc repro -f``, a code change that
    the fingerprint missed) could mistake for its own progress.
    """
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def _read_fingerprint(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- several processes

ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def is_launched_process() -> bool:
    """True in a process started by ``accelerate launch`` (torchrun sets LOCAL_RANK for each)."""
    return "LOCAL_RANK" in os.environ


def launch_processes(params, section: str, ckpt_dir: str | Path) -> bool:
    """Run ``python -m stages.<section>`` in ``num_processes`` processes under ``accelerate launch``.

    Returns False (nothing launched) for one process or inside a launched process.
    The processes read these exact params, written next to the checkpoints. Without
    CUDA they train on CPU over gloo (how the tests run two processes). Ctrl-C
    reaches them directly; this process waits for them to save and stop.
    """
    cfg = getattr(params, section)
    if cfg.num_processes == 1 or is_launched_process():
        return False
    from tunepipe.cli import StageError

    if cfg.distributed.startswith("deepspeed") and not _installed("deepspeed"):
        raise StageError(f"{section}.distributed: {cfg.distributed} needs DeepSpeed: pip install deepspeed")
    params_file = Path(ckpt_dir) / "launch-params.yaml"
    write_text(params_file, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    env = dict(os.environ)
    if not _cuda_available():
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate then runs DDP over gloo on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(cfg)),
           "--num_processes", str(cfg.num_processes), "--main_process_port", str(_free_port()),
           "-m", f"stages.{section}", "--params", str(params_file)]
    log.info("launching %d processes (%s): %s", cfg.num_processes, cfg.distributed, " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGINT, lambda *_: None)  # the workers get Ctrl-C themselves and save
    try:
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if rc in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if rc != 0:
        raise StageError(f"{cfg.num_processes} training processes failed (exit {rc}); see their log above")
    return True


def accelerate_config(cfg) -> Path:
    """configs/accelerate/<distributed>.yaml: a DVC dependency of the training stages."""
    return ACCELERATE_CONFIGS / f"{cfg.distributed}.yaml"


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    # a fresh port per launch, so queued experiments (dvc queue start -j N) do not collide on 29500
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_trained(trainer, tokenizer, target: str | Path, record: dict) -> bool:
    """Save the trained adapter (or model) with its training record (``training.json``, see
    ``training_record``); every process calls this, only the main one writes (and gets True).

    With several processes the weights are gathered first (FSDP and ZeRO-3 shard them),
    which takes every process.
    """
    accelerator = trainer.accelerator
    state_dict = accelerator.get_state_dict(trainer.model_wrapped) if accelerator.num_processes > 1 else None
    main = trainer.is_world_process_zero()
    if main:
        save_model_dir(accelerator.unwrap_model(trainer.model_wrapped), tokenizer, target, state_dict=state_dict,
                       record=record)
    accelerator.wait_for_everyone()
    return main


# --------------------------------------------------------------------------- data


def load_splits(path: str | Path, what: str, required) -> dict:
    """The train and validation splits saved at ``path``, in memory (TRL's dataset maps must not
    write cache files into data/). Each must have the ``required`` columns (a list, or a function
    of the loaded splits that gives one) and rows; else a StageError names the path."""
    from datasets import load_from_disk

    from tunepipe.cli import StageError

    try:
        data = load_from_disk(str(path), keep_in_memory=True)
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(f"{path}: cannot load {what}: {exc}") from None
    if "train" not in data:
        raise StageError(f"{path}: no 'train' split (found {sorted(data)})")
    required = set(required(data) if callable(required) else required)
    out = {}
    for split in ("train", "validation"):
        if split not in data:
            continue
        missing = required - set(data[split].column_names)
        if missing:
            raise StageError(f"{path}/{split}: missing column(s) {sorted(missing)}")
        if len(data[split]) == 0:
            raise StageError(f"{path}/{split}: empty split")
        out[split] = data[split]
    return out


# --------------------------------------------------------------------------- trainer set-up


def score_only_labelled_positions() -> None:
    """Make TRL's fused LM head project only the positions that carry a label, on a CPU too.

    TRL 1.16 (``trl.trainer.utils.add_fused_lm_head``, used by SFTTrainer and
    DPOTrainer) does so only on Triton devices; elsewhere it scores every position,
    so that tile shapes stay fixed for compilers such as Neuron's. A CPU compiles
    nothing, and in the default data 6% of SFT positions carry a label: the LM head
    and its log-softmax over the 49k vocabulary were a third of an SFT step here.
    The numbers are the same either way. A no-op where TRL has no such switch.
    """
    from trl.trainer import utils

    original = getattr(utils, "_use_triton", None)
    if original is None or hasattr(original, "plain"):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or original(device)

    compact.plain = original
    utils._use_triton = compact


def keep_lora_deltas_in_fp32() -> None:
    """Under autocast, add each LoRA delta to its layer's output in fp32 and pass that on in fp32.

    PEFT adds ``B(A(x))`` to the base layer's bf16 output in bf16. That output is already
    on bf16's grid, so a delta under half a bf16 step (2^-9 of the value) rounds back to
    exactly the base output: a young adapter's effect vanished from the forward pass. In
    DPO, where the loss is the policy's log-probs minus the reference's (the same model
    with the adapter off), the bf16 run measured a reward margin a sixth of fp32's after
    one update, although its weights, scored in fp32, had learned as much
    (python -m benchmarks.dpo_precision). With the sum in fp32 the residual stream (fp32
    under autocast) keeps the deltas. The reference pass (adapter off) outputs fp32 too, so
    the two passes differ only by the deltas. Outside autocast this is PEFT's own forward.
    The frozen base weight's bf16 cast is kept, not made at every forward (tunepipe.casts).
    """
    import torch
    from peft.tuners.lora import layer

    from tunepipe.casts import frozen_linear

    original = layer.Linear.forward
    if hasattr(original, "plain"):
        return

    def forward(self, x, *args, **kwargs):
        if (self.merged or self.lora_variant or kwargs.get("adapter_names") is not None
                or not torch.is_autocast_enabled(x.device.type)):
            return original(self, x, *args, **kwargs)
        # the reference pass (adapter off) takes the same fp32 path: else policy and reference differ
        # by rounding alone and DPO's rewards start away from zero
        result = frozen_linear(self.base_layer, x, *args, **kwargs).float()
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
                result = result + delta.float() * self.scaling[name]
        return result

    forward.plain = original
    layer.Linear.forward = forward


def choose_precision(precision: str, model_dir: str | Path) -> tuple[str, dict]:
    """The precision to train in (``auto`` measured: tunepipe.precision), logged, and what the stage's
    metrics record of the choice: the measured bf16/fp32 speed ratio and where the choice came from."""
    from tunepipe.precision import choose, describe

    choice = choose(precision, model_dir)
    log.info(describe(choice))
    return choice["precision"], {"precision_source": "measured" if choice["source"] in ("probe", "cache")
                                 else choice["source"], "precision_bf16_speedup": choice.get("bf16_speedup")}


def trainer_arguments(cfg, *, output_dir: str | Path, seed: int, precision: str, evaluate: bool) -> dict:
    """TrainingArguments fields every TRL config here shares, all from the stage's params section."""
    return dict(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a fraction of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        num_train_epochs=cfg.epochs or 1.0,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # transformers refuses bf16 without a GPU unless told the CPU is meant (precision: auto
        # picks bf16 on a CPU only where it measured it clearly faster: tunepipe.precision)
        use_cpu=precision == "bf16" and not _cuda_available(),
        activation_checkpointing=cfg.gradient_checkpointing or cfg.method == "qlora",
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


# --------------------------------------------------------------------------- one training run


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _NothingLeftToTrain(Exception):
    """Raised before a step when the run already reached max_steps."""


class TrainingRun:
    """DVCLive logging on the trainer's global step, tokens/s, and a Ctrl-C that saves before stopping."""

    def __init__(self, live_dir: str | Path, resume_from: Optional[Path]):
        self.live_dir = Path(live_dir)
        self.resume_from = resume_from
        self.interrupted = False
        self.train_seconds = 0.0
        self.step_seconds = 0.0
        self.tokens_at_start = 0
        self.last_eval: dict = {}
        self.live = None

    def callbacks(self) -> list:
        from transformers import TrainerCallback

        run = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                run._open_live(state)

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step >= state.max_steps:
                    # resumed from the last step's checkpoint: transformers 5 would run one step past
                    # max_steps when it ends inside an epoch (its epoch loop checks only after a step)
                    raise _NothingLeftToTrain
                run._step_started = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                run.step_seconds += time.perf_counter() - run._step_started
                if state.global_step >= state.max_steps:
                    # the final loss is logged and a final checkpoint exists, so a kill
                    # during the final evaluation or save resumes with nothing to redo
                    control.should_log = control.should_save = True
                if run.interrupted:
                    control.should_save = True
                    control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kw):
                run._log(state, logs or {})

        return [_Callback()]

    # ---- DVCLive

    def _open_live(self, state) -> None:
        resumed_step = state.global_step if self.resume_from is not None else 0
        if resumed_step and state.is_world_process_zero:
            # rows logged after the checkpoint was taken are logged again by the resumed run
            _truncate_plots(self.live_dir / "plots", resumed_step)
        # one writer: with several processes only the main one logs (all of them keep last_eval)
        self.live = _plots_only_live(self.live_dir, resume=bool(resumed_step)) if state.is_world_process_zero else None
        self.tokens_at_start = self._tokens_logged = state.num_input_tokens_seen
        self._seconds_logged = self.step_seconds = 0.0

    def _log(self, state, logs: dict) -> None:
        if any(k.startswith("eval_") for k in logs):
            self.last_eval = {k[len("eval_"):]: v for k, v in logs.items() if k.startswith("eval_")}
            self.last_eval["step"] = state.global_step
        if self.live is None:
            return
        self.live.step = state.global_step
        for key, value in logs.items():
            name = _plot_name(key)
            if name and isinstance(value, (int, float)) and math.isfinite(value):
                self.live.log_metric(name, float(value))
        if "loss" in logs and self.step_seconds > self._seconds_logged:
            tokens = state.num_input_tokens_seen - self._tokens_logged
            self.live.log_metric("train/tokens_per_second", round(tokens / (self.step_seconds - self._seconds_logged), 2))
            self._tokens_logged, self._seconds_logged = state.num_input_tokens_seen, self.step_seconds

    def log_metrics(self, step: int, metrics: dict) -> None:
        """Log figures measured outside the trainer's own logs (the held-out check) at ``step``."""
        if self.live is None:
            return
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, float(value))

    # ---- running

    def train(self, trainer) -> None:
        """Train (resuming if asked); on Ctrl-C save a checkpoint, then raise KeyboardInterrupt."""
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        started = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        except _NothingLeftToTrain:
            trainer.is_in_train = False
            log.info("the checkpoint is from the last step (%d): nothing left to train", trainer.state.global_step)
        finally:
            self.train_seconds = time.perf_counter() - started
            signal.signal(signal.SIGINT, previous)
        if self.interrupted:
            log.warning("interrupted: checkpoint saved at step %d; rerun the stage to resume", trainer.state.global_step)
            raise KeyboardInterrupt

    def final_evaluation(self, trainer, has_eval: bool) -> None:
        """Evaluate at the last step unless the trainer just did.

        DVCLive writes each tsv row as it is logged; its own summary (metrics.json) is
        never written: metrics/<stage>.json is the stage's summary.
        """
        if not has_eval or self.last_eval.get("step") == trainer.state.global_step:
            return
        # a run resumed from its final checkpoint finds that evaluation in the restored history
        done = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        if done:
            self.last_eval = {k[len("eval_"):]: v for k, v in done[-1].items() if k.startswith("eval_")}
            self.last_eval["step"] = trainer.state.global_step
        else:
            trainer.evaluate()

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:
            # accelerate launch (torchrun) forwards the same Ctrl-C a moment later: not a second one
            if time.monotonic() - self._interrupted_at < 2.0:
                return
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.interrupted, self._interrupted_at = True, time.monotonic()
        log.warning("Ctrl-C: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort now)")

    def summary(self, trainer) -> dict:
        """Final figures for metrics/<stage>.json (loss from the last logged step)."""
        state = trainer.state
        last_train = next((h for h in reversed(state.log_history) if "loss" in h), {})
        tokens = state.num_input_tokens_seen
        session_tokens = tokens - self.tokens_at_start
        return {
            "train_loss": _round(last_train.get("loss")),
            "eval_loss": _round(self.last_eval.get("loss")),
            "steps": state.global_step,
            "trained_tokens": int(tokens),
            "tokens_per_second": round(session_tokens / self.step_seconds, 2) if self.step_seconds else None,
            "train_seconds": round(self.train_seconds, 1),
            "peak_rss_mib": peak_rss_mib(),
            "resumed_from_step": checkpoint_step(self.resume_from),
            "processes": trainer.accelerator.num_processes,
        }


def _plots_only_live(live_dir: Path, resume: bool):
    """DVCLive writing tsv plots only.

    Its repository hooks (experiments, dvc.yaml, Studio) are skipped: dvc.yaml already
    declares these files, and the hooks fail in a git repo without commits.
    """
    from dvclive import Live

    class PlotsOnlyLive(Live):
        def _init_dvc(self):
            pass

    return PlotsOnlyLive(dir=str(live_dir), resume=resume, dvcyaml=None, save_dvc_exp=False)


def checkpoint_step(path: Optional[Path]) -> Optional[int]:
    return int(path.name[len(CHECKPOINT_PREFIX):]) if path is not None else None


def _round(value, digits: int = 5):
    return None if value is None else round(float(value), digits)


_PLOT_NAMES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
               "eval_loss": "eval/loss",
               # GRPO / RLOO: the reward, the leash, and what the samples look like
               "reward": "train/reward", "kl": "train/kl", "entropy": "train/entropy",
               "completions/mean_length": "train/completion_length",
               "completions/clipped_ratio": "train/completion_clipped",
               "frac_reward_zero_std": "train/frac_reward_zero_std",
               # KTO and ORPO
               "nll_loss": "train/nll_loss", "log_odds_ratio": "train/log_odds_ratio",
               "log_odds_chosen": "train/log_odds_chosen", "eval_kl": "eval/kl", "eval_nll_loss": "eval/nll_loss",
               "eval_log_odds_ratio": "eval/log_odds_ratio", "eval_log_odds_chosen": "eval/log_odds_chosen"}


def _plot_name(key: str) -> Optional[str]:
    """Trainer log keys -> DVCLive metric paths (train/..., eval/...); None for bookkeeping keys."""
    if key in _PLOT_NAMES:
        return _PLOT_NAMES[key]
    if key.startswith("rewards/") and key.count("/") == 2:
        # GRPO / RLOO: each reward function's mean (rewards/checker/mean -> train/rewards/checker), not its spread
        return "train/" + key[:-len("/mean")] if key.endswith("/mean") else None
    if key.startswith("eval_") and ("rewards/" in key or "logps/" in key):
        return "eval/" + key[len("eval_"):]
    if key.startswith(("rewards/", "logps/")) or key == "mean_token_accuracy":
        return "train/" + key
    if key == "eval_mean_token_accuracy":
        return "eval/mean_token_accuracy"
    return None


def _truncate_plots(plots_dir: Path, last_step: int) -> None:
    for tsv in plots_dir.rglob("*.tsv"):
        with open(tsv, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
            fields = list(rows[0]) if rows else []
        kept = [r for r in rows if int(r["step"]) <= last_step]
        if len(kept) == len(rows):
            continue
        with open(tsv, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fields, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)


def save_model_dir(model, tokenizer, target: str | Path, state_dict: Optional[dict] = None,
                   record: Optional[dict] = None) -> None:
    """Save an adapter (or a fully fine-tuned model), its tokenizer and its training record
    atomically into ``target``."""
    from tunepipe.artifacts import atomic_path

    with atomic_path(target, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        _sort_adapter_config(tmp / "adapter_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if record is not None:
            write_json(tmp / TRAINING_RECORD, record)


def _sort_adapter_config(path: Path) -> None:
    """Write PEFT's target_modules in sorted order.

    PEFT saves them from a set, so their order follows Python's per-process hash seed:
    the same training gave a different adapter_config.json in every process, and DVC
    reran everything after it for identical weights.
    """
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# Figures of the machine or of the run's history, not of the model: they stay out of the
# model folder's record, so the same training gives the same folder (and DVC reruns nothing after it).
RUN_FIGURES = ("train_seconds", "tokens_per_second", "peak_rss_mib", "resumed_from_step", "code_sha256", "versions",
               "precision_source", "precision_bf16_speedup", *BOOKKEEPING_KEYS)


def training_record(fingerprint: dict, summary: dict) -> dict:
    """What the model folder's training.json holds: the fingerprint and the run's results."""
    return {**fingerprint, "results": {k: v for k, v in summary.items() if k not in RUN_FIGURES}}


def provenance(fingerprint: dict, cfg) -> dict:
    """What metrics/<stage>.json records of a run beyond its figures: code, libraries, bookkeeping."""
    return {"code_sha256": fingerprint["code"][:12], "versions": fingerprint["versions"],
            **{key: getattr(cfg, key) for key in BOOKKEEPING_KEYS}}
