"""The project's own instruction-following tasks: seeded, offline, automatically checkable.

Five skill families, each with a few kinds of task; every instruction says what
form the answer must take ("Answer with only the number."), and ``check`` holds
an output to it:

    arithmetic  word problems (add, subtract, multiply, divide, two steps)
    text        string transformations (capital letters, first letters, reversed words)
    lists       sort numbers, largest/smallest, count items, pick the animals
    units       unit conversions with exact whole-number answers
    format      reply as JSON with a given key, in exactly N words, in lowercase

    sft = generate_sft("test", 96, seed=42, families=FAMILIES)   # canonical SFT records
    pref = generate_preference("train", 400, seed=42, families=FAMILIES)
    check(sft[0]["meta"], "12")   # None (passes), "wrong_answer" or "constraint_broken"
    trivial_baselines(train_metas, test_metas)["constant"]   # what ignoring the question scores
    random_choice_accuracy(meta)  # chance of passing by picking an offered option at random

Splits are disjoint by question, not just by wording: a hash of a task's
*underlying question* (``Task.question``) puts it in exactly one of
train/val/test, whatever the seed or the sizes asked for, and every phrasing and
inverse of that question lands in the same split:

    a + b = c          "a and gets b more", "c and gives b away" (c - b), the JSON
                       sum or difference, and the yes/no "Is the answer x?" checks
    a * b = c          "a bags of b", "shares c among a friends", the JSON product
    two steps          a + b - c, with a and b in either order
    a quantity         a conversion, its inverse and any chain through other units
                       of the same dimension (5 m -> cm, 500 cm -> m, 500 cm -> mm)
    a word multiset    capitals, first letters, reversed words, counting, "exactly
                       n words?", lowercase and "is it lowercase?", picking animals
    a number multiset  sorting, largest, smallest, "is x in this list?"
    a word's letter    "does w start (end) with x?", whatever x is proposed
    a compared pair    "which is larger / smaller: a or b", in any number of words

So no held-out question is answerable from a training item (SFT or preference),
and the made-up follow-up questions of 'no_stop' answers are always training
questions. Names, item nouns and proposed answers are phrasing only. (First
letters of single words are asked by the word alone: a training "first letters
of a phrase" item containing that word is a different computation and is allowed.)
The seed only decides which tasks of a split are drawn.

Preference pairs pair the correct answer with a realistic failure
(``meta["rejected_kind"]``): wrong_answer, ignored_constraint, rambling (the right
answer buried in chatter), repetition, no_stop (the answer followed by a run-on,
made-up next question). Every rejected answer fails ``check``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

FAMILIES = ("arithmetic", "text", "lists", "units", "format")
SPLITS = ("train", "val", "test")
REJECTED_KINDS = ("wrong_answer", "ignored_constraint", "rambling", "repetition", "no_stop")

# Shares of the parameter space per split (hash buckets out of 100).
_SPLIT_BUCKETS = {"train": range(0, 80), "val": range(80, 88), "test": range(88, 100)}

ONLY_NUMBER = "Answer with only the number."
ONLY_YES_NO = "Answer with only yes or no."
# A share of each family are yes/no checks: a small base model often gets these
# right, so the base is not at zero and a fine-tune's gain is measured, not assumed.
YES_NO_SHARE = 0.4

NAMES = ["Ana", "Ben", "Carla", "Dev", "Emma", "Felix", "Grace", "Hugo", "Ines", "Jack",
         "Kai", "Lena", "Max", "Nora", "Omar", "Priya", "Sam", "Tara", "Umar", "Vera"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "stamps", "shells",
         "cards", "balloons", "coins", "buttons"]
WORDS = ["red", "blue", "green", "small", "big", "old", "new", "happy", "quiet", "bright",
         "dark", "cold", "warm", "river", "stone", "garden", "window", "candle", "forest", "ocean",
         "mountain", "pencil", "paper", "silver", "golden", "morning", "winter", "summer", "yellow",
         "purple", "little", "gentle", "brave", "clever", "bread", "cloud", "dream", "flower",
         "honey", "island", "kettle", "lemon", "mirror", "night", "rocket", "sugar", "tower",
         "violin", "wagon", "basket", "castle", "desert", "feather", "guitar", "ladder", "planet",
         "shadow", "ticket", "velvet", "market"]
ANIMALS = ["cat", "dog", "horse", "tiger", "rabbit", "eagle", "mouse", "sheep", "whale",
           "snake", "zebra", "otter", "camel", "duck", "goat", "wolf"]
# (larger unit, smaller unit, smaller units per larger unit)
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100),
         ("centimeters", "millimeters", 10), ("kilograms", "grams", 1000),
         ("liters", "milliliters", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
         ("days", "hours", 24), ("weeks", "days", 7), ("years", "months", 12),
         ("feet", "inches", 12), ("yards", "feet", 3), ("gallons", "quarts", 4),
         ("dollars", "cents", 100), ("decades", "years", 10), ("centuries", "years", 100),
         ("tons", "kilograms", 1000), ("pounds", "ounces", 16), ("meters", "millimeters", 1000)]

_OPENERS = ["Sure! Let's work through this step by step.", "Great question! Let me explain.",
            "Of course! This is a classic kind of problem, so let's think about it carefully.",
            "Certainly. Before answering, it helps to restate what is being asked."]
_CLOSERS = ["I hope this helps! Let me know if you have any other questions.",
            "Feel free to ask if anything is unclear.",
            "This kind of exercise is a great way to practice. Happy learning!", ""]
_CONTINUATIONS = ["\n\nQuestion: {q}\nAnswer: {a}", "\n\n### Instruction:\n{q}\n\n### Response:\n{a}",
                  "\nUser: {q}\nAssistant: {a}", "\n\nNext question: {q}"]


@dataclass(frozen=True)
class Task:
    family: str
    kind: str
    params: tuple            # every parameter of this item: its identity (no two records share it)
    instruction: str
    input: str
    output: str              # the correct answer, in the required form
    check: dict              # checker spec, see ``check``
    wrong: str               # a plausible wrong answer in the required form
    loose: str               # the right answer with the required form ignored
    question: tuple          # the underlying question, shared by its phrasings and inverses: its hash picks the split

    @property
    def key(self) -> str:
        return json.dumps([self.family, self.kind, *self.params])


# --------------------------------------------------------------------------- underlying questions


def _sum_q(x: int, y: int) -> tuple:
    """x + y: also "x + y - y", "(x + y) - x" and the JSON sum or difference."""
    return ("sum", *sorted((x, y)))


def _product_q(x: int, y: int) -> tuple:
    """x * y: also the division of x * y by either factor."""
    return ("product", *sorted((x, y)))


def _words_q(words) -> tuple:
    """Any transformation or count of these words, in any order and case."""
    return ("words", *sorted(w.lower() for w in words))


def _numbers_q(nums) -> tuple:
    """Any question about this multiset of numbers (sort, largest, membership...)."""
    return ("numbers", *sorted(nums))


def _unit_sizes() -> dict[str, tuple[str, int]]:
    """unit -> (dimension, size in the dimension's smallest unit), by walking UNITS' factors."""
    size: dict[str, tuple[str, Fraction]] = {}
    units = sorted({u for pair in UNITS for u in pair[:2]})
    while len(size) < len(units):
        grown = False
        for big, small, factor in UNITS:
            if big in size and small not in size:
                size[small], grown = (size[big][0], size[big][1] / factor), True
            elif small in size and big not in size:
                size[big], grown = (size[small][0], size[small][1] * factor), True
        if not grown:   # a dimension no known unit reaches: start it at its first unit
            first = next(u for u in units if u not in size)
            size[first] = (first, Fraction(1))
    smallest = {dim: min(s for d, s in size.values() if d == dim) for dim, _ in size.values()}
    names = {dim: next(u for u, (d, s) in size.items() if d == dim and s == smallest[dim]) for dim in smallest}
    return {u: (names[dim], int(s / smallest[dim])) for u, (dim, s) in size.items()}


_UNIT_SIZE = _unit_sizes()


def _quantity_q(unit: str, value: int) -> tuple:
    """A physical amount: every conversion of it (and its inverse, and chains) asks the same."""
    dim, size = _UNIT_SIZE[unit]
    return ("quantity", dim, value * size)


# --------------------------------------------------------------------------- families


def _distinct_wrong(rng: random.Random, answer: int, candidates: list[int]) -> int:
    """First candidate that is a different non-negative number (a realistic slip)."""
    for c in candidates:
        if c != answer and c >= 0:
            return c
    return answer + rng.choice([1, 2, 10])


def _number_task(family, kind, params, question, instruction, answer, wrong, loose, input_="",
                 options=None) -> Task:
    check = {"type": "number", "answer": answer}
    if options:   # the answer is one of these (largest / smallest): a k-way choice, see random_choice_accuracy
        check["options"] = list(options)
    return Task(family, kind, params, f"{instruction} {ONLY_NUMBER}", input_, str(answer),
                check, str(wrong), loose, question)


def _yes_no(family, params, question, prompt, truth: bool, reason: str, input_="") -> Task:
    ans, other = ("Yes", "No") if truth else ("No", "Yes")
    return Task(family, "yes_no", params, f"{prompt} {ONLY_YES_NO}", input_, ans,
                {"type": "choice", "answer": ans.lower(), "options": ["yes", "no"]}, other,
                f"{ans}, {reason}.", question)


def _number_yes_no(task: Task, rng: random.Random) -> Task:
    """Ask whether a proposed answer to a number task is right (half the time it is).

    Same question as the number task: knowing one answers the other.
    """
    truth = rng.random() < 0.5
    proposed = task.output if truth else task.wrong
    prompt = task.instruction.replace(ONLY_NUMBER, f"Is the answer {proposed}?")
    return _yes_no(task.family, task.params + (proposed,), task.question, prompt, truth,
                   f"the answer is {task.output}", task.input)


def arithmetic(rng: random.Random) -> Task:
    if rng.random() < YES_NO_SHARE:
        return _number_yes_no(_arithmetic(rng), rng)
    return _arithmetic(rng)


def _arithmetic(rng: random.Random) -> Task:
    kind = rng.choice(["add", "subtract", "multiply", "divide", "two_step"])
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == "add":
        a, b = nums = rng.randint(3, 60), rng.randint(2, 40)
        question = f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?"
        ans, slips, q = a + b, [a - b, a + b + 1, a + b - 10], _sum_q(a, b)
    elif kind == "subtract":
        b = rng.randint(2, 40)
        a, b = nums = b + rng.randint(1, 40), b
        question = f"{name} has {a} {items} and gives {b} away. How many {items} are left?"
        ans, slips, q = a - b, [a + b, a - b - 1, a - b + 10], _sum_q(b, a - b)
    elif kind == "multiply":
        a, b = nums = rng.randint(2, 9), rng.randint(2, 12)
        question = f"{name} buys {a} bags with {b} {items} in each bag. How many {items} is that in total?"
        ans, slips, q = a * b, [a + b, a * b + b, a * b - a], _product_q(a, b)
    elif kind == "divide":
        friends, each = rng.randint(2, 9), rng.randint(2, 12)
        nums = (friends * each, friends)
        question = (f"{name} shares {friends * each} {items} equally among {friends} friends. "
                    f"How many {items} does each friend get?")
        ans, slips, q = each, [friends * each - friends, each + 1, friends], _product_q(friends, each)
    else:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        nums = (a, b, c)
        question = f"{name} has {a} {items}, buys {b} more, then gives {c} away. How many {items} are left?"
        ans, slips, q = a + b - c, [a + b, a + b + c, a - c], ("two_step", *sorted((a, b)), c)
    loose = rng.choice([f"{name} has {ans} {items}.", f"The answer is {ans}.", f"{ans} {items}"])
    return _number_task("arithmetic", kind, (name, items, *nums), q, question, ans,
                        _distinct_wrong(rng, ans, slips), loose)


def units(rng: random.Random) -> Task:
    if rng.random() < YES_NO_SHARE:
        return _number_yes_no(_units(rng), rng)
    return _units(rng)


def _units(rng: random.Random) -> Task:
    big, small, factor = rng.choice(UNITS)
    kind = rng.choice(["down", "up"])
    k = rng.randint(2, 60)
    if kind == "down":
        src, dst, value, ans = big, small, k, k * factor
        slips = [k * factor * 10, k * factor // 10 if factor >= 100 else k + factor, k * factor + factor]
    else:
        src, dst, value, ans = small, big, k * factor, k
        slips = [k * 10, k * factor * factor, k + 1]
    return _number_task("units", kind, (src, dst, value), _quantity_q(src, value), f"Convert {value} {src} to {dst}.",
                        ans, _distinct_wrong(rng, ans, slips),
                        rng.choice([f"{ans} {dst}", f"{value} {src} is {ans} {dst}.", f"That is {ans} {dst}."]))


def _phrase(rng: random.Random, lo: int = 2, hi: int = 4) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def text(rng: random.Random) -> Task:
    if rng.random() < YES_NO_SHARE:
        return _text_yes_no(rng)
    kind = rng.choice(["uppercase", "initials", "reverse_words"])
    words = _phrase(rng, 3 if kind != "uppercase" else 2, 4)
    phrase, q = " ".join(words), _words_q(words)
    if kind == "uppercase":
        ans = phrase.upper()
        return Task("text", kind, tuple(words), "Rewrite the phrase below in capital letters. "
                    "Reply with only the rewritten phrase.", phrase, ans,
                    {"type": "text", "answer": ans, "case": "answer"}, phrase.title(),
                    f'The phrase in capital letters is "{ans}".', q)
    if kind == "initials":
        ans = "".join(w[0] for w in words)
        wrong = ans[::-1] if ans[::-1] != ans else ans[:-1]
        return Task("text", kind, tuple(words), "Write the first letter of each word below as one "
                    "lowercase word. Reply with only the letters.", phrase, ans,
                    {"type": "text", "answer": ans, "case": "constraint"}, wrong,
                    rng.choice([ans.upper(), f"The first letters are {ans}."]), q)
    ans = " ".join(reversed(words))
    wrong = " ".join(words[1:] + words[:1])
    return Task("text", kind, tuple(words), "Write the words below in reverse order. "
                "Reply with only the words.", phrase, ans,
                {"type": "text", "answer": ans, "case": "ignore"}, wrong, f"Reversed, it reads: {ans}.", q)


def _text_yes_no(rng: random.Random) -> Task:
    truth = rng.random() < 0.5
    variant = rng.choice(["starts", "ends", "words"])
    if variant == "words":
        words = _phrase(rng, 2, 5)
        n = len(words) if truth else len(words) + rng.choice([-1, 1] if len(words) > 2 else [1])
        return _yes_no("text", (variant, *words, n), _words_q(words),
                       f"Does the phrase below have exactly {n} words?", truth,
                       f"it has {len(words)} words", " ".join(words))
    word = rng.choice(WORDS)
    actual = word[0] if variant == "starts" else word[-1]
    letter = actual if truth else rng.choice([c for c in "abcdefghilmnoprstuw" if c != actual])
    verb = "start" if variant == "starts" else "end"
    return _yes_no("text", (variant, word, letter), ("letter", variant, word),
                   f'Does the word "{word}" {verb} with the letter "{letter}"?',
                   truth, f'"{word}" {verb}s with "{actual}"')


def lists(rng: random.Random) -> Task:
    if rng.random() < YES_NO_SHARE:
        nums = rng.sample(range(1, 100), rng.randint(4, 6))
        truth = rng.random() < 0.5
        x = rng.choice(nums) if truth else rng.choice([v for v in range(1, 100) if v not in nums])
        return _yes_no("lists", (*nums, x), _numbers_q(nums), f"Is {x} in this list?", truth,
                       f"{x} is {'' if truth else 'not '}in the list", ", ".join(map(str, nums)))
    kind = rng.choice(["sort", "largest", "smallest", "count", "animals"])
    if kind in ("sort", "largest", "smallest"):
        nums = rng.sample(range(1, 100), rng.randint(3, 4) if kind == "sort" else rng.randint(4, 6))
        shown = ", ".join(map(str, nums))
        if kind == "sort":
            ans = sorted(nums)
            i = rng.randrange(len(ans) - 1)
            wrong = ans[:i] + [ans[i + 1], ans[i]] + ans[i + 2:]
            return _list_task("sort", tuple(nums), _numbers_q(nums), "Sort these numbers from smallest to largest. "
                              "Reply with only the numbers, separated by commas.", shown, ans, wrong,
                              rng.choice(["The sorted numbers are {}.", "{}"]), " ")
        pick = max if kind == "largest" else min
        ans = pick(nums)
        wrong = _distinct_wrong(rng, ans, [nums[0], sorted(nums)[1 if kind == "smallest" else -2]])
        return _number_task("lists", kind, tuple(nums), _numbers_q(nums), f"What is the {kind} number in this list?",
                            ans, wrong, f"The {kind} number is {ans}.", shown, options=nums)
    if kind == "count":
        words = rng.sample(WORDS, rng.randint(3, 8))
        ans = len(words)
        return _number_task("lists", kind, tuple(words), _words_q(words), "How many items are in this list?", ans,
                            ans + rng.choice([-1, 1]), f"There are {ans} items in the list.", ", ".join(words))
    animals = rng.sample(ANIMALS, rng.randint(1, 3))
    mixed = animals + rng.sample(WORDS, rng.randint(2, 4))
    rng.shuffle(mixed)
    ans = [w for w in mixed if w in animals]
    others = [w for w in mixed if w not in animals]
    wrong = ans[:-1] + [others[0]] if len(ans) > 1 else [others[0]]
    return _list_task("animals", tuple(mixed), _words_q(mixed), "Which of these words are animals? Reply with only "
                      "those words, separated by commas, in the order given.", ", ".join(mixed), ans, wrong,
                      "The animals in the list are {}.", " and ")


def _list_task(kind, params, question, instruction, shown, ans, wrong, loose_fmt, loose_sep) -> Task:
    items = [str(x) for x in ans]
    return Task("lists", kind, params, instruction, shown, ", ".join(items),
                {"type": "list", "answer": items}, ", ".join(map(str, wrong)),
                loose_fmt.format(loose_sep.join(items)), question)


_N_WORDS = {2: "Answer: {}.", 3: "It is {}.", 4: "The answer is {}.", 5: "The answer is clearly {}.",
            6: "I think the answer is {}."}


def format_(rng: random.Random) -> Task:
    if rng.random() < YES_NO_SHARE:
        words = _phrase(rng, 2, 4)
        truth = rng.random() < 0.5
        i = rng.randrange(len(words))
        shown = " ".join(words) if truth else " ".join(w.capitalize() if j == i else w for j, w in enumerate(words))
        return _yes_no("format", (shown,), _words_q(words), "Is the text below written in all lowercase letters?",
                       truth, "it has no capital letters" if truth else "it has a capital letter", shown)
    kind = rng.choice(["json", "n_words", "lowercase"])
    if kind == "json":
        op, key = rng.choice([("sum", "sum"), ("product", "product"), ("sum", "total"), ("difference", "result")])
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if op == "difference":
            a, b = max(a, b), min(a, b)
        ans = {"sum": a + b, "product": a * b, "difference": a - b}[op]
        # the same arithmetic as the word problems: a JSON sum is an "add", a difference a "subtract"
        q = {"sum": _sum_q(a, b), "product": _product_q(a, b), "difference": _sum_q(b, a - b)}[op]
        return Task("format", kind, (op, key, a, b), f"Give the {op} of {a} and {b} as JSON with the single "
                    f'key "{key}". Reply with only the JSON.', "", json.dumps({key: ans}),
                    {"type": "json", "key": key, "answer": ans}, json.dumps({key: ans + rng.choice([-1, 1, 10])}),
                    rng.choice([f"The {op} is {ans}.", json.dumps({"answer": ans}), f"{key}: {ans}"]), q)
    if kind == "n_words":
        n = rng.randint(2, 6)
        a, b = rng.sample(range(3, 100), 2)   # not 2: "of the two numbers" would name an option
        which = rng.choice(["larger", "smaller"])
        ans = max(a, b) if which == "larger" else min(a, b)
        other = a + b - ans
        return Task("format", kind, (n, which, a, b), f"Using exactly {n} words, say which number is "
                    f"{which}: {a} or {b}.", "", _N_WORDS[n].format(ans),
                    {"type": "word_count", "n": n, "keyword": str(ans), "options": [a, b], "which": which},
                    _N_WORDS[n].format(other), f"The {which} of the two numbers is {ans}.",
                    ("compare", *sorted((a, b))))
    words = _phrase(rng, 2, 4)
    shown = " ".join(w.upper() if rng.random() < 0.3 else w.capitalize() for w in words)
    ans = " ".join(words)
    return Task("format", kind, (shown,), "Rewrite the text below in all lowercase letters. "
                "Reply with only the rewritten text.", shown, ans,
                {"type": "text", "answer": ans, "case": "constraint"}, " ".join(words[:-1]), shown, _words_q(words))


_MAKERS: dict[str, Callable[[random.Random], Task]] = {
    "arithmetic": arithmetic, "text": text, "lists": lists, "units": units, "format": format_}


# --------------------------------------------------------------------------- records


def split_of(task: Task) -> str:
    """The split a task belongs to, from a stable hash of its underlying question.

    Hashing the question (not the wording) keeps every phrasing and inverse of
    one question in one split; see the module docstring for what is one question.
    """
    bucket = int(hashlib.sha256(json.dumps(task.question).encode()).hexdigest()[:8], 16) % 100
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def draw_tasks(split: str, n: int, seed: int, families, stream: str) -> list[tuple[Task, random.Random]]:
    """``n`` distinct tasks of ``split``, families in turn; each with the rng that drew it."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    unknown = sorted(set(families) - set(_MAKERS))
    if unknown or not families:
        raise ValueError(f"unknown task families {unknown}; expected some of {list(FAMILIES)}")
    rng = random.Random(f"tunepipe/{stream}/{split}/{seed}")
    seen: set[str] = set()
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct {split} tasks from families {list(families)}")
        task = _MAKERS[families[len(out) % len(families)]](rng)
        if task.key in seen or split_of(task) != split:
            continue
        seen.add(task.key)
        out.append((task, rng))
    return out


def _record_id(stream: str, task: Task) -> str:
    return f"{stream}-{task.family}-{hashlib.sha256(task.key.encode()).hexdigest()[:12]}"


def _meta(task: Task) -> dict:
    return {"family": task.family, "kind": task.kind, "check": task.check}


def generate_sft(split: str, n: int, seed: int, families=FAMILIES) -> list[dict]:
    """Canonical SFT records for one split."""
    return [{"id": _record_id("sft", t), "instruction": t.instruction, "input": t.input, "output": t.output,
             "system": None, "history": [], "meta": _meta(t)}
            for t, _ in draw_tasks(split, n, seed, list(families), "sft")]


def generate_preference(split: str, n: int, seed: int, families=FAMILIES) -> list[dict]:
    """Canonical preference records for one split; rejected answers are realistic failures."""
    records = []
    for task, rng in draw_tasks(split, n, seed, list(families), "pref"):
        kind = rng.choice(REJECTED_KINDS)
        records.append({"id": _record_id("pref", task), "instruction": task.instruction, "input": task.input,
                        "chosen": task.output, "rejected": rejected_answer(task, kind, rng),
                        "system": None, "history": [], "meta": {**_meta(task), "rejected_kind": kind}})
    return records


def rejected_answer(task: Task, kind: str, rng: random.Random) -> str:
    """A failing answer of the given kind for ``task``."""
    if kind == "wrong_answer":
        return task.wrong
    if kind == "ignored_constraint":
        return task.loose
    if kind == "rambling":
        body = rng.choice(["The answer is: {}.", "So, putting it all together: {}.", "{}"]).format(task.output)
        return " ".join(filter(None, [rng.choice(_OPENERS), body, rng.choice(_CLOSERS)]))
    if kind == "repetition":
        unit = rng.choice([task.output, task.loose])
        return rng.choice([" ", "\n"]).join([unit] * rng.randint(3, 6))
    if kind == "no_stop":
        nxt = _training_task(task.family, rng)
        question = f"{nxt.instruction}\n{nxt.input}".strip()
        return task.output + rng.choice(_CONTINUATIONS).format(q=question, a=nxt.output)
    raise ValueError(f"unknown rejected kind {kind!r}; expected one of {REJECTED_KINDS}")


def _training_task(family: str, rng: random.Random) -> Task:
    """A task of the training split: a run-on answer in any split must not show a
    held-out question (or its answer) inside training data, nor a test question anywhere."""
    for _ in range(1000):   # 80% of questions are training ones: this ends at once
        task = _MAKERS[family](rng)
        if split_of(task) == "train":
            return task
    raise RuntimeError(f"no training question drawn for family {family!r}")


# --------------------------------------------------------------------------- checking


def has_check(meta: Optional[dict]) -> bool:
    return bool(meta) and isinstance(meta.get("check"), dict)


def check(meta: dict, output: str) -> Optional[str]:
    """None if ``output`` passes the record's checker, else "wrong_answer" or "constraint_broken".

    wrong_answer: the right answer is nowhere in the output (or, for a choice of
    numbers in n words, it is not plainly stated: "Not 12 but 40"). constraint_broken:
    it is there, but not in the form the instruction asked for (extra words, wrong
    case, not JSON, a number as a JSON string, wrong number of words, a run-on
    continuation...). Numbers compare as numbers: 12, 12.0 and 3,000 are 12, 12 and 3000.
    """
    if not has_check(meta):
        raise ValueError("record has no checker (meta['check']); only generated tasks can be checked")
    spec = meta["check"]
    kind = spec.get("type")
    if kind not in _CHECKERS:
        raise ValueError(f"unknown checker type {kind!r}; expected one of {sorted(_CHECKERS)}")
    return _CHECKERS[kind](spec, output)


def normalize(text: str) -> str:
    """Collapse whitespace, drop surrounding quotes and one trailing period."""
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text


def _plain_numbers(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)   # 3,000 -> 3000


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")   # a whole number token: not the 3000 in "3000.5" or "x3000"


def _numbers(text: str) -> list[float]:
    return [float(n) for n in _NUMBER.findall(_plain_numbers(text))]


def _has_number(text: str, answer) -> bool:
    """``answer`` is mentioned as a number ("3000 m", "3,000.0"), not as part of another ("-3000", "3000.5")."""
    return float(answer) in _numbers(text)


def _check_number(spec: dict, output: str) -> Optional[str]:
    norm = _plain_numbers(normalize(output))
    if re.fullmatch(r"-?\d+(\.\d+)?", norm):
        return None if float(norm) == float(spec["answer"]) else "wrong_answer"
    return "constraint_broken" if _has_number(output, spec["answer"]) else "wrong_answer"


def _contains(text: str, phrase: str, flags=0) -> bool:
    pattern = r"\s+".join(map(re.escape, phrase.split()))
    return re.search(rf"(?<!\w){pattern}(?!\w)", text, flags) is not None


def _check_text(spec: dict, output: str) -> Optional[str]:
    """case: "answer" (case is the task), "constraint" (case was asked for) or "ignore"."""
    norm, ans, case = normalize(output), spec["answer"], spec.get("case", "ignore")
    if norm == ans or (case == "ignore" and norm.lower() == ans.lower()):
        return None
    if case == "answer":
        return "constraint_broken" if _contains(output, ans) else "wrong_answer"
    return "constraint_broken" if _contains(output, ans, re.IGNORECASE) else "wrong_answer"


def _check_list(spec: dict, output: str) -> Optional[str]:
    ans = [a.lower() for a in spec["answer"]]
    items = [i.strip().lower() for i in normalize(output).split(",")]
    if items == ans:
        return None
    sep = r"(?:\s*[,;]\s*(?:and\s+)?|\s+and\s+|\s+)"
    pattern = sep.join(re.escape(a) for a in ans)
    found = re.search(rf"(?<!\w)(?<!\w,)(?<!\w, ){pattern}(?!\w)(?!\s*,\s*\w)", output, re.IGNORECASE)
    return "constraint_broken" if found else "wrong_answer"


def _check_choice(spec: dict, output: str) -> Optional[str]:
    """One of ``options``. The right option in a longer reply breaks the constraint when
    the reply starts with it, or its first line names it and no other option ("Sure!
    The answer is: Yes. Hope this helps!" is chatter around a right answer)."""
    norm = normalize(output).lower()
    if norm == spec["answer"]:
        return None
    words = re.findall(r"[\w']+", norm)
    if words and words[0] == spec["answer"]:
        return "constraint_broken"
    named = set(re.findall(r"[\w']+", output.strip().split("\n", 1)[0].lower())) & set(spec["options"])
    return "constraint_broken" if named == {spec["answer"]} else "wrong_answer"


class _Pairs(list):
    """A JSON object as its (key, value) pairs, so a repeated key is seen, not silently overwritten."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)   # true is not 1


def _check_json(spec: dict, output: str) -> Optional[str]:
    """A JSON object with exactly the asked key once, holding the answer as a JSON number.

    12 and 12.0 are the same number and pass. "12" (a string) is the right answer in
    the wrong form (constraint_broken): the instruction asks for JSON, and JSON that
    carries a number as text breaks whoever reads it as a number, like "12 apples"
    for a number task. Duplicate keys ({"sum": 11, "sum": 12}) are a hedge, not an answer.
    """
    try:
        obj = json.loads(output.strip(), object_pairs_hook=_Pairs)
    except ValueError:
        obj = None
    if isinstance(obj, _Pairs) and [k for k, _ in obj] == [spec["key"]] and _is_number(obj[0][1]):
        return None if obj[0][1] == spec["answer"] else "wrong_answer"
    return "constraint_broken" if _has_number(output, spec["answer"]) else "wrong_answer"


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SPELLED = {**{w: i for i, w in enumerate(_ONES)},
            **{_TENS[t] + (f"-{_ONES[u]}" if u else ""): 10 * t + u for t in range(2, 10) for u in range(10)}}
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[a-z]+(?:['-][a-z]+)*|[<>]")
_BIGGER = {"larger", "bigger", "greater", "higher", "more"}
_SMALLER = {"smaller", "less", "lower", "lesser", "fewer"}


def _value(token: str) -> Optional[float]:
    """A token's number: digits or a spelled-out number below 100 ("forty-two")."""
    if token[0].isdigit():
        return float(token)
    return float(_SPELLED[token]) if token in _SPELLED else None


def _denies(token: str) -> bool:
    return token in ("not", "never") or token.endswith("n't")


def _denied(tokens: list[str], n: int) -> bool:
    """The number at ``n`` is denied: "not 12", "isn't the 12", "never the number 12"."""
    j = n - 1
    while j >= 0 and tokens[j] in ("the", "a", "number"):
        j -= 1
    return j >= 0 and _denies(tokens[j])


def _comparisons(tokens: list[str], values: list[Optional[float]]) -> list[tuple[tuple[int, ...], bool]]:
    """(positions of the two numbers, truth) of each "X is [not] larger/smaller than Y", "X > Y", "X < Y"."""
    found = []
    for i, tok in enumerate(tokens):
        if tok in ("<", ">"):
            bigger, start = tok == ">", i
        elif tok == "than" and i >= 1 and tokens[i - 1] in _BIGGER | _SMALLER:
            bigger, start = tokens[i - 1] in _BIGGER, i - 1
        else:
            continue
        x = next((n for n in range(start - 1, -1, -1) if values[n] is not None), None)
        y = next((n for n in range(i + 1, len(tokens)) if values[n] is not None), None)
        if x is None or y is None:
            found.append(((), False))   # a comparison with a side missing states nothing
            continue
        negated = any(_denies(t) or t == "no" for t in tokens[x + 1:start])   # "is not / no larger than"
        found.append(((x, y), ((values[x] > values[y]) == bigger) != negated))
    return found


def _states(spec: dict, text: str) -> tuple[bool, int]:
    """(does ``text`` say the asked number is the answer, how often it names it outside comparisons).

    Says it: names it (or a true comparison implies it), does not deny it ("Not 12
    but 40"), asserts no other option outside a denial or comparison ("12 or 40",
    "40, 12") and makes no false comparison.
    """
    tokens = _TOKEN.findall(_plain_numbers(text).lower())
    values = [_value(t) for t in tokens]
    answer = float(spec["keyword"])
    others = {float(o) for o in spec.get("options", [])} - {answer}
    comps = _comparisons(tokens, values)
    compared = {n for where, _ in comps for n in where}
    named = [n for n, v in enumerate(values) if v == answer]
    asserted = {values[n] for n in range(len(tokens))
                if values[n] is not None and n not in compared and not _denied(tokens, n)}
    says = (all(truth for _, truth in comps) and bool(named) and not any(_denied(tokens, n) for n in named)
            and not asserted & others)
    return says, len([n for n in named if n not in compared])


def _check_word_count(spec: dict, output: str) -> Optional[str]:
    """The asked number, stated plainly and at most once beside comparisons (see ``_states``), in n words.

    Whether the answer is right is judged on the first line (run-on text after a
    right answer is a broken form, not a wrong answer); passing needs the whole
    reply to state it, name it once ("40 40 40 40" is padding) and have n words.
    """
    if not _states(spec, output.strip().split("\n", 1)[0])[0]:
        return "wrong_answer"
    words = [w for w in (w.strip(".,;:!?\"'()*-\u2013\u2014") for w in output.split()) if w]
    says, times = _states(spec, output)
    return None if says and times <= 1 and len(words) == spec["n"] else "constraint_broken"


_CHECKERS: dict[str, Callable[[dict, str], Optional[str]]] = {
    "number": _check_number, "choice": _check_choice, "text": _check_text, "list": _check_list, "json": _check_json,
    "word_count": _check_word_count}


# --------------------------------------------------------------------------- baselines


def answer_type(meta: dict) -> str:
    """The form an answer must take, which a content-blind baseline may know: "choice:yes/no",
    "number", "text", "list", "json:<key>", "word_count:<n>"."""
    spec = meta["check"]
    kind = spec["type"]
    if kind == "choice":
        return f"choice:{'/'.join(spec['options'])}"
    if kind == "json":
        return f"json:{spec['key']}"
    if kind == "word_count":
        return f"word_count:{spec['n']}"
    return kind


def reference_answer(spec: dict) -> str:
    """The canonical passing answer for a checker spec (what the generator writes)."""
    kind = spec["type"]
    if kind == "choice":
        return spec["answer"].capitalize()
    if kind == "list":
        return ", ".join(spec["answer"])
    if kind == "json":
        return json.dumps({spec["key"]: spec["answer"]})
    if kind == "word_count":
        n = spec["n"]
        return _N_WORDS[n].format(spec["keyword"]) if n in _N_WORDS else " ".join(["so"] * (n - 1) + [spec["keyword"]])
    return str(spec["answer"])


def trivial_baselines(train_metas: list[dict], test_metas: list[dict]) -> dict[str, list[Optional[str]]]:
    """What a model that ignores the question would score: per baseline, one answer per test item.

    "constant": for each answer type (``answer_type``: yes/no, number, text, list,
    JSON with its key, n words), the single answer that passes the most TRAINING
    items of that type (e.g. "No" if most training yes/no answers are no, the most
    common training number), given to every test item of that type. Candidates are
    the options of choice types and the training items' own answers (their 50 most
    common). A test item of a type with no training item gets "" (it passes nothing).
    Items without a checker (Hub data) get None: there is nothing to score.

    Score the answers with ``check(meta, answer)``, exactly like a model's outputs.
    A model that does not beat these has learned the answer distribution, not the task.
    """
    by_type: dict[str, list[dict]] = {}
    for meta in train_metas:
        if has_check(meta):
            by_type.setdefault(answer_type(meta), []).append(meta)
    best = {t: _best_constant(metas) for t, metas in by_type.items()}
    constant = [None if not has_check(m) else best.get(answer_type(m), "") for m in test_metas]
    return {"constant": constant}


def _best_constant(metas: list[dict]) -> str:
    """The candidate answer that passes the most of ``metas``; ties go to the earliest candidate."""
    counts = Counter(reference_answer(m["check"]) for m in metas)
    candidates = [o.capitalize() for o in metas[0]["check"].get("options", [])] \
        if metas[0]["check"]["type"] == "choice" else []
    candidates += sorted(counts, key=lambda a: (-counts[a], a))[:50]
    scores = [sum(check(m, c) is None for m in metas) for c in candidates]
    return candidates[scores.index(max(scores))]


def random_choice_accuracy(meta: dict) -> float:
    """Chance that a uniformly random pick among the item's offered options passes.

    1/k for a k-way choice: yes/no (0.5), "which is larger: a or b" (0.5), "the
    largest number in this list" (1/list length); 0.0 for open answers (numbers to
    compute, text, lists, JSON), where guessing has no set of options to pick from.
    """
    if not has_check(meta):
        raise ValueError("record has no checker (meta['check']); only generated tasks have options")
    spec = meta["check"]
    if spec.get("options"):
        return 1.0 / len(spec["options"])
    return 0.5 if spec["type"] == "word_count" else 0.0   # older word_count specs lack options: always two numbers
