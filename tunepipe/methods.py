"""The alignment methods side by side: one markdown row per run, each tested against a baseline.

Run each algorithm as a DVC experiment of the same commit, then compare them with that commit:

    dvc exp run --queue -n grpo -S train_dpo.algorithm=grpo
    dvc exp run --queue -n kto  -S train_dpo.algorithm=kto
    dvc exp run --queue -n orpo -S train_dpo.algorithm=orpo
    dvc exp run --queue -n rloo -S train_dpo.algorithm=rloo
    dvc queue start -j 1 && dvc queue status            # until all have finished
    python -m tunepipe.methods --baseline main grpo kto orpo rloo
    make methods ARGS="--baseline main grpo kto orpo rloo"

A run is anything `git rev-parse` understands (branch, tag, commit, refs/exps/... ref) or the
name of a finished DVC experiment (its ref under refs/exps/, as `dvc exp show` names it; a name
on several baselines is taken from the baseline revision's, else HEAD's), or `workspace`. With
no runs named: every experiment of the baseline commit. Per run it reads, at that revision,

  params.yaml                 train_dpo: algorithm, beta, learning_rate, max_steps, and for
                              grpo/rloo reward and num_generations (no algorithm key: dpo, the
                              only method before the key existed and its default since)
  metrics/eval.json           the final model's task accuracy, preference accuracy (summed
                              log-probs) and ROUGE-L, with compare's intervals
  metrics/eval_items.json     per-item results: each run's change against the baseline's final
                              model on the test items both have, with a paired test
                              (tunepipe.prdiff: exact McNemar for the accuracies, a paired
                              bootstrap for ROUGE-L); "*" when p < compare.alpha, else "n.s."
  metrics/train_dpo.json      train_seconds, from `dvc exp show --json` (the file is DVC-cached,
                              not in git; `dvc metrics show --json` for the workspace)

and prints the table and which method has the best final task accuracy, and whether its lead
over the baseline is significant. A figure that is not there prints "–"; nothing is filled in.
compare.alpha, .confidence and .bootstrap_resamples come from --params (the workspace's
params.yaml). Exit status: 0; 1 when a named run was not found (its row is all "–"); 2 when the
baseline was not found.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from tunepipe import prdiff, reporting
from tunepipe.params import ONLINE_ALGORITHMS

MODEL = "final"
PARAMS = "params.yaml"
EVAL = "metrics/eval.json"
ITEMS = prdiff.ITEMS
TRAIN = "metrics/train_dpo.json"
WORKSPACE = "workspace"
EXPS = "refs/exps/"
# (eval.json key, column label, prdiff kind: "pass" and "pair" exact McNemar, "mean" paired bootstrap)
METRICS = (("task_accuracy", "task accuracy", "pass"), ("pref_accuracy", "preference accuracy", "pair"),
           ("rougeL", "ROUGE-L", "mean"))
SETTINGS = ("beta", "learning_rate", "max_steps")
ONLINE_SETTINGS = ("reward", "num_generations")
# params.yaml without train_dpo.algorithm: the stage trained DPO (the only method before the key
# existed, and the schema's default since).
DEFAULT_ALGORITHM = "dpo"
MISSING = "–"


# --------------------------------------------------------------------------- pure: dicts in, text out


def algorithm_of(params: Optional[dict]) -> str:
    """train_dpo.algorithm of a params.yaml dict; "–" without a train_dpo section."""
    section = (params or {}).get("train_dpo")
    if not isinstance(section, dict):
        return MISSING
    return str(section.get("algorithm") or DEFAULT_ALGORITHM)


def settings_summary(params: Optional[dict]) -> str:
    """The algorithm's key settings as -S would set them: "beta=0.1, learning_rate=0.0001, max_steps=12"
    (with epochs=N when max_steps is null), then for grpo/rloo "reward=checker, num_generations=4"."""
    section = (params or {}).get("train_dpo")
    if not isinstance(section, dict):
        return MISSING
    keys = list(SETTINGS)
    if section.get("max_steps") is None and section.get("epochs") is not None:
        keys[keys.index("max_steps")] = "epochs"
    if algorithm_of(params) in ONLINE_ALGORITHMS:
        keys += ONLINE_SETTINGS
    return ", ".join(f"{k}={_setting(section.get(k))}" for k in keys)


def _setting(v) -> str:
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else str(v)


def final_figures(eval_json: Optional[dict]) -> dict[str, Optional[tuple]]:
    """{metric: (value, ci_low, ci_high)} of the final model in metrics/eval.json; None where absent."""
    model = (eval_json or {}).get(MODEL)
    model = model if isinstance(model, dict) else {}
    return {key: reporting.estimate(model, key) for key, _, _ in METRICS}


def paired_tests(base_items: Optional[dict], items: Optional[dict], cfg) -> dict[str, Optional[dict]]:
    """{metric: prdiff.compare_metric result (run minus baseline) or None} on the final model's shared items."""
    old = ((base_items or {}).get("models") or {}).get(MODEL)
    new = ((items or {}).get("models") or {}).get(MODEL)
    if not isinstance(old, dict) or not isinstance(new, dict):
        return {key: None for key, _, _ in METRICS}
    return {key: prdiff.compare_metric(prdiff.metric_outcomes(old, key, kind),
                                       prdiff.metric_outcomes(new, key, kind), kind, cfg)
            for key, _, kind in METRICS}


