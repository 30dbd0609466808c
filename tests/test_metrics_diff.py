"""scripts/metrics_diff.sh in a throwaway git + DVC repo: the markdown shows what changed, and
per-item results say which changes are significant and which items flipped."""

from __future__ import annotations

import json
import os
import re
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
      - metrics/eval_items.json:
          cache: false
"""
N_ITEMS = 40

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def sh(args, cwd, env, check=True):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
    return out


def eval_items(passes: dict[str, set]) -> dict:
    """metrics/eval_items.json as the compare stage writes it: per model, which of N_ITEMS pass."""
    def model(ok: set) -> dict:
        return {"generations": [{"id": f"t{i}", "task": "pass" if i in ok else "wrong_answer",
                                 "output": f"answer {i}" if i in ok else f"wrong {i}",
                                 "rougeL": 1.0 if i in ok else 0.2,
                                 "ref_nll": 0.5, "ref_tokens": 3} for i in range(N_ITEMS)],
                "preferences": [{"id": f"p{i}", "correct": True, "correct_norm": i % 2 == 0} for i in range(N_ITEMS)]}
    return {"prompts": [{"id": f"t{i}", "prompt": f"Question {i} | what is it?", "reference": f"answer {i}"}
                        for i in range(N_ITEMS)],
            "models": {name: model(ok) for name, ok in passes.items()}}


# final: 10 -> 30 of 40 pass (20 fixed, none broken: significant); base: item 9 broke, item 10 fixed (n.s.)
ITEMS_BEFORE = {"base": set(range(10)), "final": set(range(10))}
ITEMS_AFTER = {"base": set(range(9)) | {10}, "final": set(range(30))}


def commit(root, env, lr, acc, message, items=None):
    (root / "params.yaml").write_text(f"train:\n  lr: {lr}\n")
    (root / "metrics.json").write_text(json.dumps({"base": {"acc": acc}, "final": {"acc": acc + 0.1}}))
    if items is not None:
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics" / "eval_items.json").write_text(json.dumps(eval_items(items)))
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
    commit(root, env, 0.05, 0.4, "a run before per-item results existed")
    commit(root, env, 0.1, 0.5, "first run", ITEMS_BEFORE)
    commit(root, env, 0.2, 0.75, "second run", ITEMS_AFTER)
    return root, env


def diff(root, env, *args, check=True):
    return sh(["bash", str(SCRIPT), *args], root, env, check=check)


def table_row(markdown: str, needle: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if needle in line)
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # an escaped \| stays in its cell


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
    assert table_row(md, "| final | task accuracy")[2:7] == ["75.0%", "75.0%", "+0.0 pts", "p=1.00", "n.s."]
    assert md.count("_No task item changed its verdict._") == 2


def test_per_item_changes_are_tested_for_significance(repo):
    root, env = repo
    md = diff(root, env).stdout
    assert "### Per-item changes:" in md and md.index("### Per-item changes") < md.index("### Metrics")
    # final: 20 items fixed, none broken: exact McNemar p = 2 * 0.5**20
    assert table_row(md, "| final | task accuracy") == ["final", "task accuracy", "25.0%", "75.0%", "+50.0 pts",
                                                      "p<0.001", "**\\***", str(N_ITEMS)]
    # base: one fixed, one broken: no change, p = 1
    assert table_row(md, "| base | task accuracy")[2:7] == ["25.0%", "25.0%", "+0.0 pts", "p=1.00", "n.s."]
    rouge = table_row(md, "| final | ROUGE-L")
    assert rouge[2:5] == [f"{(10 + 30 * 0.2) / 40:.4f}", f"{(30 + 10 * 0.2) / 40:.4f}", "+0.4000"]
    assert rouge[6] == "**\\***"
    assert table_row(md, "| final | perplexity")[4:7] == ["+0.000", "p=1.00", "n.s."]


def test_flipped_items_are_listed_with_prompts_and_answers(repo):
    root, env = repo
    md = diff(root, env).stdout
    final = md.split("#### final:")[1].split("####")[0]
    assert final.startswith(" 20 fail → pass, 0 pass → fail")
    assert "**fail → pass** (20):" in final and "pass → fail**" not in final
    # n_flipped (5 by default) listed, the rest counted; "|" in a prompt stays inside its cell
    assert table_row(final, "| t10 |") == ["t10", "Question 10 \\| what is it?", "✗ wrong_answer: wrong 10",
                                           "✓: answer 10"]
    assert "| t14 |" in final and "| t15 |" not in final and "… and 15 more" in final
    base = md.split("#### base:")[1].split("###")[0]
    assert base.startswith(" 1 fail → pass, 1 pass → fail")
    assert table_row(base, "| t9 |")[2:] == ["✓: answer 9", "✗ wrong_answer: wrong 9"]


def test_n_flipped_comes_from_params(repo):
    root, env = repo
    params = root / "params.yaml"
    original = params.read_text()
    params.write_text(original + "compare:\n  n_flipped: 2\n")
    try:
        md = diff(root, env, "HEAD~1").stdout
    finally:
        params.write_text(original)
    final = md.split("#### final:")[1].split("####")[0]
    assert "| t11 |" in final and "| t12 |" not in final and "… and 18 more" in final


def test_base_without_per_item_results_says_so(repo):
    root, env = repo
    md = diff(root, env, "HEAD~2").stdout
    short = sh(["git", "rev-parse", "--short", "HEAD~2"], root, env).stdout.strip()
    assert f"_No per-item results at `{short}`; significance not computed._" in md
    assert table_row(md, "base.acc")[-3:] == ["0.4", "0.75", "0.35"]  # dvc metrics diff is still there


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
