"""DVC remote storage round trip: push outputs and the run cache, lose them, pull them back.

A tiny one-stage project in a temp dir stands in for the pipeline, and a local
folder for S3/GCS/SSH (the remote type changes the transport, not the logic).
The stage logs each real run to a file outside the repo, so "did nothing" is
checked directly rather than read from DVC's messages alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GEN = """\
import os, pathlib, yaml
n = yaml.safe_load(open("params.yaml"))["n"]
out = pathlib.Path("out")
out.mkdir(exist_ok=True)
(out / "result.txt").write_text("".join(f"line {i}\\n" for i in range(n * 1000)))
(out / "blob.bin").write_bytes(bytes(range(256)) * n)
with open(os.environ["RUN_LOG"], "a") as log:
    log.write(f"{n}\\n")
"""

DVC_YAML = """\
stages:
  make:
    cmd: python gen.py
    deps: [gen.py]
    params: [n]
    outs: [out]
"""


def sh(args: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def dvc(*args: str, cwd: Path, env: dict) -> str:
    return sh([sys.executable, "-m", "dvc", *args], cwd, env)


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def runs(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Project `a`, reproduced at n=1, committed, pushed with its run cache to `remote`."""
    tmp = tmp_path_factory.mktemp("dvc_remote")
    repo, remote, log = tmp / "a", tmp / "remote", tmp / "runs.log"
    repo.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RUN_LOG": str(log), "DVC_NO_ANALYTICS": "1",
           # a developer's global DVC config (default remote, cache dir) must not leak in
           **{name: str(tmp / "dvc_home" / name) for name in
              ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_SITE_CACHE_DIR")},
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    (repo / "gen.py").write_text(GEN)
    (repo / "params.yaml").write_text("n: 1\n")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    sh(["git", "init", "-q"], repo, env)
    dvc("init", "-q", cwd=repo, env=env)
    dvc("repro", "-q", cwd=repo, env=env)
    dvc("remote", "add", "-d", "store", str(remote), cwd=repo, env=env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "-c", "commit.gpgsign=false", "commit", "-qm", "pipeline at n=1"], repo, env)
    dvc("push", "--run-cache", cwd=repo, env=env)
    return repo, remote, log, env


def test_push_uploads_outputs_and_run_cache(pushed):
    repo, remote, log, _ = pushed
    assert runs(log) == ["1"]
    assert list((remote / "files" / "md5").rglob("*.dir")), "the out/ directory manifest was not pushed"
    assert [p for p in (remote / "runs").rglob("*") if p.is_file()], "--run-cache pushed no run entries"


def test_pull_restores_outputs_byte_identical_and_repro_is_a_no_op(pushed):
    repo, _, log, env = pushed
    before = digests(repo / "out")
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "out")

    dvc("pull", cwd=repo, env=env)

    assert digests(repo / "out") == before
    assert json.loads(dvc("status", "--json", cwd=repo, env=env) or "{}") == {}
    assert "didn't change" in dvc("repro", cwd=repo, env=env)
    assert runs(log) == ["1"], "repro ran the stage again after a pull"


def test_fresh_clone_reuses_a_teammates_run_from_the_run_cache(pushed, tmp_path):
    repo, _, log, env = pushed
    # A teammate runs n=2 and shares only the run cache (dvc.lock is not committed).
    (repo / "params.yaml").write_text("n: 2\n")
    dvc("repro", "-q", cwd=repo, env=env)
    dvc("push", "--run-cache", cwd=repo, env=env)
    assert runs(log) == ["1", "2"]

    clone = tmp_path / "b"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    (clone / "params.yaml").write_text("n: 2\n")
    out = dvc("repro", "--pull", cwd=clone, env=env)

    assert "is cached - skipping run" in out
    assert runs(log) == ["1", "2"], "the clone re-ran a stage whose result was in the run cache"
    assert digests(clone / "out") == digests(repo / "out")
