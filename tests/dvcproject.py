"""A throwaway git + DVC copy of this repository on the tiny configuration, for the tests
that run the real `dvc repro` (tests/test_pipeline_e2e.py, tests/faults/).

    params = tiny_params("tiny_base")        # params.yaml shrunk to seconds per stage
    env = make_project(root, tiny_model_dir, params)
    run([*DVC, "repro"], root, env)
    root, env = copy_project(reproduced_project, tmp_path / "copy")   # of the session's reproduced one
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


def tiny_params(base_dir: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["shared"]["base_model"].update(source="local", path=base_dir, name="tiny-llama-test")
    params["fetch"]["generated"].update(n_train=24, n_val=8, n_test=8, n_pref_train=16, n_pref_val=8, n_pref_test=8)
    for stage in ("train_sft", "train_dpo", "train_reward"):
        params[stage].update(max_steps=4, batch_size=4, logging_steps=1, eval_steps=2, save_steps=2)
    params["train_dpo"].update(heldout_prompts=4, max_completion_length=8)
    params["evaluate"].update(max_new_tokens="auto", max_new_tokens_cap=8, batch_size=4)  # the default auto path
    params["report"]["n_samples"] = 2
    return params


def run(args, cwd, env) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def dvc_log(root: Path, env: dict, *args: str) -> str:
    """stdout and stderr of a dvc command that must succeed (the stages log to stderr)."""
    out = subprocess.run([*DVC, *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def make_project(root: Path, tiny_model_dir: Path, params: dict) -> dict:
    """The pipeline's code, dvc.yaml, ``params`` and the tiny base model (as tiny_base/) in a
    committed git + DVC repository at ``root``; returns the environment to run it with."""
    for name in ("stages", "tunepipe", "inputs", "configs"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "requirements.lock"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(tiny_model_dir, root / "tiny_base")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test",
           "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "test@example.com"}
    run(["git", "init", "-q"], root, env)
    run([*DVC, "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny project"], root, env)  # DVCLive reads the git HEAD: it needs a commit
    return env


def copy_project(source: tuple[Path, dict], dest: Path) -> tuple[Path, dict]:
    """A copy of a project (work tree, git, DVC cache and run cache) that a test may change."""
    root, env = source
    shutil.copytree(root, dest, symlinks=True)
    return dest, env


def dvc_status(root: Path, env: dict) -> dict:
    import json

    return json.loads(run([*DVC, "status", "--json"], root, env) or "{}")
