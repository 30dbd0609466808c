"""The real `dvc repro` on a tiny configuration: every stage, then no-op, then only what a change touches."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.dvcproject import dvc_status

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(reproduced_project):
    return reproduced_project  # only read here: params are restored after each change


def test_repro_produces_every_output(project):
    root, _ = project
    final = root / "models/final"
    assert (final / "model.safetensors").exists() and (final / "README.md").exists()
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] is not None
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert metrics["models"] == ["base", "sft", "final"]
    for model in ("base", "sft", "final", "baseline_constant"):
        assert metrics[model]["task_accuracy_ci_low"] <= metrics[model]["task_accuracy"] \
            <= metrics[model]["task_accuracy_ci_high"]
    assert "task_accuracy_p_value" in metrics["comparisons"]["final_vs_base"]
    html = (root / "reports/report.html").read_text()
    for model in ("base", "sft", "final"):
        assert model in html
    assert (root / "reports/report.md").exists()


def test_second_repro_does_nothing(project):
    root, env = project
    assert dvc_status(root, env) == {}


def changed_stages_after(root, env, section: str, key: str, value) -> set:
    """Stages `dvc status` reports after setting one param (the file is restored after)."""
    params_file = root / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        return set(dvc_status(root, env))
    finally:
        params_file.write_text(original)


def test_eval_setting_reruns_only_the_evaluations_and_report(project):
    root, env = project
    # compare follows once they write new results; the report also shows every param
    assert changed_stages_after(root, env, "evaluate", "max_new_tokens", 9) == {
        "evaluate@base", "evaluate@sft", "evaluate@final", "report"}


def test_dpo_beta_reruns_dpo_and_after_never_before(project):
    root, env = project
    changed = changed_stages_after(root, env, "train_dpo", "beta", 0.5)
    # dvc status names stages whose own deps changed: merge, evaluate@final and compare follow once
    # train-dpo writes a new model; evaluate@base and evaluate@sft never do (their models stay).
    assert changed == {"train-dpo", "report"}
