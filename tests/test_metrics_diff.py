"""scripts/metrics_diff.sh in a throwaway git + DVC repo: the markdown shows what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "metrics_diff.sh"
DVC_YAML = """stages:
  train:
    cmd: python -c "print('trained')"
    params:
      - train.lr
    metrics:
      - metrics.json:
          cache: false
"""

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def sh(args, cwd, env, check=True):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
    return out


def commit(root, env, lr, acc, message):
    (root / "params.yaml").write_text(f"train:\n  lr: {lr}\n")
    (root / "metrics.json").write_text(json.dumps({"base": {"acc": acc}, "final": {"acc": acc + 0.1}}))
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-q", "-m", message], root, env)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffrepo")
    env = {**os.environ, "DVC": str(Path(sys.executable).parent / "dvc"), "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    env.pop("GITHUB_RUN_ID", None)
    sh(["git", "init", "-q", "-b", "main"], root, env)
    sh([env["DVC"], "init", "-q"], root, env)
    (root / "dvc.yaml").write_text(DVC_YAML)
    commit(root, env, 0.1, 0.5, "first run")
    commit(root, env, 0.2, 0.75, "second run")
    return root, env


def diff(root, env, *args, check=True):
    return sh(["bash", str(SCRIPT), *args], root, env, check=check)


def table_row(markdown: str, needle: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if needle in line)
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_default_base_on_main_is_the_previous_commit(repo):
    root, env = repo
    md = diff(root, env).stdout
    assert "## Metrics and params" in md and "(HEAD~1)" in md
    assert table_row(md, "base.acc")[-3:] == ["0.5", "0.75", "0.25"]
    assert table_row(md, "final.acc")[-3:] == ["0.6", "0.85", "0.25"]
    assert table_row(md, "train.lr")[-2:] == ["0.1", "0.2"]


def test_explicit_base_and_no_changes(repo):
    root, env = repo
    md = diff(root, env, "HEAD").stdout
    assert md.count("_No changes._") == 2


def test_uncommitted_workspace_is_compared_with_head(repo):
    root, env = repo
    original = (root / "metrics.json").read_text()
    (root / "metrics.json").write_text(json.dumps({"base": {"acc": 0.9}, "final": {"acc": 0.85}}))
    try:
        md = diff(root, env).stdout
    finally:
        (root / "metrics.json").write_text(original)
    assert "(HEAD)" in md
    assert table_row(md, "base.acc")[-3:] == ["0.75", "0.9", "0.15"]
    assert not any("final.acc" in line for line in md.splitlines())  # unchanged rows are left out


def test_branch_is_compared_with_its_merge_base(repo):
    root, env = repo
    sh(["git", "checkout", "-q", "-b", "feature"], root, env)
    try:
        commit(root, env, 0.3, 0.8, "feature run 1")
        commit(root, env, 0.4, 0.85, "feature run 2")
        md = diff(root, env).stdout
        assert table_row(md, "base.acc")[-3:] == ["0.75", "0.85", "0.1"]
        assert table_row(md, "train.lr")[-2:] == ["0.2", "0.4"]
    finally:
        sh(["git", "checkout", "-q", "main"], root, env)


def test_figures_are_embedded_locally_and_linked_in_ci(repo):
    root, env = repo
    figures = root / "reports" / "figures"
    figures.mkdir(parents=True)
    (figures / "sft_loss.png").write_bytes(b"\x89PNG")
    try:
        local = diff(root, env).stdout
        assert "![sft loss](reports/figures/sft_loss.png)" in local
        ci_env = {**env, "GITHUB_RUN_ID": "123", "GITHUB_REPOSITORY": "acme/tunepipe",
                  "GITHUB_SERVER_URL": "https://github.com"}
        ci = diff(root, ci_env).stdout
        assert "https://github.com/acme/tunepipe/actions/runs/123" in ci and "`figures/sft_loss.png`" in ci
    finally:
        shutil.rmtree(root / "reports")


def test_unknown_base_is_a_clear_error(repo):
    root, env = repo
    out = diff(root, env, "no-such-branch", check=False)
    assert out.returncode == 2 and "unknown base revision 'no-such-branch'" in out.stderr