def fmt_test(metric: str, res: Optional[dict]) -> str:
    """"+8.3 pts (p=0.01) *" or "+1.0 pts (p=0.82, n.s.)" (reporting.fmt_delta); "–" when untested."""
    if res is None:
        return MISSING
    return reporting.fmt_delta(metric, {"delta": res["delta"], "p": res["p_value"], "significant": res["significant"]})


def fmt_seconds(train: Optional[dict]) -> str:
    s = (train or {}).get("train_seconds")
    return f"{s:.1f} s" if reporting._num(s) else MISSING


def label(run: dict, baseline: bool = False) -> str:
    rev = run.get("rev")
    at = f" (`{rev[:7]}`)" if rev and rev != WORKSPACE else ""
    return f"{run['name']}{at}" + (", baseline" if baseline else "")


def rows(runs: list[dict], tests: list[dict]) -> list[list[str]]:
    """One table row per run (the first is the baseline, whose change columns are "–")."""
    out = []
    for k, (run, tested) in enumerate(zip(runs, tests)):
        figures = final_figures(run.get("eval"))
        row = [label(run, baseline=k == 0), algorithm_of(run.get("params")), settings_summary(run.get("params"))]
        for key, _, _ in METRICS:
            row += [reporting.fmt_estimate(key, figures[key]), MISSING if k == 0 else fmt_test(key, tested[key])]
        out.append(row + [fmt_seconds(run.get("train"))])
    return out


def header(confidence: float) -> list[str]:
    cells = ["run", "algorithm", "settings"]
    for _, name, _ in METRICS:
        cells += [f"{name} [{confidence:.0%} CI]", f"Δ {name}"]
    return cells + ["train-dpo time"]


def best_line(runs: list[dict], tests: list[dict], cfg) -> str:
    """Which run has the best final task accuracy, and whether its lead over the baseline is significant."""
    acc = [(final_figures(r.get("eval"))["task_accuracy"] or (None,))[0] for r in runs]
    known = [a for a in acc if a is not None]
    if not known:
        return "No run has a final task accuracy: no best method."
    top = max(known)
    best = [k for k, a in enumerate(acc) if a == top]
    base = runs[0]
    if 0 in best:
        tied = [runs[k]["name"] for k in best if k != 0]
        also = f" (tied with {', '.join(tied)})" if tied else ""
        return (f"Best final task accuracy: the baseline {base['name']} ({algorithm_of(base.get('params'))}), "
                f"{reporting.fmt_estimate('task_accuracy', final_figures(base.get('eval'))['task_accuracy'])}"
                f"{also}; no method beats it.")
    return " ".join(_lead(runs[k], tests[k]["task_accuracy"], base, cfg) for k in best)


def _lead(run: dict, res: Optional[dict], base: dict, cfg) -> str:
    est = reporting.fmt_estimate("task_accuracy", final_figures(run.get("eval"))["task_accuracy"])
    head = f"Best final task accuracy: {run['name']} ({algorithm_of(run.get('params'))}), {est}"
    if acc_missing(base):
        return f"{head}; the baseline {base['name']} has no final task accuracy to test its lead against."
    if res is None:
        return (f"{head}; its lead over the baseline {base['name']} is not tested "
                f"(no per-item results of both final models in {ITEMS}).")
    verdict = "significant" if res["significant"] else "not significant"
    return (f"{head}; its lead over the baseline {base['name']} is {verdict} at α = {cfg.alpha}: "
            f"{fmt_test('task_accuracy', res)} on {res['n']} paired test items.")


