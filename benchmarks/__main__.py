"""The default benchmark suite (`make bench`): matmul peak, levers, train-sft, train-dpo, generation, then
train-sft and train-dpo again on the long-answer workload (benchmarks/long_answers.py).

    python -m benchmarks [--quick]        # --quick: 1 repeat each (a smoke run, noisy ratios)

Each figure is a ratio against a baseline measured in the same run, interleaved;
results go to this machine's entry of benchmarks/results.json (atomically; other machines'
entries stay), tables to stdout. The full
pipeline timing is opt-in (python -m benchmarks.pipeline): it takes many minutes.
"""

from __future__ import annotations

import argparse

from benchmarks import dpo, generate, harness, levers, long_answers, peak, sft


def main(quick: bool = False) -> None:
    repeats = 1 if quick else 2
    ws = harness.workspace()
    machine = harness.machine()  # results.json keeps it in this machine's entry
    print("machine:", machine)

    peaks = peak.main()
    harness.save_results("peak", peaks)
    print("matmul peak:", peaks)

    for name, run, show in (
        ("levers", lambda: levers.main(repeats=3 if not quick else 1, ws=ws), levers.report),
        ("sft", lambda: sft.main(steps=6, repeats=repeats, examples=48, ws=ws, peak=peaks), sft.report),
        ("dpo", lambda: dpo.main(steps=4, repeats=repeats, ws=ws), dpo.report),
        ("generate", lambda: generate.main(prompts=96, repeats=repeats, ws=ws), generate.report),
    ):
        result = run()
        harness.save_results(name, result)
        print("\n" + show(result), flush=True)
    # the second workload: answers of 100-400 tokens (benchmarks/long_answers.py), its own results.json entry
    long = long_answers.main(steps=4, repeats=repeats, examples=32, ws=ws, peak=peaks)
    for name in ("sft", "dpo"):
        harness.save_results(name, dict(long[name], workload_stats=long["workload"]), workload=long_answers.WORKLOAD)
    print("\n" + long_answers.report(long), flush=True)
    print(f"\nwrote {harness.RESULTS.relative_to(harness.REPO)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat of each (smoke run)")
    main(p.parse_args().quick)
