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
    assert kinds["rambling", "wrong_answer"] == 0 and kinds["repetition", "wrong_answer"] == 0


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
JSON_ONE = {"family": "format", "check": {"type": "json", "key": "result", "answer": 1}}
WORDS = {"family": "format", "check": {"type": "word_count", "n": 4, "keyword": "23"}}   # a spec without options
# "Using exactly 4 (5) words, say which number is smaller: 12 or 40."
SMALLER4 = {"family": "format", "check": {"type": "word_count", "n": 4, "keyword": "12", "options": [12, 40],
                                          "which": "smaller"}}
SMALLER5 = {"family": "format", "check": {**SMALLER4["check"], "n": 5}}


@pytest.mark.parametrize("meta, output, expected", [
    (NUMBER, "3000", None), (NUMBER, " 3,000. ", None), (NUMBER, "3000 meters", "constraint_broken"),
    (NUMBER, "The answer is 3000.", "constraint_broken"), (NUMBER, "300", "wrong_answer"),
    (NUMBER, "30000", "wrong_answer"), (NUMBER, "3000\n\nQuestion: what is 2+2?", "constraint_broken"),
    (NUMBER, "3000.0", None), (NUMBER, "3000.0 meters", "constraint_broken"), (NUMBER, "-3000", "wrong_answer"),
    # another number that starts with the answer is a wrong answer, not the answer in the wrong form
    (NUMBER, "3000.5 meters", "wrong_answer"), (NUMBER, "-3000 meters", "wrong_answer"),
    (YES, "Yes", None), (YES, "yes.", None), (YES, "No", "wrong_answer"),
    (YES, "Yes, 42 is in the list.", "constraint_broken"), (YES, "No, it is not.", "wrong_answer"),
    (YES, "Sure! The answer is: Yes. Hope this helps!", "constraint_broken"),
    (YES, "The answer is yes or no.", "wrong_answer"), (YES, "I don't know.", "wrong_answer"),
    (UPPER, "GREEN RIVER", None), (UPPER, '"GREEN RIVER"', None), (UPPER, "green river", "wrong_answer"),
    (UPPER, "Green River", "wrong_answer"), (UPPER, "Sure: GREEN RIVER", "constraint_broken"),
    (LOWER, "green river", None), (LOWER, "Green River", "constraint_broken"), (LOWER, "green", "wrong_answer"),
    (REVERSED, "Stone River.", None), (REVERSED, "river stone", "wrong_answer"),
    (REVERSED, "Reversed: stone river", "constraint_broken"),
    (SORTED, "3, 7, 19", None), (SORTED, "3,7,19.", None), (SORTED, "7, 3, 19", "wrong_answer"),
    (SORTED, "3 7 19", "constraint_broken"), (SORTED, "The sorted numbers are 3, 7 and 19.", "constraint_broken"),
    (SORTED, "3, 7, 19, 40", "wrong_answer"),
    (JSON, '{"sum": 23}', None), (JSON, '{"sum": 23.0}', None), (JSON, ' {"sum":23} ', None),
    (JSON, '{"sum": 22}', "wrong_answer"), (JSON, '{"sum": 23.5}', "wrong_answer"),
    (JSON, '{"sum": -23}', "wrong_answer"),
    # a number as a JSON string: the right answer in the wrong form (see tasks._check_json)
    (JSON, '{"sum": "23"}', "constraint_broken"), (JSON, '{"sum": [23]}', "constraint_broken"),
    (JSON, '{"sum": 22, "sum": 23}', "constraint_broken"), (JSON, '[{"sum": 23}]', "constraint_broken"),
    (JSON_ONE, '{"result": 1}', None), (JSON_ONE, '{"result": true}', "wrong_answer"),
    (JSON, '{"total": 23}', "constraint_broken"), (JSON, "The sum is 23.", "constraint_broken"),
    (JSON, '```json\n{"sum": 23}\n```', "constraint_broken"), (JSON, "twenty", "wrong_answer"),
    (WORDS, "The answer is 23.", None), (WORDS, "It is 23.", "constraint_broken"),
    (WORDS, "The answer is 17.", "wrong_answer"),
    # the asked answer, stated: named (digits or words), not denied, the other option only denied or compared
    (SMALLER4, "The answer is 12.", None), (SMALLER4, "Twelve is the smaller.", None),
    (SMALLER4, "It's 12, not 40.", None), (SMALLER4, "Not 40 but 12.", None),
    (SMALLER4, "Not 12 but 40.", "wrong_answer"), (SMALLER4, "It isn't 12, 40.", "wrong_answer"),
    (SMALLER4, "12 or 40, maybe.", "wrong_answer"), (SMALLER4, "40, then 12.", "wrong_answer"),
    (SMALLER4, "The answer is 40.", "wrong_answer"), (SMALLER4, "Forty is not smaller.", "wrong_answer"),
    (SMALLER4, "12 12 12 12", "constraint_broken"), (SMALLER4, "The answer is 12 indeed.", "constraint_broken"),
    (SMALLER4, "The answer is 12.\nQuestion: is 40 larger?", "constraint_broken"),
    (SMALLER5, "12 is smaller than 40.", None), (SMALLER5, "40 is larger than 12.", None),
    (SMALLER5, "12 < 40: so twelve.", None), (SMALLER5, "12 isn't larger than 40.", None),
    (SMALLER5, "40 is smaller than 12.", "wrong_answer"), (SMALLER5, "12 is not smaller than 40.", "wrong_answer"),
    (SMALLER5, "12 is smaller: 12 wins.", "constraint_broken"), (SMALLER5, "Twelve. 12 < 40 indeed.", None),
])
def test_checkers_on_hand_made_answers(meta, output, expected):
    assert tasks.check(meta, output) == expected


