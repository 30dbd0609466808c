"""Wall time of the whole pipeline: `dvc repro` from clean, a no-op `dvc repro`, and each stage's start-up.

    python -m benchmarks.pipeline              # the full run: many minutes on 2 cores (not in `make bench`)
    python -m benchmarks.pipeline --startup    # only the start-up of `python -m stages.X --help` (seconds)

The repository (tracked and untracked, not ignored files) is copied into a
scratch folder with an empty DVC cache, so nothing in the working tree or its
cache is touched and "clean" really is clean. Targets: <= 10 min from clean,
<= 3 s no-op.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

STAGES = ["fetch", "template", "tokenize", "train_sft", "train_dpo", "merge", "evaluate", "report"]


def scratch_copy(dest: Path) -> Path:
    """A fresh git repo holding the working tree's files, its DVC config and no DVC cache or outputs."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=harness.REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = harness.REPO / rel
        if src.is_file() and not rel.startswith(("benchmarks/results", "dvc.lock")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".dvc").mkdir(exist_ok=True)
    for name in (".dvc/config", ".dvcignore"):
        if (harness.REPO / name).is_file():
            shutil.copy2(harness.REPO / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def timed(cmd: list[str], cwd: Path, timeout: float = 3600, cpu: list | None = None) -> float:
    """Wall seconds of ``cmd``; its CPU seconds (user + sys, children included) are appended to ``cpu``."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = harness.offline_env()
    env["PATH"] = str(Path(sys.executable).parent) + ":" + env.get("PATH", "")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds


def startup(cwd: Path, repeats: int = 5) -> list[dict]:
    """Median seconds of `python -m stages.X --help`: what a typo in params costs before the error shows.
    CPU seconds are reported too: on a loaded machine they, not the wall time, say what the code costs."""
    rows = []
    for stage in STAGES:
        cpu: list[float] = []
        times = [timed([sys.executable, "-m", f"stages.{stage}", "--help"], cwd, cpu=cpu) for _ in range(repeats)]
        rows.append({"stage": stage, "help_seconds": round(statistics.median(times), 2),
                     "min_seconds": round(min(times), 2), "cpu_seconds": round(statistics.median(cpu), 2)})
    return rows


def main(full: bool = True, noop_repeats: int = 3) -> dict:
    dest = harness.SCRATCH / "pipeline"
    result = {"command": "python -m benchmarks.pipeline" + ("" if full else " --startup"),
              "startup": startup(harness.REPO)}
    if full:
        scratch_copy(dest)
        result["repro_clean_seconds"] = round(timed([sys.executable, "-m", "dvc", "repro"], dest), 1)
        noop = [timed([sys.executable, "-m", "dvc", "repro"], dest) for _ in range(noop_repeats)]
        result["repro_noop_seconds"] = round(statistics.median(noop), 2)
        result["targets_met"] = {"repro_clean_le_600s": result["repro_clean_seconds"] <= 600,
                                 "repro_noop_le_3s": result["repro_noop_seconds"] <= 3}
        dvc_version = subprocess.run([sys.executable, "-m", "dvc", "--version"], capture_output=True, text=True)
        result["dvc"] = dvc_version.stdout.strip()
    return result


def report(result: dict) -> str:
    out = "stage start-up, `python -m stages.X --help` (median of 5)\n"
    out += harness.table(result["startup"], ["stage", "help_seconds", "min_seconds", "cpu_seconds"])
    if "repro_clean_seconds" in result:
        out += (f"\n\ndvc repro from clean: {result['repro_clean_seconds']} s; "
                f"no-op dvc repro: {result['repro_noop_seconds']} s (median of 3); targets: {result['targets_met']}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--startup", action="store_true", help="only measure stage start-up")
    a = p.parse_args()
    res = main(full=not a.startup)
    harness.save_results("pipeline", res)
    print(report(res))
