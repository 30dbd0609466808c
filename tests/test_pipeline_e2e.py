"""The real `dvc repro` on a tiny configuration: every stage, then no-op, then only what a change touches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def tiny_params(base_dir: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["shared"]["base_model"].update(source="local", path=base_dir, name="tiny-llama-test")
    params["fetch"]["generated"].update(n_train=24, n_val=8, n_test=8, n_pref_train=16, n_pref_val=8, n_pref_test=8)
    for stage in ("train_sft", "train_dpo"):
        params[stage].update(max_steps=4, batch_size=4, logging_steps=1, eval_steps=2, save_steps=2)
    params["evaluate"].update(max_new_tokens=8, batch_size=4)
    params["report"]["n_samples"] = 2
    return params


def run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("project")
    for name in ("stages", "tunepipe"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(tiny_model_dir, root / "tiny_base")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params("tiny_base"), sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    run(["git", "init", "-q"], root, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    # DVCLive reads the git HEAD: a repo without commits makes it fail.
    run(["git", "add", "-A"], root, env)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "init"], root, env)
    run([sys.executable, "-m", "dvc", "repro"], root, env)
    return root, env


def dvc_status(root, env) -> dict:
    return json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], root, env) or "{}")


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
