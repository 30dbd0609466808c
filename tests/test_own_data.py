"""Your own data, end to end, the way the README tells a user to run it (`dvc exp run -S ...`).

Two files the project did not make, on the tiny model:

  * an Alpaca file with long free-text answers, no checker and no preference pairs
    (fetch.preference.source=none: DPO is skipped, final = base + SFT);
  * a ShareGPT conversation file plus a preference-pair file (DPO trains on the user's pairs).

Each asserts the outputs and what the report shows: the instructions as written, no checker
legend, the derived answer length, and an honest note on the test size.
"""

from __future__ import annotations

import json
import random

import pytest

from tests.dvcproject import copy_project, dvc_log

pytestmark = pytest.mark.e2e

WORDS = ("the river model learns slowly while careful people write long answers about data, "
         "training, evaluation and the many small choices that decide whether a result holds").split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def alpaca_rows(n: int) -> list[dict]:
    """Instructions a person wrote, answers of 30 to 90 words, nothing a checker could verify."""
    rng = random.Random(0)
    return [{"instruction": f"Explain topic number {i} in plain words for a new colleague.",
             "input": "" if i % 3 else f"Context: note {i}.",
             "output": " ".join(sentence(rng, 10) for _ in range(rng.randint(3, 9)))} for i in range(n)]


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def exp_run(root, env, *settings: str) -> str:
    return dvc_log(root, env, "exp", "run", *[arg for s in settings for arg in ("-S", s)])


def read(root, path: str):
    return json.loads((root / path).read_text())


@pytest.fixture(scope="module")
def alpaca_project(reproduced_project, tmp_path_factory):
    root, env = copy_project(reproduced_project, tmp_path_factory.mktemp("own_alpaca") / "p")
    write_jsonl(root / "mydata/alpaca.jsonl", alpaca_rows(120))
    # the README's command, plus the tiny configuration's evaluate cap set back to its default
    exp_run(root, env, "fetch.sft.source=local", "fetch.sft.path=mydata/alpaca.jsonl", "fetch.sft.format=alpaca",
            "fetch.preference.source=none", "evaluate.max_new_tokens_cap=384")
    return root


def test_alpaca_without_preferences_skips_dpo_and_merges_sft_only(alpaca_project):
    root = alpaca_project
    assert "skipped" in read(root, "metrics/train_dpo.json")
    assert sorted(p.name for p in (root / "models/dpo").iterdir()) == ["skipped.json"]
    card = (root / "models/final/README.md").read_text()
    assert "DPO skipped" in card and "SFT + DPO" not in card
    manifest = read(root, "data/raw/manifest.json")
    # 120 rows: 5% would test on 6 prompts; the minimum, capped at a quarter of the rows, gives 30
    assert manifest["files"]["sft_test.jsonl"]["rows"] == 30
    assert manifest["files"]["pref_train.jsonl"]["rows"] == 0


def test_alpaca_metrics_derive_the_answer_length_and_flag_the_small_test(alpaca_project):
    root = alpaca_project
    metrics = read(root, "metrics/eval.json")
    assert "pref_accuracy" not in metrics["final"] and metrics["final"]["n_pairs"] == 0
    assert metrics["final"].get("task_accuracy") is None  # no checker: no task accuracy
    assert metrics["test_size"]["n_items"] == 30 and metrics["test_size"]["small"]
    generation = metrics["generation"]
    assert generation["derived"].startswith("auto: 95th percentile") and "capped" not in generation["derived"]
    assert generation["max_new_tokens"] > 48  # long answers: a longer limit than the default data's
    gens = [json.loads(line) for line in (root / "data/eval/final/generations.jsonl").read_text().splitlines()]
    assert max(g["n_new_tokens"] for g in gens) <= generation["max_new_tokens"]


def test_alpaca_report_shows_instructions_as_written_and_no_checker(alpaca_project):
    root = alpaca_project
    html = (root / "reports/report.html").read_text()
    test_rows = [json.loads(line) for line in (root / "data/templated/sft_test.jsonl").read_text().splitlines()]
    shown = [r["instruction"] for r in test_rows if r["instruction"].split("\n")[0] in html]
    assert shown, "no test instruction appears in the report as written"
    assert "templated prompt" in html
    assert "checker's verdict" not in html and "wrong answer" not in html
    assert "DPO skipped" in html
    assert "Only 30 test prompts" in html


@pytest.fixture(scope="module")
def sharegpt_project(reproduced_project, tmp_path_factory):
    root, env = copy_project(reproduced_project, tmp_path_factory.mktemp("own_sharegpt") / "p")
    rows = alpaca_rows(100)
    write_jsonl(root / "mydata/chat.jsonl", [{"conversations": [
        {"from": "system", "value": "You are a patient teacher."},
        {"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]} for r in rows])
    write_jsonl(root / "mydata/pairs.jsonl", [{"prompt": f"Which word comes after {w} (list {i})?",
                                               "chosen": "The next one.", "rejected": f"{w} {w} {w} {w}"}
                                              for i in range(3) for w in sorted(set(WORDS))])
    exp_run(root, env, "fetch.sft.source=local", "fetch.sft.path=mydata/chat.jsonl", "fetch.sft.format=sharegpt",
            "fetch.preference.source=local", "fetch.preference.path=mydata/pairs.jsonl",
            "fetch.preference.format=preference")
    return root


def test_sharegpt_with_a_preference_file_trains_dpo_on_the_users_pairs(sharegpt_project):
    root = sharegpt_project
    train_dpo = read(root, "metrics/train_dpo.json")
    assert "skipped" not in train_dpo and train_dpo["train_pairs"] > 0
    metrics = read(root, "metrics/eval.json")
    assert metrics["final"]["n_pairs"] > 0 and "pref_accuracy" in metrics["final"]
    html = (root / "reports/report.html").read_text()
    assert "Explain topic number" in html and "You are a patient teacher" not in html.split("templated prompt")[0]
    assert "DPO skipped" not in html