def acc_missing(run: dict) -> bool:
    return final_figures(run.get("eval"))["task_accuracy"] is None


def notes(runs: list[dict], tests: list[dict]) -> list[str]:
    """What the reader must know to read the table: missing inputs, items not paired."""
    out = []
    base = runs[0]
    for run in runs:
        if run.get("rev") is None:
            out.append(f"{run['name']}: not found (neither a git revision nor a finished DVC experiment; "
                       "queued, running or failed? `dvc queue status`, `dvc exp show`).")
            continue
        missing = [path for path, key in ((PARAMS, "params"), (EVAL, "eval"), (ITEMS, "items")) if run.get(key) is None]
        if missing:
            out.append(f"{run['name']}: no {', '.join(missing)} at this revision.")
    n_base = len(prdiff.metric_outcomes(((base.get("items") or {}).get("models") or {}).get(MODEL) or {},
                                        "task_accuracy", "pass"))
    for run, tested in zip(runs[1:], tests[1:]):
        res = tested["task_accuracy"]
        if res is not None and res["n"] < n_base:
            out.append(f"{run['name']}: paired on {res['n']} of the baseline's {n_base} test items "
                       "(the test split differs).")
    return out


def render(runs: list[dict], cfg) -> str:
    """The markdown: a line on the tests, the table, the best method, then notes. ``runs[0]`` is the baseline;
    each run is {"name", "rev", "params", "eval", "items", "train"} (None where missing)."""
    base = runs[0]
    tests = [paired_tests(base.get("items"), r.get("items"), cfg) for r in runs]
    parts = [f"### Alignment methods against `{base['name']}`",
             (f"Final model, test split. Changes are against the baseline's final model on the test items both "
              f"have: exact McNemar test for the accuracies, paired bootstrap ({cfg.bootstrap_resamples} "
              f"resamples) for ROUGE-L; **\\*** significant at α = {cfg.alpha}, n.s. not significant. "
              f"Preference accuracy: summed log-probs. \"{MISSING}\": not available."),
             prdiff._table(header(cfg.confidence), rows(runs, tests)),
             best_line(runs, tests, cfg)]
    extra = notes(runs, tests)
    if extra:
        parts.append("\n".join(f"- {n}" for n in extra))
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- IO: git and dvc


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def commit_of(rev: str) -> Optional[str]:
    out = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def exp_refs() -> list[tuple[str, str, str]]:
    """(commit, baseline commit, name) of every experiment ref (refs/exps/<sha[:2]>/<sha[2:]>/<name>,
    as dvc.repo.experiments.refs.ExpRefInfo lays them out; exec/, celery/, stash and the like skipped)."""
    out = _git("for-each-ref", "--format=%(objectname) %(refname)", EXPS)
    found = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        sha, _, ref = line.partition(" ")
        parts = ref.split("/")
        if len(parts) == 5 and len(parts[2]) == 2 and len(parts[2] + parts[3]) == 40:
            found.append((sha, parts[2] + parts[3], parts[4]))
    return found


def resolve(name: str, prefer: Sequence[str] = ()) -> Optional[str]:
    """The commit of a git revision, else of the DVC experiment of that name; on several baselines the
    first of ``prefer`` that has one (then HEAD), as dvc's resolve_name does. None when not found or ambiguous."""
    sha = commit_of(name)
    if sha:
        return sha
    matches = [(commit, baseline) for commit, baseline, exp in exp_refs() if exp == name]
    if len(matches) == 1:
        return matches[0][0]
    for baseline in [*prefer, commit_of("HEAD")]:
        hits = [commit for commit, b in matches if b == baseline]
        if hits:
            return hits[0]
    if matches:
        print(f"methods: experiment {name!r} exists on {len(matches)} baselines; name it by its ref "
              f"(git for-each-ref {EXPS})", file=sys.stderr)
    return None


def experiments_of(baseline: str) -> list[str]:
    return sorted({name for _, b, name in exp_refs() if b == baseline})


def text_at(rev: str, path: str) -> Optional[str]:
    """A file as committed at ``rev``, or in the working tree for "workspace"; None when absent."""
    if rev == WORKSPACE:
        p = Path(path)
        return p.read_text(encoding="utf-8") if p.is_file() else None
    out = _git("show", f"{rev}:{path}")
    return out.stdout if out.returncode == 0 else None


def json_at(rev: str, path: str) -> Optional[dict]:
    if rev != WORKSPACE:
        return prdiff.read_at(rev, path)
    text = text_at(rev, path)
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None


