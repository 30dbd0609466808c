"""The generated task data: deterministic, disjoint splits, and checkers that mean it."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from tunepipe import tasks

SIZES = {"train": 300, "val": 40, "test": 60}


def _keys(records):
    return {(r["instruction"], r["input"]) for r in records}


def test_same_seed_same_bytes_different_seed_different_records():
    a = tasks.generate_sft("train", 50, seed=1)
    b = tasks.generate_sft("train", 50, seed=1)
    c = tasks.generate_sft("train", 50, seed=2)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(tasks.generate_preference("val", 30, 1)) == json.dumps(tasks.generate_preference("val", 30, 1))
    assert len(_keys(a) & _keys(c)) < 5


def test_splits_are_disjoint_for_sft_and_preference_and_across_seeds():
    by_split = {s: set() for s in SIZES}
    for seed in (0, 1):
        for split, n in SIZES.items():
            by_split[split] |= _keys(tasks.generate_sft(split, n, seed))
            by_split[split] |= _keys(tasks.generate_preference(split, n // 2, seed))
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["val"]
    assert not by_split["val"] & by_split["test"]


def test_record_shape_sizes_and_family_balance():
    records = tasks.generate_sft("train", 100, seed=3)
    assert len(records) == 100 and len({r["id"] for r in records}) == 100
    assert Counter(r["meta"]["family"] for r in records) == {f: 20 for f in tasks.FAMILIES}
    for r in records:
        assert set(r) == {"id", "instruction", "input", "output", "system", "history", "meta"}
        assert r["system"] is None and r["history"] == [] and isinstance(r["input"], str)
        assert r["output"] and r["instruction"].endswith(".")
    only = tasks.generate_sft("test", 10, seed=3, families=["units"])
    assert {r["meta"]["family"] for r in only} == {"units"}


def test_prompts_and_answers_are_short():
    records = tasks.generate_sft("train", 400, seed=0)
    assert max(len(r["output"].split()) for r in records) <= 8
    assert max(len((r["instruction"] + " " + r["input"]).split()) for r in records) <= 45


def test_unknown_family_and_impossible_size_fail_clearly():
    with pytest.raises(ValueError, match="unknown task families"):
        tasks.generate_sft("train", 5, 0, families=["poetry"])
    with pytest.raises(ValueError, match="unknown split"):
        tasks.generate_sft("dev", 5, 0)


def test_every_generated_answer_passes_and_every_rejected_fails():
    kinds = Counter()
    for split, n in SIZES.items():
        for r in tasks.generate_sft(split, n, seed=5):
            assert tasks.check(r["meta"], r["output"]) is None, r
        for r in tasks.generate_preference(split, n, seed=5):
            assert tasks.check(r["meta"], r["chosen"]) is None, r
            verdict = tasks.check(r["meta"], r["rejected"])
            assert verdict in ("wrong_answer", "constraint_broken"), r
            kinds[r["meta"]["rejected_kind"], verdict] += 1
    assert {k for k, _ in kinds} == set(tasks.REJECTED_KINDS)
    # a wrong answer in the right form is a wrong answer; the right answer in the wrong form is not
    assert kinds["wrong_answer", "constraint_broken"] == 0
    assert kinds["ignored_constraint", "wrong_answer"] == 0 and kinds["no_stop", "wrong_answer"] == 0


def test_each_rejected_kind_looks_like_its_failure():
    task = tasks.units(random.Random(0))
    rng = random.Random(1)
    assert tasks.rejected_answer(task, "wrong_answer", rng) == task.wrong != task.output
    assert len(tasks.rejected_answer(task, "rambling", rng).split()) > 10
    rep = tasks.rejected_answer(task, "repetition", rng)
    assert rep.count(task.output) >= 3 or rep.count(task.loose) >= 3
    assert tasks.rejected_answer(task, "no_stop", rng).startswith(task.output + "\n")
    with pytest.raises(ValueError):
        tasks.rejected_answer(task, "rude", rng)


NUMBER = {"family": "arithmetic", "check": {"type": "number", "answer": 3000}}
YES = {"family": "lists", "check": {"type": "choice", "answer": "yes", "options": ["yes", "no"]}}
UPPER = {"family": "text", "check": {"type": "text", "answer": "GREEN RIVER", "case": "answer"}}
LOWER = {"family": "format", "check": {"type": "text", "answer": "green river", "case": "constraint"}}
REVERSED = {"family": "text", "check": {"type": "text", "answer": "stone river", "case": "ignore"}}
SORTED = {"family": "lists", "check": {"type": "list", "answer": ["3", "7", "19"]}}
JSON = {"family": "format", "check": {"type": "json", "key": "sum", "answer": 23}}
WORDS = {"family": "format", "check": {"type": "word_count", "n": 4, "keyword": "23"}}


@pytest.mark.parametrize("meta, output, expected", [
    (NUMBER, "3000", None), (NUMBER, " 3,000. ", None), (NUMBER, "3000 meters", "constraint_broken"),
    (NUMBER, "The answer is 3000.", "constraint_broken"), (NUMBER, "300", "wrong_answer"),
    (NUMBER, "30000", "wrong_answer"), (NUMBER, "3000\n\nQuestion: what is 2+2?", "constraint_broken"),
    (YES, "Yes", None), (YES, "yes.", None), (YES, "No", "wrong_answer"),
    (YES, "Yes, 42 is in the list.", "constraint_broken"), (YES, "No, it is not.", "wrong_answer"),
    (UPPER, "GREEN RIVER", None), (UPPER, '"GREEN RIVER"', None), (UPPER, "green river", "wrong_answer"),
    (UPPER, "Green River", "wrong_answer"), (UPPER, "Sure: GREEN RIVER", "constraint_broken"),
    (LOWER, "green river", None), (LOWER, "Green River", "constraint_broken"), (LOWER, "green", "wrong_answer"),
    (REVERSED, "Stone River.", None), (REVERSED, "river stone", "wrong_answer"),
    (REVERSED, "Reversed: stone river", "constraint_broken"),
    (SORTED, "3, 7, 19", None), (SORTED, "3,7,19.", None), (SORTED, "7, 3, 19", "wrong_answer"),
    (SORTED, "3 7 19", "constraint_broken"), (SORTED, "The sorted numbers are 3, 7 and 19.", "constraint_broken"),
    (SORTED, "3, 7, 19, 40", "wrong_answer"),
    (JSON, '{"sum": 23}', None), (JSON, '{"sum": "23"}', None), (JSON, '{"sum": 22}', "wrong_answer"),
    (JSON, '{"total": 23}', "constraint_broken"), (JSON, "The sum is 23.", "constraint_broken"),
    (JSON, '```json\n{"sum": 23}\n```', "constraint_broken"), (JSON, "twenty", "wrong_answer"),
    (WORDS, "The answer is 23.", None), (WORDS, "It is 23.", "constraint_broken"),
    (WORDS, "The answer is 17.", "wrong_answer"),
])
def test_checkers_on_hand_made_answers(meta, output, expected):
    assert tasks.check(meta, output) == expected


def test_check_refuses_records_without_a_checker():
    assert not tasks.has_check({"source": "hub"})
    with pytest.raises(ValueError, match="no checker"):
        tasks.check({"source": "hub"}, "anything")
    with pytest.raises(ValueError, match="unknown checker"):
        tasks.check({"check": {"type": "vibes"}}, "x")
