"""What every benchmark shares: the workload folder, one subprocess per measured run, medians, tables, results.json.

    ws = workspace()                                  # models/base + data/tokenized (+ data/templated)
    row = run_worker("benchmarks.sft", {"variant": "ours", ...})   # fresh process: its own ru_maxrss
    print(table(rows, ["variant", "tokens_per_s"]))
    save_results("sft", {...})                        # into this workload's + machine's entry of results.json

Every figure is a ratio against a baseline measured in the same run, with the
runs interleaved (baseline, ours, baseline, ours) and the median taken, because
the machine is shared and absolute numbers drift.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results.json"
SCRATCH = Path(os.environ.get("TUNEPIPE_BENCH_DIR", Path(tempfile.gettempdir()) / "tunepipe-bench"))
WORKLOAD_STAGES = ("fetch", "template", "tokenize")


def offline_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("DVCLIVE_OPEN", "false")
    return env


# --------------------------------------------------------------------------- workload


def workspace(path: Optional[Path] = None) -> Path:
    """A folder with models/base and data/tokenized: the repo's own after a `dvc repro`,
    else a scratch copy built once by the real fetch, template and tokenize stages."""
    if path is not None:
        return Path(path)
    if (REPO / "models/base/config.json").is_file() and (REPO / "data/tokenized/info.json").is_file():
        return REPO
    ws = SCRATCH / "workspace"
    if not (ws / "data/tokenized/info.json").is_file():
        ws.mkdir(parents=True, exist_ok=True)
        (ws / "params.yaml").write_text((REPO / "params.yaml").read_text())
        for stage in WORKLOAD_STAGES:
            print(f"[bench] building the workload: python -m stages.{stage} (in {ws})", file=sys.stderr)
            subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=ws, env=offline_env(), check=True)
    return ws


# --------------------------------------------------------------------------- one measured run per process


def run_worker(module: str, spec: dict, timeout: float = 4 * 3600) -> dict:
    """Run ``python -m <module> --worker '<spec json>'`` and return the dict it wrote (plus its peak RSS)."""
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-") as tmp:
        out = Path(tmp) / "result.json"
        spec = dict(spec, result_file=str(out), scratch=tmp)
        proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)], cwd=REPO,
                              env=offline_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{module} worker {spec.get('variant')} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def switch_off(module: str, name: str) -> None:
    """Make a lever that is code, not a param (``module.name``), a no-op in this worker process."""
    import importlib

    setattr(importlib.import_module(module), name, lambda *args: False)


def worker_main(argv: list[str], work: Callable[[dict], dict]) -> bool:
    """If started as a worker, run ``work(spec)``, write its result with the process's peak RSS, return True."""
    if len(argv) < 3 or argv[1] != "--worker":
        return False
    import resource

    spec = json.loads(argv[2])
    result = work(spec)
    # Linux reports ru_maxrss in KiB
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(spec["result_file"]).write_text(json.dumps(result))
    return True


def interleaved(variants: list[str], repeats: int, run: Callable[[str], dict]) -> dict[str, list[dict]]:
    """Run every variant ``repeats`` times, alternating (a, b, a, b), so drift in load hits all of them alike."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    SCRATCH.mkdir(parents=True, exist_ok=True)
    for r in range(repeats):
        for v in variants:
            print(f"[bench] {v} (repeat {r + 1}/{repeats})", file=sys.stderr, flush=True)
            runs[v].append(run(v))
            with open(SCRATCH / "runs.jsonl", "a", encoding="utf-8") as log:  # partial results survive a kill
                log.write(json.dumps({"variant": v, "repeat": r, **runs[v][-1]}) + "\n")
    return runs


def concurrent(variants: list[str], repeats: int, run: Callable[[str], dict]) -> dict[str, list[dict]]:
    """Run all variants at the same time (each still its own process), ``repeats`` rounds.

    On a machine shared with other jobs this makes every side see the same load at the
    same moment, and it takes a third of the wall time of ``interleaved``; on an idle
    machine prefer ``interleaved`` (simultaneous runs split the cores between them)."""
    from concurrent.futures import ThreadPoolExecutor

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    SCRATCH.mkdir(parents=True, exist_ok=True)
    for r in range(repeats):
        print(f"[bench] {', '.join(variants)} at once (repeat {r + 1}/{repeats})", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(len(variants)) as pool:
            done = dict(zip(variants, pool.map(run, variants)))
        for v in variants:
            runs[v].append(done[v])
            with open(SCRATCH / "runs.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps({"variant": v, "repeat": r, "concurrent": True, **done[v]}) + "\n")
    return runs


def median(rows: list[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: Optional[float], b: Optional[float], digits: int = 2) -> Optional[float]:
    return round(a / b, digits) if a is not None and b else None


# --------------------------------------------------------------------------- output


def table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


DEFAULT_WORKLOAD = "default"


def save_results(name: str, result: dict, path: Optional[Path] = None, workload: str = DEFAULT_WORKLOAD) -> None:
    """Merge one benchmark's result into results.json (atomically), in the entry of this workload on this
    machine: a run on another CPU (or another workload) adds an entry instead of replacing one.

    results.json: {"entries": {"<workload> @ <machine>": {"workload", "machine", "date", "commit",
    "<name>": result, ...}}}; each result also records when, at which commit and under what load."""
    from tunepipe.artifacts import write_json

    path = path or RESULTS
    history = load_history(path)
    here = machine()
    entry = history["entries"].setdefault(entry_key(workload, here), {"workload": workload})
    recorded = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "load_avg_1m": here["load_avg_1m"]}
    entry.update(machine={k: v for k, v in here.items() if k != "load_avg_1m"}, **recorded)
    entry[name] = dict(result, recorded=recorded)
    write_json(path, history)


def load_history(path: Optional[Path] = None) -> dict:
    """results.json as {"entries": {...}}; a file in the old one-machine layout becomes that machine's entry."""
    path = path or RESULTS
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = {}
    if "entries" in current:
        return current
    if not current:
        return {"entries": {}}
    old = current.get("machine", {})
    entry = {"workload": DEFAULT_WORKLOAD, "machine": {k: v for k, v in old.items() if k not in ("date", "load_avg_1m")},
             "date": old.get("date"), "commit": None, **{k: v for k, v in current.items() if k != "machine"}}
    return {"entries": {entry_key(DEFAULT_WORKLOAD, entry["machine"]): entry}}


def load_results(workload: str = DEFAULT_WORKLOAD, path: Optional[Path] = None) -> dict:
    """This machine's entry for ``workload`` (empty if it never ran here)."""
    return load_history(path)["entries"].get(entry_key(workload, machine()), {})


def entry_key(workload: str, m: dict) -> str:
    """"<workload> @ <CPU model> | <torch's CPU capability> | <bf16 flags> | <cores> cores": two machines sold
    as "AMD EPYC" differed only in capability and flags (AVX2 vs AVX512-BF16)."""
    return (f"{workload} @ {m.get('cpu')} | {m.get('cpu_capability')} | bf16 flags: {m.get('bf16_flags', '?')} | "
            f"{m.get('cores')} cores")


def git_commit() -> Optional[str]:
    """The commit measured, "-dirty" when the working tree had changes (the figures are then of those)."""
    proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO, capture_output=True,
                          text=True)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def machine() -> dict:
    import platform

    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    bf16 = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "none"
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1), "bf16_flags": bf16,
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}
