"""train-sft on the tiny model: reproducible, resumable, Ctrl-C safe, and padding-free without cross-talk."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import yaml

from tests.trainingdata import make_workdir, tiny_params


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model_dir, smol_tokenizer):
    make_workdir(tmp_path, tiny_model_dir, smol_tokenizer)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def adapter_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def plot_rows(name: str) -> list[dict]:
    with open(Path("metrics/train_sft/plots/metrics") / f"{name}.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def interrupt_at(monkeypatch, step: int) -> None:
    """Send this process a real SIGINT at the end of ``step``, as Ctrl-C would."""
    from transformers import TrainerCallback

    from tunepipe.training import TrainingRun

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGINT)

    original = TrainingRun.callbacks
    monkeypatch.setattr(TrainingRun, "callbacks", lambda self: [CtrlC(), *original(self)])


def run_cli(params) -> None:
    """The stage as `python -m stages.train_sft --params ...` runs it (exit codes included)."""
    from stages import train_sft
    from tunepipe.cli import run_stage

    Path("params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    run_stage(train_sft.__doc__, train_sft.main, argv=["--params", "params.yaml"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, smol_tokenizer):
    """One uninterrupted 4-step run: its folder, adapter, loss curve and metrics."""
    from stages import train_sft

    root = make_workdir(tmp_path_factory.mktemp("reference"), tiny_model_dir, smol_tokenizer)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train_sft.main(tiny_params())
        return {"root": root, "weights": adapter_weights(root / "models/sft"), "loss": plot_rows("train/loss"),
                "metrics": json.loads(Path("metrics/train_sft.json").read_text())}
    finally:
        os.chdir(cwd)


def test_same_seed_gives_same_adapter_and_loss_curve(workdir, reference):
    from stages import train_sft

    first = reference["metrics"]
    assert first["steps"] == 4 and first["trained_tokens"] > 0 and first["eval_loss"] is not None
    assert [r["step"] for r in reference["loss"]] == ["1", "2", "3", "4"]
    assert {"learning_rate", "tokens_per_second"} <= {p.stem for p in
                                                      (reference["root"] / "metrics/train_sft/plots/metrics/train").iterdir()}

    train_sft.main(tiny_params())  # same params, another folder
    assert plot_rows("train/loss") == reference["loss"]
    weights = adapter_weights(Path("models/sft"))
    assert weights.keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        assert (tensor == weights[name]).all(), name
    # the adapter really trained: lora_B starts at zero
    assert any(t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n)


def test_ctrl_c_saves_checkpoint_and_resume_matches_uninterrupted_run(workdir, monkeypatch, reference):
    params = tiny_params()
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(SystemExit) as exit_info:
            run_cli(params)
    assert exit_info.value.code == 130
    assert not Path("models/sft").exists()  # nothing for DVC to record
    # saved at the interrupt (step 1), not only at save_steps (2)
    assert (workdir / "models/checkpoints/sft/checkpoint-1/trainer_state.json").is_file()

    run_cli(params)  # resumes
    metrics = json.loads(Path("metrics/train_sft.json").read_text())
    assert metrics["resumed_from_step"] == 1 and metrics["steps"] == 4
    assert [r["step"] for r in plot_rows("train/loss")] == ["1", "2", "3", "4"]  # one continuous step axis
    assert metrics["train_loss"] == pytest.approx(reference["metrics"]["train_loss"], rel=1e-4, abs=1e-5)
    assert metrics["eval_loss"] == pytest.approx(reference["metrics"]["eval_loss"], rel=1e-4, abs=1e-5)
    resumed = adapter_weights(Path("models/sft"))
    for name, tensor in reference["weights"].items():
        assert (tensor - resumed[name]).abs().max() < 1e-5, name

    # a finished run leaves no checkpoint, so a forced rerun (`dvc repro -f`) trains again from step 0
    assert not (workdir / "models/checkpoints/sft").exists()
    run_cli(params)
    again = json.loads(Path("metrics/train_sft.json").read_text())
    assert again["resumed_from_step"] is None and again["steps"] == 4
    assert again["train_loss"] == reference["metrics"]["train_loss"]


def interrupted_run(monkeypatch, params, step: int) -> None:
    """Train until Ctrl-C at the end of ``step``: a checkpoint and no model."""
    with monkeypatch.context() as m:
        interrupt_at(m, step)
        with pytest.raises(SystemExit):
            run_cli(params)
    assert Path(f"models/checkpoints/sft/checkpoint-{step}").is_dir() and not Path("models/sft").exists()


def _other_code(m):
    from tunepipe import training

    m.setattr(training, "code_sha256", lambda: "0" * 64)  # as if tunepipe/ or stages/ had been edited


def _other_trl(m):
    from tunepipe import training

    real = training.library_versions
    m.setattr(training, "library_versions", lambda: {**real(), "trl": "99.0"})


@pytest.mark.parametrize("change", ["params", "code", "library"])
def test_checkpoints_of_other_params_code_or_libraries_are_not_resumed(workdir, monkeypatch, caplog, change):
    from stages import train_sft

    params = tiny_params()
    interrupted_run(monkeypatch, params, 2)
    with monkeypatch.context() as m:
        if change == "params":
            params = tiny_params(train_sft={"learning_rate": 1e-3})
        else:
            (_other_code if change == "code" else _other_trl)(m)
        with caplog.at_level(logging.WARNING, logger="tunepipe"):
            train_sft.main(params)
    assert "not resuming: checkpoints were written under different params/inputs" in caplog.text
    metrics = json.loads(Path("metrics/train_sft.json").read_text())
    assert metrics["resumed_from_step"] is None and metrics["steps"] == 4


def test_logging_and_saving_frequency_do_not_invalidate_checkpoints(workdir, monkeypatch):
    interrupted_run(monkeypatch, tiny_params(), 2)
    run_cli(tiny_params(train_sft={"logging_steps": 2, "save_steps": 3, "eval_steps": 4, "save_total_limit": 1}))
    metrics = json.loads(Path("metrics/train_sft.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
    assert metrics["logging_steps"] == 2  # recorded, though it retrains nothing


def test_resuming_from_the_last_checkpoint_runs_no_step_past_max_steps(workdir, monkeypatch):
    # 16 examples of batch 4 make 4 steps an epoch: max_steps 3 ends inside the epoch
    params = tiny_params(train_sft={"max_steps": 3})
    interrupted_run(monkeypatch, params, 3)
    run_cli(params)
    metrics = json.loads(Path("metrics/train_sft.json").read_text())
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 3
    assert [r["step"] for r in plot_rows("train/loss")] == ["1", "2", "3"]


def test_the_model_records_what_trained_it(workdir, reference):
    record = json.loads((reference["root"] / "models/sft/training.json").read_text())
    assert record["params"]["learning_rate"] == 5e-3 and "logging_steps" not in record["params"]
    assert record["versions"]["trl"] and record["versions"]["torch"] and len(record["code"]) == 64
    assert set(record["inputs"]) == {"data/tokenized", "models/base"}
    metrics = reference["metrics"]
    assert metrics["versions"] == record["versions"] and metrics["code_sha256"] == record["code"][:12]


def test_padding_free_keeps_packed_examples_apart(tiny_model_dir, smol_tokenizer, tmp_path):
    """An example's logits and loss are the same packed behind another as alone (sdpa on CPU)."""
    import torch
    from datasets import Dataset

    from stages.train_sft import build_trainer, padding_free_supported
    from tests.trainingdata import sft_rows
    from tunepipe.modeling import load_model, load_tokenizer
    from tunepipe.training import TrainingRun

    model = load_model(tiny_model_dir).eval()
    assert padding_free_supported(model) and model.config._attn_implementation == "sdpa"
    rows = sft_rows(smol_tokenizer, 3)
    first, second = rows[0], rows[2]
    cfg = tiny_params(train_sft={"lora_dropout": 0.0}).train_sft
    trainer = build_trainer(model, load_tokenizer(tiny_model_dir), {"train": Dataset.from_list(rows)}, cfg, seed=0,
                            precision="fp32", padding_free=True, peft_config=None,
                            run=TrainingRun(tmp_path / "live", None), output_dir=tmp_path / "ckpt")
    collate = trainer.data_collator.collator  # TRL's padding-free collator, under tunepipe.shared_prefix's
    packed, shared = collate([first, second]), trainer.data_collator([first, second])
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    sent_once = packed["input_ids"].shape[1] - shared["input_ids"].shape[1]
    assert sent_once > 10  # the system prompt

    def logits(batch, **kw):
        # compute_loss adds use_cache=False to the batch it is given
        return model(**{k: v for k, v in batch.items() if k not in ("labels", "use_cache")}, **kw).logits[0]

    assert model.config._attn_implementation == "sdpa_packed"  # build_trainer switched it
    with torch.no_grad():
        together, alone, together_shared = logits(packed), logits(collate([second])), logits(shared)
        losses = [trainer.compute_loss(model, collate([row])).item() for row in (first, second)]
        packed_loss, shared_loss = (trainer.compute_loss(model, b).item() for b in (packed, shared))
        # transformers' own sdpa path (a block-diagonal mask) gives the same numbers, but only
        # without a KV cache: with one it builds no block mask and the examples leak
        model.set_attn_implementation("sdpa")
        masked, leaky = logits(packed, use_cache=False), logits(packed, use_cache=True)
    n = len(first["input_ids"])
    assert torch.allclose(together[n:], alone, atol=1e-5)
    assert torch.allclose(together_shared[:n], together[:n], atol=1e-5)
    assert torch.allclose(together_shared[n:], alone[sent_once:], atol=1e-5)
    assert torch.allclose(together, masked, atol=1e-5)
    assert not torch.allclose(leaky[n:], alone, atol=1e-3)
    counts = [sum(label != -100 for label in row["labels"][1:]) for row in (first, second)]
    expected = (losses[0] * counts[0] + losses[1] * counts[1]) / sum(counts)  # token-weighted mean
    assert packed_loss == pytest.approx(expected, rel=1e-5) and shared_loss == pytest.approx(expected, rel=1e-5)


