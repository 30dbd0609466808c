"""The real `dvc repro` on a tiny configuration: every stage, then no-op, then only what a change touches."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.dvcproject import DVC, make_project, run, tiny_params

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("project")
    env = make_project(root, tiny_model_dir, tiny_params("tiny_base"))
    run([*DVC, "repro"], root, env)
    return root, env


def dvc_status(root, env) -> dict:
    return json.loads(run([*DVC, "status", "--json"], root, env) or "{}")


def test_repro_produces_every_output(project):
    root, _ = project
    final = root / "models/final"
    assert (final / "model.safetensors").exists() and (final / "README.md").exists()
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] is not None
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert set(metrics) == {"base", "sft", "final"}
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


def test_eval_setting_reruns_only_evaluate_and_report(project):
    root, env = project
    assert changed_stages_after(root, env, "evaluate", "max_new_tokens", 9) == {"evaluate", "report"}


def test_dpo_beta_reruns_dpo_and_after_never_before(project):
    root, env = project
    changed = changed_stages_after(root, env, "train_dpo", "beta", 0.5)
    # dvc status names stages whose own deps changed; evaluate follows once merge writes a new model.
    assert "train-dpo" in changed
    assert changed <= {"train-dpo", "merge", "evaluate", "report"}
