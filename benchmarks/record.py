"""Append benchmark tables from results.json to the History section of benchmarks/RESULTS.md.

    python -m benchmarks.record sft dpo generate      # names in this machine's entry of benchmarks/results.json
    python -m benchmarks.record --workload long-answers sft dpo

Appends (never rewrites): the date, the machine (CPU model, capability, bf16 flags), the
commit, the exact command, the load average and each table, so earlier results stay next
to new ones.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os

from benchmarks import harness

RESULTS_MD = harness.REPO / "benchmarks" / "RESULTS.md"


def entry(name: str, result: dict, workload: str = harness.DEFAULT_WORKLOAD) -> str:
    module = importlib.import_module(f"benchmarks.{name}")
    recorded = result.get("recorded", {})
    date = recorded.get("date") or datetime.date.today().isoformat()
    machine = harness.entry_key(workload, harness.machine())
    load = recorded.get("load_avg_1m", round(os.getloadavg()[0], 1))
    return (f"\n### {date}: {name} ({machine}, commit {recorded.get('commit') or harness.git_commit()})\n\n"
            f"`{result.get('command', 'python -m benchmarks.' + name)}` (load average: {load})\n\n"
            f"```\n{module.report(result)}\n```\n")


def main(names: list[str], workload: str = harness.DEFAULT_WORKLOAD) -> None:
    results = harness.load_results(workload)
    text = RESULTS_MD.read_text(encoding="utf-8")
    added = "".join(entry(n, results[n], workload) for n in names if n in results)
    from tunepipe.artifacts import write_text

    write_text(RESULTS_MD, text.rstrip("\n") + "\n" + added)
    print(added)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+")
    p.add_argument("--workload", default=harness.DEFAULT_WORKLOAD)
    a = p.parse_args()
    main(a.names, a.workload)
