"""No test question of the generated data is answerable from a training item.

The split is decided in tunepipe.tasks by a question key; this test does not use
that key. It reads every prompt back from its text alone (instruction + input,
and the made-up follow-up questions inside rejected 'no_stop' answers) and
derives what the question is about: its normalized text (names, item nouns,
proposed answers and answer-form sentences removed), the multiset of numbers in
its equation (a + b = c however it is asked: "a and b more", "c give away b", the
JSON sum, a yes/no check of a proposed answer), a unit conversion as an unordered
pair of quantities (so its inverse matches) and as a physical amount, the
multiset of numbers or words a list/text/format task works on, the (word,
start/end) of a letter question, and the pair of numbers compared.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

import pytest

from tunepipe import tasks
from tunepipe.params import Generated, Shared

_FORM = re.compile(r"(answer with only (the number|yes or no)|reply with only [^.]*)\.", re.I)
_PROPOSED = re.compile(r" ?is the answer \d+\?", re.I)
_N_WORDS = re.compile(r"using exactly \d+ words, ", re.I)
_PLACEHOLDERS = re.compile(r"\b(%s)\b" % "|".join(tasks.NAMES + tasks.ITEMS), re.I)
_FOLLOW_UPS = [re.compile(p, re.S) for p in (r"\n\nQuestion: (.*?)\nAnswer: ", r"\nUser: (.*?)\nAssistant: ",
                                             r"### Instruction:\n(.*?)\n\n### Response:", r"\n\nNext question: (.*)$")]


def _unit_amounts() -> dict[str, tuple[str, Fraction]]:
    """unit -> (dimension, size in the dimension's smallest unit), from tasks.UNITS."""
    units = {u for pair in tasks.UNITS for u in pair[:2]}
    size: dict[str, tuple[str, Fraction]] = {}
    while len(size) < len(units):
        grown = False
        for big, small, factor in tasks.UNITS:
            if big in size and small not in size:
                size[small], grown = (size[big][0], size[big][1] / factor), True
            elif small in size and big not in size:
                size[big], grown = (size[small][0], size[small][1] * factor), True
        if not grown:   # a dimension not reached yet
            size[next(u for u in sorted(units) if u not in size)] = (f"dim{len(size)}", Fraction(1))
    smallest = {}
    for unit, (dim, s) in size.items():
        if dim not in smallest or s < size[smallest[dim]][1]:
            smallest[dim] = unit
    return {unit: (smallest[dim], s / size[smallest[dim]][1]) for unit, (dim, s) in size.items()}


UNIT_SIZE = _unit_amounts()
FACTOR = {(big, small): f for big, small, f in tasks.UNITS}


def _eq(op: str, *numbers: int) -> tuple:
    return (op, tuple(sorted(numbers)))


def _arithmetic(core: str) -> set[tuple]:
    m = re.search(r"has (\d+) \w+, buys (\d+) more, then gives (\d+) away", core)
    if m:
        a, b, c = map(int, m.groups())
        return {("two_step", tuple(sorted((a, b))), c)}
    if m := re.search(r"has (\d+) \w+ and gets (\d+) more", core):
        a, b = map(int, m.groups())
        return {_eq("+", a, b, a + b)}
    if m := re.search(r"has (\d+) \w+ and gives (\d+) away", core):
        a, b = map(int, m.groups())
        return {_eq("+", a, b, a - b)}
    if m := re.search(r"buys (\d+) bags with (\d+)", core):
        a, b = map(int, m.groups())
        return {_eq("*", a, b, a * b)}
    if m := re.search(r"shares (\d+) \w+ equally among (\d+) friends", core):
        n, f = map(int, m.groups())
        return {_eq("*", n, f, n // f)}
    if m := re.search(r"give the (sum|product|difference) of (\d+) and (\d+) as json", core):
        op, a, b = m.group(1), int(m.group(2)), int(m.group(3))
        result = {"sum": a + b, "product": a * b, "difference": a - b}[op]
        return {_eq("*" if op == "product" else "+", a, b, result)}
    return set()


def _conversion(core: str) -> set[tuple]:
    m = re.search(r"convert (\d+) (\w+) to (\w+)", core)
    if not m:
        return set()
    value, src, dst = int(m.group(1)), m.group(2), m.group(3)
    answer = value * FACTOR[src, dst] if (src, dst) in FACTOR else Fraction(value, FACTOR[dst, src])
    dim, unit = UNIT_SIZE[src]
    return {("convert", tuple(sorted([(src, value), (dst, int(answer))]))), ("amount", dim, value * unit)}


def _operands(core: str, input_: str) -> set[tuple]:
    if m := re.search(r'does the word "(\w+)" (start|end) with', core):
        return {("letter", m.group(1), m.group(2))}
    if m := re.search(r"which number is (larger|smaller): (\d+) or (\d+)", core):
        return {("compare", tuple(sorted((int(m.group(2)), int(m.group(3))))))}
    if re.search(r"sort these numbers|number in this list|is \d+ in this list", core):
        return {("numbers", tuple(sorted(map(int, re.findall(r"\d+", input_)))))}
    if input_:   # capitals, first letters, reversed words, counting, lowercase, animals
        return {("words", tuple(sorted(re.findall(r"[a-z]+", input_.lower()))))}
    return set()


def facts(instruction: str, input_: str) -> set[tuple]:
    """What a prompt asks, read from its text; fails on a prompt it cannot read."""
    core = _N_WORDS.sub("", _PROPOSED.sub("", _FORM.sub("", instruction))).strip().lower()
    text = " ".join(_PLACEHOLDERS.sub("<x>", f"{core} {input_.lower()}").split())
    found = _arithmetic(core) | _conversion(core) | _operands(core, input_)
    assert found, f"cannot read the question {instruction!r} / {input_!r}"
    return found | {("text", text)}


def _follow_up(rejected: str) -> tuple[str, str]:
    (match,) = [m for p in _FOLLOW_UPS if (m := p.search(rejected))][:1]
    instruction, _, input_ = match.group(1).strip().partition("\n")
    return instruction, input_


def record_facts(record: dict, with_follow_up: bool) -> set[tuple]:
    found = facts(record["instruction"], record["input"])
    if with_follow_up and record.get("meta", {}).get("rejected_kind") == "no_stop":
        found |= facts(*_follow_up(record["rejected"]))
    return found


def default_sets(module=tasks) -> dict[str, list[dict]]:
    """The default run's generated data, SFT and preference records per split."""
    g, seed = Generated(), Shared().seed
    sizes = {"train": (g.n_train, g.n_pref_train), "val": (g.n_val, g.n_pref_val), "test": (g.n_test, g.n_pref_test)}
    return {split: module.generate_sft(split, n_sft, seed) + module.generate_preference(split, n_pref, seed)
            for split, (n_sft, n_pref) in sizes.items()}


def answerable(held_out: list[dict], train: list[dict]) -> list[tuple[dict, set[tuple]]]:
    """(record, facts it shares with training) for every held-out record that shares some."""
    known = set().union(*(record_facts(r, with_follow_up=True) for r in train))
    shared = [(r, record_facts(r, with_follow_up=False) & known) for r in held_out]
    return [(r, s) for r, s in shared if s]


@pytest.fixture(scope="module")
def default_data():
    return default_sets()


def test_default_sizes_are_exact(default_data):
    g = Generated()
    assert [len(default_data[s]) for s in ("train", "val", "test")] == \
        [g.n_train + g.n_pref_train, g.n_val + g.n_pref_val, g.n_test + g.n_pref_test]


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_no_held_out_question_is_answerable_from_training(default_data, held_out):
    leaks = answerable(default_data[held_out], default_data["train"])
    kinds = Counter(fact[0] for _, shared in leaks for fact in shared)
    examples = [(r["instruction"], r["input"], sorted(s)) for r, s in leaks[:3]]
    assert not leaks, f"{len(leaks)} {held_out} items answerable from training, by {dict(kinds)}: {examples}"


def test_test_and_val_do_not_share_questions(default_data):
    assert not answerable(default_data["test"], default_data["val"])


def test_the_reader_sees_the_variants_it_must_catch():
    """The detector itself: a yes/no variant, an inverse conversion, a swapped sum match."""
    number = facts("Convert 49000 meters to kilometers. Answer with only the number.", "")
    yes_no = facts("Convert 49000 meters to kilometers. Is the answer 49? Answer with only yes or no.", "")
    inverse = facts("Convert 49 kilometers to meters. Answer with only the number.", "")
    chained = facts("Convert 4900 centimeters to millimeters. Answer with only the number.", "")
    assert number == yes_no and number & inverse and ("amount", "millimeters", 49000) in chained
    add = facts("Ana has 5 apples and gets 7 more. How many apples does Ana have now? " + tasks.ONLY_NUMBER, "")
    give = facts("Ben has 12 cards and gives 5 away. How many cards are left? " + tasks.ONLY_NUMBER, "")
    as_json = facts('Give the sum of 7 and 5 as JSON with the single key "total". Reply with only the JSON.', "")
    assert add & give and add & as_json
    assert facts("Sort these numbers. Reply with only the numbers.", "9, 3, 5") & \
        facts("Is 4 in this list? " + tasks.ONLY_YES_NO, "5, 9, 3")
    with pytest.raises(AssertionError, match="cannot read"):
        facts("Write a poem.", "")


def test_follow_up_questions_are_read_from_no_stop_answers(default_data):
    no_stop = [r for r in default_data["train"] if r.get("meta", {}).get("rejected_kind") == "no_stop"]
    assert len(no_stop) > 20
    for record in no_stop:
        assert record_facts(record, True) > record_facts(record, False)


def test_follow_up_questions_of_every_split_are_training_questions(default_data):
    """A no_stop answer's made-up next question never shows a held-out question, in any split."""
    held_out = set().union(*(record_facts(r, False) for s in ("val", "test") for r in default_data[s]))
    follow_ups = [facts(*_follow_up(r["rejected"])) for records in default_data.values() for r in records
                  if r.get("meta", {}).get("rejected_kind") == "no_stop"]
    assert len(follow_ups) > 30
    assert not [f for f in follow_ups if f & held_out]