def test_check_refuses_records_without_a_checker():
    assert not tasks.has_check({"source": "hub"})
    with pytest.raises(ValueError, match="no checker"):
        tasks.check({"source": "hub"}, "anything")
    with pytest.raises(ValueError, match="unknown checker"):
        tasks.check({"check": {"type": "vibes"}}, "x")


# --------------------------------------------------------------------------- baselines


def _metas(split: str, n_sft: int, n_pref: int, seed: int = 42) -> list[dict]:
    return [r["meta"] for r in tasks.generate_sft(split, n_sft, seed) + tasks.generate_preference(split, n_pref, seed)]


def test_constant_baseline_is_chosen_on_training_and_scored_like_a_model():
    train, test = _metas("train", 800, 400), _metas("test", 96, 96)
    answers = tasks.trivial_baselines(train, test)["constant"]
    assert len(answers) == len(test)
    yes_no = [(m, a) for m, a in zip(test, answers) if m["check"]["type"] == "choice"]
    majority = Counter(m["check"]["answer"] for m in train if m["check"]["type"] == "choice").most_common(1)[0][0]
    assert {a for _, a in yes_no} == {majority.capitalize()}       # one constant: the training majority
    passed = sum(tasks.check(m, a) is None for m, a in yes_no)
    assert 0.25 <= passed / len(yes_no) < 0.75                       # a coin's worth, not knowledge
    numbers = [(m, a) for m, a in zip(test, answers) if m["check"]["type"] == "number"]
    assert len({a for _, a in numbers}) == 1 and sum(tasks.check(m, a) is None for m, a in numbers) < len(numbers) / 4


def test_constant_baseline_uses_only_training_answers_and_knows_nothing_else():
    yes = {"family": "lists", "check": {"type": "choice", "answer": "yes", "options": ["yes", "no"]}}
    no = {"family": "lists", "check": {"type": "choice", "answer": "no", "options": ["yes", "no"]}}
    number = {"family": "units", "check": {"type": "number", "answer": 7}}
    unknowable = {"family": "units", "check": {"type": "number", "answer": 987654}}
    json_total = {"family": "format", "check": {"type": "json", "key": "total", "answer": 5}}
    out = tasks.trivial_baselines([no, no, yes, number, number], [yes, no, unknowable, json_total, {"source": "hub"}])
    assert out["constant"] == ["No", "No", "7", "", None]
    assert tasks.check(unknowable, out["constant"][2]) == "wrong_answer"
    assert tasks.check(yes, out["constant"][0]) == "wrong_answer"   # the test answer does not leak into the choice


def test_reference_answer_passes_its_own_check():
    for meta in _metas("val", 60, 30):
        assert tasks.check(meta, tasks.reference_answer(meta["check"])) is None, meta


@pytest.mark.parametrize("spec, expected", [
    ({"type": "choice", "answer": "no", "options": ["yes", "no"]}, 0.5),
    ({"type": "choice", "answer": "b", "options": ["a", "b", "c"]}, 1 / 3),
    ({"type": "word_count", "n": 4, "keyword": "12", "options": [12, 40], "which": "smaller"}, 0.5),
    ({"type": "word_count", "n": 4, "keyword": "23"}, 0.5),
    ({"type": "number", "answer": 87, "options": [3, 87, 12, 40, 5]}, 0.2),
    ({"type": "number", "answer": 3000}, 0.0), ({"type": "json", "key": "sum", "answer": 3}, 0.0),
    ({"type": "list", "answer": ["3", "7"]}, 0.0), ({"type": "text", "answer": "rbg", "case": "constraint"}, 0.0),
])
def test_random_choice_accuracy(spec, expected):
    assert tasks.random_choice_accuracy({"check": spec}) == pytest.approx(expected)


def test_random_choice_accuracy_of_generated_items_matches_their_options():
    metas = _metas("train", 300, 0)
    largest = next(m for m in metas if m["kind"] in ("largest", "smallest"))
    assert tasks.random_choice_accuracy(largest) == 1 / len(largest["check"]["options"])
    assert largest["check"]["answer"] in largest["check"]["options"]
    compare = next(m for m in metas if m["kind"] == "n_words")
    assert tasks.random_choice_accuracy(compare) == 0.5
    with pytest.raises(ValueError, match="no checker"):
        tasks.random_choice_accuracy({"source": "hub"})
