"""Two training processes on CPU (DDP over gloo), launched by the stages themselves through
`accelerate launch`: the path a multi-GPU run takes, with the same outputs as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_train_sft import adapter_weights, workdir  # noqa: F401  (workdir: the fixture)
from tests.trainingdata import tiny_params


def test_two_processes_train_sft_and_dpo_like_one(workdir):
    from stages import train_dpo, train_sft

    # one process, batch 4
    one = tiny_params(train_dpo={"precompute_ref_log_probs": False})
    train_sft.main(one)
    train_dpo.main(one)
    single = {s: json.loads(Path(f"metrics/{s}.json").read_text()) for s in ("train_sft", "train_dpo")}
    single_sft = adapter_weights(Path("models/sft"))

    # two processes, batch 2 each: the same global batch of 4
    two = tiny_params(train_sft={"num_processes": 2, "batch_size": 2},
                      train_dpo={"num_processes": 2, "batch_size": 2, "precompute_ref_log_probs": False})
    train_sft.main(two)
    sft = json.loads(Path("metrics/train_sft.json").read_text())
    assert sft["processes"] == 2 and sft["steps"] == 4
    # each step's global batch is split between the processes, so together they see the same tokens
    assert sft["trained_tokens"] == single["train_sft"]["trained_tokens"]
    # gradients are averaged over the two halves: close to, not bit-equal with, the one-process run
    assert sft["train_loss"] == pytest.approx(single["train_sft"]["train_loss"], rel=0.05)
    weights = adapter_weights(Path("models/sft"))
    assert weights.keys() == single_sft.keys()
    assert any(t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n)

    train_dpo.main(two)
    dpo = json.loads(Path("metrics/train_dpo.json").read_text())
    assert dpo["processes"] == 2 and dpo["steps"] == 4
    assert dpo["train_loss"] == pytest.approx(single["train_dpo"]["train_loss"], rel=0.05)
    # one writer: a single, continuous step axis in the plots
    with open("metrics/train_sft/plots/metrics/train/loss.tsv", encoding="utf-8") as f:
        assert [line.split("\t")[0] for line in f.read().splitlines()[1:]] == ["1", "2", "3", "4"]


def test_failing_processes_stop_the_stage_with_a_clear_error(workdir):
    from stages import train_sft
    from tunepipe.cli import StageError

    Path("data/tokenized/sft/train/dataset_info.json").write_text("not json")  # the workers cannot load the data
    with pytest.raises(StageError, match="2 training processes failed"):
        train_sft.main(tiny_params(train_sft={"num_processes": 2, "batch_size": 2}))
    assert not Path("models/sft").exists()
