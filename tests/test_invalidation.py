"""A result is what its params, code and data say: the real `dvc repro` on the tiny pipeline.

A change reruns what it touches and nothing else; a forced rerun really reruns; going
back to a configuration already run restores it from DVC's run cache instead of
training again, in the same workspace and in a fresh clone that pulled the run cache
from a remote (a local folder stands in for S3/GCS/SSH).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.dvcproject import DVC, copy_project, dvc_log, dvc_status, run

pytestmark = pytest.mark.e2e

TRAINING = ("train-sft", "train-reward", "train-dpo")  # train-reward: a cached no-op unless grpo/rloo use a reward model


@pytest.fixture(scope="module")
def project(reproduced_project, tmp_path_factory):
    return copy_project(reproduced_project, tmp_path_factory.mktemp("invalidation") / "p")


def set_params(root: Path, **changes) -> str:
    """Set dotted keys (``train_sft__learning_rate=...``: `__` for `.`); return the old file text."""
    path = root / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = params
        for part in parents:
            node = node[part]
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return original


def stale(root: Path, env: dict) -> set[str]:
    """Stages `dvc status` lists, less the report: it shows the wall-clock figures of the training
    metrics, which differ between two runs of one configuration (the run cache restores the newest)."""
    return set(dvc_status(root, env)) - {"report"}


def ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


def test_logging_and_checkpoint_frequency_rerun_nothing_that_trains(project):
    root, env = project
    original = set_params(root, train_sft__logging_steps=3, train_sft__save_steps=1, train_dpo__eval_steps=1,
                          train_dpo__save_total_limit=5)
    try:
        assert set(dvc_status(root, env)) == {"report"}  # the report shows every param
    finally:
        (root / "params.yaml").write_text(original)


def test_forced_rerun_trains_again_from_step_zero(project):
    root, env = project
    log = dvc_log(root, env, "repro", "-f", "-s", "train-sft")
    assert ran(log) == {"train-sft"} and "resuming from" not in log
    metrics = json.loads((root / "metrics/train_sft.json").read_text())
    assert metrics["resumed_from_step"] is None and metrics["steps"] == 4
    assert not (root / "models/checkpoints/sft").exists()  # nothing left behind to resume from
    # the same adapter again; only wall-clock figures differ, so put the committed run back
    run(["git", "checkout", "dvc.lock"], root, env)
    dvc_log(root, env, "checkout")
    assert dvc_status(root, env) == {}


def test_a_code_change_retrains_and_reverting_it_restores_from_the_run_cache(project):
    root, env = project
    training_py = root / "tunepipe/training.py"
    original = training_py.read_text()
    training_py.write_text(original + "\n# a comment: still a code change\n")
    log = dvc_log(root, env, "repro", "train-dpo")
    assert ran(log) == set(TRAINING) and "resuming from" not in log

    training_py.write_text(original)
    log = dvc_log(root, env, "repro", "train-dpo")
    for stage in TRAINING:
        assert f"Stage '{stage}' is cached - skipping run" in log
    assert not ran(log) and stale(root, env) == set()


def test_changing_a_training_param_back_restores_from_the_run_cache(project):
    root, env = project
    original = set_params(root, train_sft__learning_rate=2e-3)
    assert ran(dvc_log(root, env, "repro", "train-sft")) == {"train-sft"}
    (root / "params.yaml").write_text(original)
    log = dvc_log(root, env, "repro", "train-sft")
    assert "Stage 'train-sft' is cached - skipping run" in log and not ran(log)
    assert stale(root, env) == set()


def test_switching_the_alignment_algorithm_reruns_only_alignment_and_what_follows(project):
    root, env = project
    reward_before = lock_out(root, "train-reward", "models/reward")
    original = set_params(root, train_dpo__algorithm="kto")
    try:
        assert {"train-reward", "train-dpo"} <= set(dvc_status(root, env))
        assert not {"fetch", "template", "tokenize", "train-sft"} & set(dvc_status(root, env))
        log = dvc_log(root, env, "repro", "train-dpo")
        assert ran(log) == {"train-reward", "train-dpo"}
        # the reward model is not needed by either algorithm: the very same skipped.json, so nothing after it reruns
        assert lock_out(root, "train-reward", "models/reward") == reward_before
        assert json.loads((root / "metrics/train_dpo.json").read_text())["algorithm"] == "kto"
    finally:
        (root / "params.yaml").write_text(original)
        run(["git", "checkout", "dvc.lock"], root, env)
        dvc_log(root, env, "checkout")


def lock_out(root: Path, stage: str, path: str) -> str:
    """The md5 dvc.lock records for one output of a stage."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)


def test_a_local_data_file_is_a_dependency_of_fetch(project):
    root, env = project
    rows = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i}"} for i in range(60)]
    data = root / "mydata.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    original = set_params(root, fetch__sft__source="local", fetch__sft__path="mydata.jsonl",
                          fetch__sft__format="alpaca", fetch__preference__source="none")
    try:
        dvc_log(root, env, "repro", "-s", "fetch")
        assert "fetch" not in dvc_status(root, env)
        with open(data, "a") as f:
            f.write(json.dumps({"instruction": "One more.", "input": "", "output": "ok"}) + "\n")
        status = dvc_status(root, env)
        assert "mydata.jsonl" in json.dumps(status["fetch"])
    finally:
        (root / "params.yaml").write_text(original)
        data.unlink()
    log = dvc_log(root, env, "repro", "-s", "fetch")  # back to the generated data
    assert "Stage 'fetch' is cached - skipping run" in log
    assert stale(root, env) == set()


def test_a_fresh_clone_pulls_the_run_cache_and_reruns_only_what_changed(project, tmp_path):
    """What a teammate's clone and the PR workflow do: `dvc pull --run-cache`, then `dvc repro --pull`
    (which fetches the outputs of a cached run from the remote when it restores it)."""
    root, env = project
    remote = tmp_path / "remote"
    run([*DVC, "remote", "add", "-d", "store", str(remote)], root, env)
    # a teammate shares a run as DVC shares one: push while it is the workspace's state
    # (`dvc push --run-cache` sends every run's record but only the current outputs)
    original = set_params(root, train_sft__learning_rate=2e-3)
    dvc_log(root, env, "repro", "train-sft")
    dvc_log(root, env, "push", "--run-cache")
    (root / "params.yaml").write_text(original)
    dvc_log(root, env, "repro", "train-sft")
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "remote", "--allow-empty"], root, env)
    dvc_log(root, env, "push", "--run-cache")

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    dvc_log(clone, env, "pull", "--run-cache")
    assert stale(clone, env) == set()

    # a configuration trained before, in another workspace: restored, not retrained
    original = set_params(clone, train_sft__learning_rate=2e-3)
    log = dvc_log(clone, env, "repro", "--pull", "train-sft")
    assert "Stage 'train-sft' is cached - skipping run" in log and not ran(log)

    # an evaluation setting: only the evaluations and what reads them
    (clone / "params.yaml").write_text(original)
    dvc_log(clone, env, "repro", "train-sft")
    set_params(clone, evaluate__max_new_tokens=6)
    log = dvc_log(clone, env, "repro", "--pull")
    # not export (it reads no evaluation); publish, whose model card shows compare's figures, takes a second
    assert ran(log) == {"evaluate@base", "evaluate@sft", "evaluate@final", "compare", "publish", "report"}
