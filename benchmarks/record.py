"""Append benchmark tables from results.json to the History section of benchmarks/RESULTS.md.

    python -m benchmarks.record sft dpo generate      # names of entries in benchmarks/results.json

Appends (never rewrites): the date, the exact command, the load average and each
table, so earlier results stay next to new ones.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os

from benchmarks import harness

RESULTS_MD = harness.REPO / "benchmarks" / "RESULTS.md"


def entry(name: str, result: dict) -> str:
    module = importlib.import_module(f"benchmarks.{name}")
    date = datetime.date.today().isoformat()
    return (f"\n### {date}: {name}\n\n`{result.get('command', 'python -m benchmarks.' + name)}` "
            f"(load average when recorded: {os.getloadavg()[0]:.1f})\n\n```\n{module.report(result)}\n```\n")


def main(names: list[str]) -> None:
    results = json.loads(harness.RESULTS.read_text(encoding="utf-8"))
    text = RESULTS_MD.read_text(encoding="utf-8")
    added = "".join(entry(n, results[n]) for n in names if n in results)
    from tunepipe.artifacts import write_text

    write_text(RESULTS_MD, text.rstrip("\n") + "\n" + added)
    print(added)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+")
    main(p.parse_args().names)
