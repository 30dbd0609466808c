"""tunepipe.methods: the alignment methods' table from plain dicts, the settings per algorithm,
the dvc exp show JSON, and the command line on a throwaway git repo (no dvc)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tunepipe import methods
from tunepipe.params import Compare

N = 40


def eval_json(acc: float, pref: float | None = 0.9, rouge: float | None = 0.4) -> dict:
    final = {"task_accuracy": acc, "task_accuracy_ci_low": round(acc - 0.1, 4), "task_accuracy_ci_high": acc + 0.1}
    if pref is not None:
        final |= {"pref_accuracy": pref, "pref_accuracy_ci_low": pref - 0.05, "pref_accuracy_ci_high": pref + 0.05}
    if rouge is not None:
        final |= {"rougeL": rouge, "rougeL_ci_low": rouge - 0.05, "rougeL_ci_high": rouge + 0.05}
    return {"models": ["base", "sft", "final"], "final": final}


def eval_items(passes: set, rouge_of_pass: float = 0.9, prefs: bool = True) -> dict:
    """metrics/eval_items.json: the final model passes the items in ``passes`` of N."""
    gens = [{"id": f"t{i}", "task": "pass" if i in passes else "wrong_answer", "output": "x",
             "rougeL": rouge_of_pass if i in passes else 0.1, "ref_nll": 0.5, "ref_tokens": 3} for i in range(N)]
    pairs = [{"id": f"p{i}", "correct": i < 30, "correct_norm": True} for i in range(N)] if prefs else []
    return {"prompts": [{"id": f"t{i}", "prompt": f"q{i}"} for i in range(N)],
            "models": {"final": {"generations": gens, "preferences": pairs}}}


def params(algorithm: str | None = "dpo", **overrides) -> dict:
    section = {"beta": 0.1, "learning_rate": 1.0e-4, "max_steps": 12, "epochs": None, "reward": "checker",
               "num_generations": 4, **overrides}
    if algorithm is not None:
        section["algorithm"] = algorithm
    return {"train_dpo": section, "compare": {"alpha": 0.05}}


def run(name, algorithm, acc, passes, train_seconds=100.0, **kw) -> dict:
    return {"name": name, "rev": name.encode().hex().ljust(40, "0")[:40], "params": params(algorithm),
            "eval": eval_json(acc, **kw), "items": eval_items(passes, prefs=kw.get("pref", 0.9) is not None),
            "train": {"train_seconds": train_seconds} if train_seconds is not None else None}


def cells(markdown: str, startswith: str) -> list[str]:
    line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {startswith}"))
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def column(markdown: str, name: str) -> int:
    head = cells(markdown, "run")
    return head.index(name)


BASE = set(range(10))                       # 10 of 40
BIG_GAIN = set(range(30))                   # 20 fixed, none broken: McNemar p ~ 2e-6
SMALL_GAIN = set(range(12))                 # 2 fixed: p = 0.5


def test_table_marks_a_significant_gain_a_non_significant_one_and_missing_figures():
    runs = [run("main", None, 0.25, BASE, 812.34),
            run("grpo", "grpo", 0.75, BIG_GAIN, 1500.0),
            run("kto", "kto", 0.30, SMALL_GAIN, None),
            run("orpo", "orpo", 0.25, BASE, 90.0, pref=None, rouge=None)]
    md = methods.render(runs, Compare())
    delta, rouge_delta = column(md, "Δ task accuracy"), column(md, "Δ ROUGE-L")
    main, grpo, kto, orpo = (cells(md, n) for n in ("main", "grpo", "kto", "orpo"))
    assert main[:4] == [f"main (`{runs[0]['rev'][:7]}`), baseline", "dpo",
                        "beta=0.1, learning_rate=0.0001, max_steps=12", "25.0% [15.0, 35.0]"]
    assert main[delta] == "–" and main[-1] == "812.3 s"
    assert grpo[delta] == "+50.0 pts (p<0.001) *"
    assert grpo[rouge_delta] == "+0.400 (p=0.002) *"       # the bootstrap's smallest p: 2 / (1000 + 1)
    assert grpo[2].endswith("reward=checker, num_generations=4")
    assert kto[delta] == "+5.0 pts (p=0.50, n.s.)"
    assert kto[-1] == "–"                                       # no train_dpo.json figures
    pref, pref_delta = column(md, "preference accuracy [95% CI]"), column(md, "Δ preference accuracy")
    assert orpo[pref] == "–" and orpo[pref_delta] == "–" and orpo[column(md, "ROUGE-L [95% CI]")] == "–"
    assert orpo[delta] == "+0.0 pts (p=1.00, n.s.)"
    assert grpo[pref] == "90.0% [85.0, 95.0]" and grpo[pref_delta] == "+0.0 pts (p=1.00, n.s.)"
    assert ("Best final task accuracy: grpo (grpo), 75.0% [65.0, 85.0]; its lead over the baseline main is "
            "significant at α = 0.05: +50.0 pts (p<0.001) * on 40 paired test items.") in md


def test_best_line_when_the_lead_is_not_significant_or_the_baseline_is_best():
    md = methods.render([run("main", "dpo", 0.25, BASE), run("kto", "kto", 0.30, SMALL_GAIN)], Compare())
    assert "its lead over the baseline main is not significant at α = 0.05: +5.0 pts (p=0.50, n.s.)" in md
    md = methods.render([run("main", "dpo", 0.30, SMALL_GAIN), run("kto", "kto", 0.25, BASE)], Compare())
    assert "Best final task accuracy: the baseline main (dpo), 30.0% [20.0, 40.0]; no method beats it." in md
    # the line names the alpha that decided
    md = methods.render([run("main", "dpo", 0.25, BASE), run("kto", "kto", 0.30, SMALL_GAIN)],
                        Compare(alpha=0.01))
    assert "not significant at α = 0.01" in md


def test_nothing_is_invented_for_missing_inputs():
    base = run("main", "dpo", 0.25, BASE)
    no_items = {**run("rloo", "rloo", 0.5, BIG_GAIN), "items": None}
    lost = methods.load("ghost", None, None)
    md = methods.render([base, no_items, lost], Compare())
    rloo, ghost = cells(md, "rloo"), cells(md, "ghost")
    assert rloo[column(md, "task accuracy [95% CI]")] == "50.0% [40.0, 60.0]"
    assert rloo[column(md, "Δ task accuracy")] == "–"
    assert ghost[1:] == ["–"] * (len(ghost) - 1)
    assert "its lead over the baseline main is not tested" in md
    assert "- rloo: no metrics/eval_items.json at this revision." in md
    assert "- ghost: not found" in md
    assert methods.best_line([lost], [methods.paired_tests(None, None, Compare())], Compare()) == \
        "No run has a final task accuracy: no best method."


def test_items_not_in_both_revisions_are_left_out_and_said():
    base = run("main", "dpo", 0.25, BASE)
    other = run("kto", "kto", 0.25, BASE)
    other["items"]["models"]["final"]["generations"] = other["items"]["models"]["final"]["generations"][:30]
    md = methods.render([base, other], Compare())
    assert "- kto: paired on 30 of the baseline's 40 test items (the test split differs)." in md


@pytest.mark.parametrize("algorithm, expected", [
    ("dpo", "beta=0.1, learning_rate=0.0001, max_steps=12"),
    ("kto", "beta=0.1, learning_rate=0.0001, max_steps=12"),
    ("orpo", "beta=0.1, learning_rate=0.0001, max_steps=12"),
    ("grpo", "beta=0.1, learning_rate=0.0001, max_steps=12, reward=checker, num_generations=4"),
    ("rloo", "beta=0.1, learning_rate=0.0001, max_steps=12, reward=checker, num_generations=4"),
])
def test_settings_per_algorithm(algorithm, expected):
    assert methods.algorithm_of(params(algorithm)) == algorithm
    assert methods.settings_summary(params(algorithm)) == expected


def test_settings_edge_cases():
    assert methods.algorithm_of(params(None)) == "dpo"          # params.yaml from before the key existed
    assert methods.settings_summary(params(None)) == "beta=0.1, learning_rate=0.0001, max_steps=12"
    assert methods.algorithm_of({}) == methods.settings_summary(None) == "–"
    assert methods.settings_summary(params("rloo", max_steps=None, epochs=2, learning_rate=5e-5, reward="model")) \
        == "beta=0.1, learning_rate=5e-05, epochs=2, reward=model, num_generations=4"
    got = params("grpo")
    del got["train_dpo"]["beta"], got["train_dpo"]["num_generations"]
    assert methods.settings_summary(got) == \
        "beta=–, learning_rate=0.0001, max_steps=12, reward=checker, num_generations=–"


def test_train_seconds_from_dvc_exp_show_json(monkeypatch):
    def row(rev, name, seconds, experiments=None):
        metrics = {"metrics/train_dpo.json": {"data": {"train_seconds": seconds}}} if seconds else \
            {"metrics/train_dpo.json": {"error": {"type": "FileNotFoundError"}}}
        return {"rev": rev, "name": name, "data": {"rev": rev, "metrics": metrics}, "error": None,
                "experiments": experiments}

    shown = [row("a" * 40, "main", 12.5, [{"revs": [row("b" * 40, "grpo", 40.0)], "name": "grpo"},
                                           {"revs": [row("c" * 40, "kto", None)], "name": "kto"}])]
    calls = []
    monkeypatch.setattr(methods, "_dvc_json", lambda args: calls.append(args) or shown)
    got = methods.train_metrics(["a" * 40, "b" * 40])
    assert got == {"a" * 40: {"train_seconds": 12.5}, "b" * 40: {"train_seconds": 40.0}}
    assert calls[0][:3] == ["exp", "show", "--json"] and calls[0].count("--rev") == 2
    monkeypatch.setattr(methods, "_dvc_json", lambda args: None)   # no dvc, or it failed
    assert methods.train_metrics(["a" * 40]) == {}


# --------------------------------------------------------------------------- the command line on a git repo


def git(root, *args) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def commit(root, algorithm, acc, passes, message):
    (root / "metrics").mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params(algorithm)))
    (root / "metrics" / "eval.json").write_text(json.dumps(eval_json(acc)))
    (root / "metrics" / "eval_items.json").write_text(json.dumps(eval_items(passes)))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_main_on_two_commits_of_a_throwaway_repo(tmp_path, monkeypatch, capsys):
    for key, value in (("GIT_AUTHOR_NAME", "t"), ("GIT_AUTHOR_EMAIL", "t@example.com"),
                       ("GIT_COMMITTER_NAME", "t"), ("GIT_COMMITTER_EMAIL", "t@example.com")):
        monkeypatch.setenv(key, value)
    git(tmp_path, "init", "-q", "-b", "main")
    first = commit(tmp_path, "dpo", 0.25, BASE, "dpo run")
    second = commit(tmp_path, "grpo", 0.75, BIG_GAIN, "grpo run")
    monkeypatch.chdir(tmp_path)

    assert methods.main(["--baseline", "HEAD~1", "HEAD"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("### Alignment methods against `HEAD~1`")
    base, head = cells(md, "HEAD~1"), cells(md, "HEAD (")
    assert base[:4] == [f"HEAD~1 (`{first[:7]}`), baseline", "dpo", "beta=0.1, learning_rate=0.0001, max_steps=12",
                        "25.0% [15.0, 35.0]"]
    assert head[:5] == [f"HEAD (`{second[:7]}`)", "grpo",
                        "beta=0.1, learning_rate=0.0001, max_steps=12, reward=checker, num_generations=4",
                        "75.0% [65.0, 85.0]", "+50.0 pts (p<0.001) *"]
    assert base[-1] == head[-1] == "–"                      # no dvc here: no train-dpo time
    assert "Best final task accuracy: HEAD (grpo), 75.0% [65.0, 85.0]; its lead over the baseline HEAD~1 is " \
           "significant" in md

    # a DVC experiment by name (its ref as dvc lays it out), found without naming it, and a missing one
    git(tmp_path, "update-ref", f"refs/exps/{first[:2]}/{first[2:]}/grpo", second)
    assert methods.main(["--baseline", first]) == 0
    assert cells(capsys.readouterr().out, "grpo")[0] == f"grpo (`{second[:7]}`)"
    assert methods.main(["--baseline", "main~1", "grpo", "kto"]) == 1
    md = capsys.readouterr().out
    assert cells(md, "grpo")[3] == "75.0% [65.0, 85.0]" and cells(md, "kto")[1:4] == ["–", "–", "–"]
    assert "- kto: not found" in md
    assert methods.main(["--baseline", "nope", "HEAD"]) == 2