def params_at(rev: str) -> Optional[dict]:
    import yaml

    text = text_at(rev, PARAMS)
    try:
        got = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        return None
    return got if isinstance(got, dict) else None


def _dvc() -> Optional[list[str]]:
    """The dvc command ($DVC, the one beside this python, or on PATH); None outside a DVC repository."""
    top = _git("rev-parse", "--show-toplevel").stdout.strip()
    if not top or not (Path(top) / ".dvc").is_dir():
        return None
    beside = Path(sys.executable).parent / "dvc"
    cmd = os.environ.get("DVC") or (str(beside) if beside.exists() else shutil.which("dvc"))
    return [cmd] if cmd else None


def _dvc_json(args: list[str]):
    dvc = _dvc()
    if dvc is None:
        return None
    out = subprocess.run(dvc + args, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"methods: `dvc {' '.join(args[:2])}` failed; train-dpo times not shown: "
              f"{out.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return None


def train_metrics(commits: Sequence[str]) -> dict[str, dict]:
    """{commit: metrics/train_dpo.json} from `dvc exp show --json` for these commits (experiments included)."""
    if not commits:
        return {}
    args = ["exp", "show", "--json", "--hide-workspace", "--hide-queued", "--hide-failed", "-n", "1"]
    for sha in dict.fromkeys(commits):
        args += ["--rev", sha]
    return {row["rev"]: data for row in _exp_rows(_dvc_json(args))
            if (data := _file_data((row.get("data") or {}).get("metrics"), TRAIN)) is not None}


def _exp_rows(rows):
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and row.get("rev"):
            yield row
            for exp in row.get("experiments") or []:
                yield from _exp_rows(exp.get("revs"))


def _file_data(files, path: str) -> Optional[dict]:
    data = ((files or {}).get(path) or {}).get("data")
    return data if isinstance(data, dict) else None


def workspace_train() -> Optional[dict]:
    """metrics/train_dpo.json of the workspace, via `dvc metrics show --json` ({"": {"data": {path: {"data"}}}})."""
    got = _dvc_json(["metrics", "show", "--json"])
    return _file_data(((got or {}).get("") or {}).get("data"), TRAIN) if isinstance(got, dict) else None


def load(name: str, rev: Optional[str], train: Optional[dict]) -> dict:
    """One run's inputs at ``rev`` (a commit or "workspace"; None: not found, nothing read)."""
    if rev is None:
        return {"name": name, "rev": None, "params": None, "eval": None, "items": None, "train": None}
    return {"name": name, "rev": rev, "params": params_at(rev), "eval": json_at(rev, EVAL),
            "items": json_at(rev, ITEMS), "train": train}


# --------------------------------------------------------------------------- command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunepipe.methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="git revisions or DVC experiment names (default: every experiment of the baseline)")
    parser.add_argument("--baseline", default="HEAD", help="the revision every run is tested against (default HEAD)")
    parser.add_argument("--params", default=PARAMS,
                        help=f"params file with the compare section: alpha, confidence, resamples (default {PARAMS})")
    args = parser.parse_args(argv)
    if _git("rev-parse", "--git-dir").returncode != 0:
        print("methods: not inside a git repository", file=sys.stderr)
        return 2
    cfg = prdiff.settings(args.params)
    base = WORKSPACE if args.baseline == WORKSPACE else resolve(args.baseline)
    if base is None:
        print(f"methods: unknown baseline {args.baseline!r}", file=sys.stderr)
        return 2
    names = [n for n in dict.fromkeys(args.runs) if n != args.baseline]
    if not args.runs:
        names = experiments_of(base)
        if not names:
            print(f"methods: no finished DVC experiments of {args.baseline} ({base[:7]}); queue them first "
                  "(see python -m tunepipe.methods --help) or name the runs", file=sys.stderr)
            return 2
    revs = {n: WORKSPACE if n == WORKSPACE else resolve(n, prefer=[base]) for n in names}
    commits = [r for r in [base, *revs.values()] if r not in (None, WORKSPACE)]
    train = train_metrics(commits)
    if WORKSPACE in (base, *revs.values()):
        train[WORKSPACE] = workspace_train()
    runs = [load(args.baseline, base, train.get(base))] + [load(n, r, train.get(r)) for n, r in revs.items()]
    sys.stdout.write(render(runs, cfg))
    return 1 if any(r is None for r in revs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
