"""Killed runs, Ctrl-C and typos against the real `dvc repro` on the tiny configuration.

A SIGKILL (a preempted GPU machine) or a Ctrl-C must cost minutes, not the run:
the rerun finishes cleanly, resumes training from the last checkpoint when params
and inputs are unchanged (and says why when they are not), reaches the same
result as an uninterrupted run, and nothing half-written reaches the DVC cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.dvcproject import DVC, dvc_log, make_project, run, tiny_params
from tunepipe.artifacts import sha256_tree

pytestmark = pytest.mark.e2e

FIRST_CHECKPOINT = Path("models/checkpoints/sft/checkpoint-2/trainer_state.json")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """A git + DVC project on the tiny config, reproduced up to tokenize."""
    root = tmp_path_factory.mktemp("fault_project")
    params = tiny_params("tiny_base")
    params["train_sft"].update(lora_dropout=0.0, warmup_ratio=0.0)
    env = make_project(root, tiny_model_dir, params)
    run([*DVC, "repro", "tokenize"], root, env)
    return root, env


def start(args, root, env) -> subprocess.Popen:
    # its own process group: killing it takes the stage DVC started with it, as a preemption would
    return subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(proc: subprocess.Popen, found, what: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = found()
        if hit:
            return hit
        if proc.poll() is not None:
            pytest.fail(f"finished before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {what} within {timeout}s")


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def assert_no_tmp_in_cache_or_outputs(root: Path) -> None:
    """No `.tmp-` file is part of any output folder or any folder listing in the DVC cache."""
    for out in ("models/base", "data/raw", "data/templated", "data/tokenized", "models/sft"):
        if (root / out).exists():
            assert not list((root / out).rglob(".tmp-*")), out
    for listing in (root / ".dvc/cache").rglob("*.dir"):
        assert ".tmp-" not in listing.read_text(), listing


def status(root: Path, env: dict, stage: str) -> dict:
    """`dvc status` of ``stage`` and everything upstream of it."""
    return json.loads(run([*DVC, "status", "--json", "--with-deps", stage], root, env) or "{}")


def committed(root: Path, stage: str):
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    return lock.get("stages", {}).get(stage)


def test_a_typo_in_params_stops_dvc_repro_within_seconds_naming_the_key(project):
    root, env = project
    params_file = root / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["train_sft"]["lora_rr"] = 8
    params["train_dpo"]["beta"] = 0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        started = time.monotonic()
        out = subprocess.run([*DVC, "repro"], cwd=root, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
    finally:
        params_file.write_text(original)
    assert out.returncode != 0
    log = out.stdout + out.stderr
    assert "train_sft.lora_rr: unknown key; did you mean lora_r?" in log
    # beta 0 is refused for DPO (it means "no KL term" only for grpo/rloo): the line names the key and the bound
    assert any("train_dpo.beta" in line and "greater than 0" in line for line in log.splitlines())
    assert "Traceback" not in log
    assert elapsed < 60, f"took {elapsed:.0f}s: params must be checked before any heavy import"
    assert status(root, env, "tokenize") == {}  # what was committed before is untouched


def test_sigkill_during_tokenize_then_repro_is_clean(project):
    root, env = project
    before = sha256_tree(root / "data/tokenized")
    proc = start([*DVC, "repro", "-s", "-f", "tokenize"], root, env)
    # kill while the output is being written beside its target
    partial = wait_for(proc, lambda: list((root / "data").glob(".tmp-tokenized-*/*")), "a half-written output")
    kill_group(proc)
    assert partial and not (root / "data/tokenized").exists()  # DVC removed the old output; nothing renamed in

    log = dvc_log(root, env, "repro", "tokenize")
    assert sha256_tree(root / "data/tokenized") == before
    if "Running stage 'tokenize'" in log:  # rerun: its first write clears the stray temp folder
        assert not list((root / "data").glob(".tmp-*"))
    # else DVC restored the output from its run cache; the stray folder is beside it, never part of it
    assert_no_tmp_in_cache_or_outputs(root)
    assert status(root, env, "tokenize") == {}


def adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory):
    """train-sft run once without interruption, in a copy of the project."""
    root, env = project
    ref = tmp_path_factory.mktemp("reference") / "p"
    shutil.copytree(root, ref, ignore=shutil.ignore_patterns(".dvc", ".git"))
    run([sys.executable, "-m", "stages.train_sft"], ref, env)
    return json.loads((ref / "metrics/train_sft.json").read_text()), adapter(ref / "models/sft")


def test_sigkill_during_train_sft_resumes_to_the_same_result(project, reference):
    root, env = project
    expected_metrics, expected_weights = reference
    proc = start([*DVC, "repro", "train-sft"], root, env)
    wait_for(proc, lambda: (root / FIRST_CHECKPOINT).is_file(), "first checkpoint")
    kill_group(proc)
    assert not (root / "models/sft").exists() and committed(root, "train-sft") is None

    log = dvc_log(root, env, "repro", "train-sft")
    assert "resuming from models/checkpoints/sft/checkpoint-" in log
    metrics = json.loads((root / "metrics/train_sft.json").read_text())
    assert metrics["resumed_from_step"] >= 2 and metrics["steps"] == expected_metrics["steps"]
    assert metrics["train_loss"] == pytest.approx(expected_metrics["train_loss"], rel=1e-4, abs=1e-5)
    assert metrics["eval_loss"] == pytest.approx(expected_metrics["eval_loss"], rel=1e-4, abs=1e-5)
    weights = adapter(root / "models/sft")
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert (tensor - weights[name]).abs().max() < 1e-5, name
    assert_no_tmp_in_cache_or_outputs(root)
    assert status(root, env, "train-sft") == {}


def test_ctrl_c_saves_a_checkpoint_and_changed_data_is_not_resumed(project):
    root, env = project
    long_run = yaml.safe_load((root / "params.yaml").read_text())
    long_run["train_sft"]["max_steps"] = 200  # so Ctrl-C surely lands mid-training
    (root / "long.yaml").write_text(yaml.safe_dump(long_run))
    shutil.rmtree(root / "models/checkpoints/sft", ignore_errors=True)
    proc = start([sys.executable, "-m", "stages.train_sft", "--params", "long.yaml"], root, env)
    wait_for(proc, lambda: (root / FIRST_CHECKPOINT).is_file(), "first checkpoint")
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "checkpoint saved at step" in out and "Traceback" not in out
    steps = [int(p.name.split("-")[1]) for p in (root / "models/checkpoints/sft").glob("checkpoint-*")
             if (p / "trainer_state.json").is_file()]
    assert steps and max(steps) > 2 and max(steps) < 200  # saved at the interrupt, not only at save_steps

    # the data changes (a tokenize setting) before the rerun, nothing else does: the checkpoint no longer fits
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenize"]["max_length"] -= 8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_log(root, env, "repro", "tokenize")
    rerun = subprocess.run([sys.executable, "-m", "stages.train_sft", "--params", "long.yaml"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "not resuming: checkpoints were written under different params/inputs" in rerun.stderr
    assert json.loads((root / "metrics/train_sft.json").read_text())["resumed_from_step"] is None