def test_qlora_trains_on_cpu(workdir, smol_tokenizer_dir):
    """bitsandbytes 0.50 has a CPU 4-bit backend: QLoRA runs here (slowly on a real model)."""
    import shutil

    from stages import train_sft
    from tests.conftest import build_tiny_llama

    # On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference (the final
    # evaluation) in blocks of 64 inputs: the default tiny model's 32 are too few.
    shutil.rmtree("models/base")
    build_tiny_llama(Path("models/base"), smol_tokenizer_dir, hidden_size=64)

    train_sft.main(tiny_params(train_sft={"method": "qlora", "max_steps": 2, "eval_steps": 2,
                                          "bnb_4bit_compute_dtype": "float32"}))
    config = json.loads(Path("models/sft/adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert json.loads(Path("metrics/train_sft.json").read_text())["steps"] == 2


def peft_lora_forward(monkeypatch):
    """PEFT's own LoRA forward, put back for this test (a stage's patch is process-wide)."""
    from peft.tuners.lora import layer

    plain = getattr(layer.Linear.forward, "plain", layer.Linear.forward)
    monkeypatch.setattr(layer.Linear, "forward", plain)
    return layer.Linear


def test_bf16_autocast_trains_on_cpu(workdir, monkeypatch):
    """transformers refuses bf16 without a GPU unless told the CPU is meant; the stage tells it.
    Under bf16 the LoRA deltas are summed in fp32 (test_train_dpo: else a young adapter's round away)."""
    from stages import train_sft

    lora_linear = peft_lora_forward(monkeypatch)
    train_sft.main(tiny_params(train_sft={"precision": "bf16", "max_steps": 2, "eval_steps": 2}))
    metrics = json.loads(Path("metrics/train_sft.json").read_text())
    assert metrics["precision"] == "bf16" and metrics["steps"] == 2
    assert metrics["train_loss"] > 0
    assert hasattr(lora_linear.forward, "plain")  # tunepipe.training.keep_lora_deltas_in_fp32's


def test_precision_auto_trains_in_what_the_probe_measured_faster(workdir, monkeypatch, tmp_path):
    """auto follows the (replaced) probe, not the CPU flags; the log and metrics carry the ratio."""
    from stages import train_sft
    from tunepipe import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "measure", lambda shapes, tokens: {"fp32_ms": 10.0, "bf16_ms": 17.0, "tokens": tokens})
    lora_linear = peft_lora_forward(monkeypatch)
    train_sft.main(tiny_params(train_sft={"precision": "auto", "max_steps": 2, "eval_steps": 2}))
    metrics = json.loads(Path("metrics/train_sft.json").read_text())
    assert metrics["precision"] == "fp32" and metrics["precision_source"] == "measured"
    assert not hasattr(lora_linear.forward, "plain")  # fp32: PEFT's own forward
    assert metrics["precision_bf16_speedup"] == pytest.approx(10 / 17, abs=1e-3)
    record = json.loads(Path("models/sft/training.json").read_text())
    assert "precision_bf16_speedup" not in record["results"] and record["results"]["precision"] == "fp32"


def test_metrics_logging_works_in_a_git_repo_without_commits(tmp_path, monkeypatch):
    """Plain DVCLive fails there ('Empty git repo'); the stages only need its tsv plots."""
    import subprocess

    from tunepipe.training import _plots_only_live, _truncate_plots

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    live = _plots_only_live(Path("metrics/run"), resume=False)
    for step, loss in [(1, 2.0), (2, 1.5), (3, 1.0)]:
        live.step = step
        live.log_metric("train/loss", loss)
    _truncate_plots(Path("metrics/run/plots"), 2)  # what a resume from checkpoint-2 does
    live = _plots_only_live(Path("metrics/run"), resume=True)
    live.step = 3
    live.log_metric("train/loss", 0.9)
    rows = (tmp_path / "metrics/run/plots/metrics/train/loss.tsv").read_text().split()
    assert rows == ["step", "loss", "1", "2.0", "2", "1.5", "3", "0.9"]
    assert not (tmp_path / "metrics/run/metrics.json").exists()


def test_fused_lm_head_scores_only_labelled_positions_with_the_same_numbers(tiny_model_dir, monkeypatch):
    import torch
    from trl.trainer import utils

    from tests.conftest import fused_head_step
    from tunepipe.training import score_only_labelled_positions

    monkeypatch.setattr(utils, "_use_triton", getattr(utils._use_triton, "plain", utils._use_triton))
    scored = []
    chunked = utils._ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, *args):
            scored.append(hidden.shape[0])
            return chunked.apply(hidden, *args)

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", Recording)
    labels, run = fused_head_step(tiny_model_dir, unlabelled=9)  # 3 answer tokens a row
    every, every_grad = run()
    score_only_labelled_positions()
    only, only_grad = run()
    assert scored == [2 * 11, int((labels[:, 1:] != -100).sum())]  # 22 positions, then 6
    assert torch.allclose(only.loss, every.loss, atol=1e-6)
    assert torch.allclose(only.log_probs, every.log_probs, atol=1e-6)
    assert torch.allclose(only_grad, every_grad, atol=1e-6)
