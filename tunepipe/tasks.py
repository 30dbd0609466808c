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

Splits are disjoint by construction: every task is identified by its underlying
parameters (family, kind, numbers, words), and a hash of those parameters puts it
in exactly one of train/val/test, whatever the seed or the sizes asked for. The
seed only decides which tasks of a split are drawn.

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
from dataclasses import dataclass
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
    params: tuple            # the underlying parameters: their hash picks the split
    instruction: str
    input: str
    output: str              # the correct answer, in the required form
    check: dict              # checker spec, see ``check``
    wrong: str               # a plausible wrong answer in the required form
    loose: str               # the right answer with the required form ignored

    @property
    def key(self) -> str:
        return json.dumps([self.family, self.kind, *self.params])


# --------------------------------------------------------------------------- families


def _distinct_wrong(rng: random.Random, answer: int, candidates: list[int]) -> int:
    """First candidate that is a different non-negative number (a realistic slip)."""
    for c in candidates:
        if c != answer and c >= 0:
            return c
    return answer + rng.choice([1, 2, 10])


def _number_task(family, kind, params, instruction, answer, wrong, loose, input_="") -> Task:
    return Task(family, kind, params, f"{instruction} {ONLY_NUMBER}", input_, str(answer),
                {"type": "number", "answer": answer}, str(wrong), loose)


def _yes_no(family, params, question, truth: bool, reason: str, input_="") -> Task:
    ans, other = ("Yes", "No") if truth else ("No", "Yes")
    return Task(family, "yes_no", params, f"{question} {ONLY_YES_NO}", input_, ans,
                {"type": "choice", "answer": ans.lower(), "options": ["yes", "no"]}, other, f"{ans}, {reason}.")


def _number_yes_no(task: Task, rng: random.Random) -> Task:
    """Ask whether a proposed answer to a number task is right (half the time it is)."""
    truth = rng.random() < 0.5
    proposed = task.output if truth else task.wrong
    question = task.instruction.replace(ONLY_NUMBER, f"Is the answer {proposed}?")
    return _yes_no(task.family, task.params + (proposed,), question, truth,
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
        ans, slips = a + b, [a - b, a + b + 1, a + b - 10]
    elif kind == "subtract":
        b = rng.randint(2, 40)
        a, b = nums = b + rng.randint(1, 40), b
        question = f"{name} has {a} {items} and gives {b} away. How many {items} are left?"
        ans, slips = a - b, [a + b, a - b - 1, a - b + 10]
    elif kind == "multiply":
        a, b = nums = rng.randint(2, 9), rng.randint(2, 12)
        question = f"{name} buys {a} bags with {b} {items} in each bag. How many {items} is that in total?"
        ans, slips = a * b, [a + b, a * b + b, a * b - a]
    elif kind == "divide":
        friends, each = rng.randint(2, 9), rng.randint(2, 12)
        nums = (friends * each, friends)
        question = (f"{name} shares {friends * each} {items} equally among {friends} friends. "
                    f"How many {items} does each friend get?")
        ans, slips = each, [friends * each - friends, each + 1, friends]
    else:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        nums = (a, b, c)
        question = f"{name} has {a} {items}, buys {b} more, then gives {c} away. How many {items} are left?"
        ans, slips = a + b - c, [a + b, a + b + c, a - c]
    loose = rng.choice([f"{name} has {ans} {items}.", f"The answer is {ans}.", f"{ans} {items}"])
    return _number_task("arithmetic", kind, (name, items, *nums), question, ans,
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
    return _number_task("units", kind, (src, dst, value), f"Convert {value} {src} to {dst}.", ans,
                        _distinct_wrong(rng, ans, slips),
                        rng.choice([f"{ans} {dst}", f"{value} {src} is {ans} {dst}.", f"That is {ans} {dst}."]))


def _phrase(rng: random.Random, lo: int = 2, hi: int = 4) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def text(rng: random.Random) -> Task:
    if rng.random() < YES_NO_SHARE:
        return _text_yes_no(rng)
    kind = rng.choice(["uppercase", "initials", "reverse_words"])
    words = _phrase(rng, 3 if kind != "uppercase" else 2, 4)
    phrase = " ".join(words)
    if kind == "uppercase":
        ans = phrase.upper()
        return Task("text", kind, tuple(words), "Rewrite the phrase below in capital letters. "
                    "Reply with only the rewritten phrase.", phrase, ans,
                    {"type": "text", "answer": ans, "case": "answer"}, phrase.title(),
                    f'The phrase in capital letters is "{ans}".')
    if kind == "initials":
        ans = "".join(w[0] for w in words)
        wrong = ans[::-1] if ans[::-1] != ans else ans[:-1]
        return Task("text", kind, tuple(words), "Write the first letter of each word below as one "
                    "lowercase word. Reply with only the letters.", phrase, ans,
                    {"type": "text", "answer": ans, "case": "constraint"}, wrong,
                    rng.choice([ans.upper(), f"The first letters are {ans}."]))
    ans = " ".join(reversed(words))
    wrong = " ".join(words[1:] + words[:1])
    return Task("text", kind, tuple(words), "Write the words below in reverse order. "
                "Reply with only the words.", phrase, ans,
                {"type": "text", "answer": ans, "case": "ignore"}, wrong, f"Reversed, it reads: {ans}.")


def _text_yes_no(rng: random.Random) -> Task:
    truth = rng.random() < 0.5
    variant = rng.choice(["starts", "ends", "words"])
    if variant == "words":
        words = _phrase(rng, 2, 5)
        n = len(words) if truth else len(words) + rng.choice([-1, 1] if len(words) > 2 else [1])
        return _yes_no("text", (variant, *words, n), f"Does the phrase below have exactly {n} words?", truth,
                       f"it has {len(words)} words", " ".join(words))
    word = rng.choice(WORDS)
    actual = word[0] if variant == "starts" else word[-1]
    letter = actual if truth else rng.choice([c for c in "abcdefghilmnoprstuw" if c != actual])
    verb = "start" if variant == "starts" else "end"
    return _yes_no("text", (variant, word, letter), f'Does the word "{word}" {verb} with the letter "{letter}"?',
                   truth, f'"{word}" {verb}s with "{actual}"')


def lists(rng: random.Random) -> Task:
    if rng.random() < YES_NO_SHARE:
        nums = rng.sample(range(1, 100), rng.randint(4, 6))
        truth = rng.random() < 0.5
        x = rng.choice(nums) if truth else rng.choice([v for v in range(1, 100) if v not in nums])
        return _yes_no("lists", (*nums, x), f"Is {x} in this list?", truth,
                       f"{x} is {'' if truth else 'not '}in the list", ", ".join(map(str, nums)))
    kind = rng.choice(["sort", "largest", "smallest", "count", "animals"])
    if kind in ("sort", "largest", "smallest"):
        nums = rng.sample(range(1, 100), rng.randint(3, 4) if kind == "sort" else rng.randint(4, 6))
        shown = ", ".join(map(str, nums))
        if kind == "sort":
            ans = sorted(nums)
            i = rng.randrange(len(ans) - 1)
            wrong = ans[:i] + [ans[i + 1], ans[i]] + ans[i + 2:]
            return _list_task("sort", tuple(nums), "Sort these numbers from smallest to largest. "
                              "Reply with only the numbers, separated by commas.", shown, ans, wrong,
                              rng.choice(["The sorted numbers are {}.", "{}"]), " ")
        pick = max if kind == "largest" else min
        ans = pick(nums)
        wrong = _distinct_wrong(rng, ans, [nums[0], sorted(nums)[1 if kind == "smallest" else -2]])
        return _number_task("lists", kind, tuple(nums), f"What is the {kind} number in this list?", ans, wrong,
                            f"The {kind} number is {ans}.", shown)
    if kind == "count":
        words = rng.sample(WORDS, rng.randint(3, 8))
        ans = len(words)
        return _number_task("lists", kind, tuple(words), "How many items are in this list?", ans,
                            ans + rng.choice([-1, 1]), f"There are {ans} items in the list.", ", ".join(words))
    animals = rng.sample(ANIMALS, rng.randint(1, 3))
    mixed = animals + rng.sample(WORDS, rng.randint(2, 4))
    rng.shuffle(mixed)
    ans = [w for w in mixed if w in animals]
    others = [w for w in mixed if w not in animals]
    wrong = ans[:-1] + [others[0]] if len(ans) > 1 else [others[0]]
    return _list_task("animals", tuple(mixed), "Which of these words are animals? Reply with only those "
                      "words, separated by commas, in the order given.", ", ".join(mixed), ans, wrong,
                      "The animals in the list are {}.", " and ")


def _list_task(kind, params, instruction, shown, ans, wrong, loose_fmt, loose_sep) -> Task:
    items = [str(x) for x in ans]
    return Task("lists", kind, params, instruction, shown, ", ".join(items),
                {"type": "list", "answer": items}, ", ".join(map(str, wrong)),
                loose_fmt.format(loose_sep.join(items)))


_N_WORDS = {2: "Answer: {}.", 3: "It is {}.", 4: "The answer is {}.", 5: "The answer is clearly {}.",
            6: "I think the answer is {}."}


def format_(rng: random.Random) -> Task:
    if rng.random() < YES_NO_SHARE:
        words = _phrase(rng, 2, 4)
        truth = rng.random() < 0.5
        i = rng.randrange(len(words))
        shown = " ".join(words) if truth else " ".join(w.capitalize() if j == i else w for j, w in enumerate(words))
        return _yes_no("format", (shown,), "Is the text below written in all lowercase letters?", truth,
                       "it has no capital letters" if truth else "it has a capital letter", shown)
    kind = rng.choice(["json", "n_words", "lowercase"])
    if kind == "json":
        op, key = rng.choice([("sum", "sum"), ("product", "product"), ("sum", "total"), ("difference", "result")])
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if op == "difference":
            a, b = max(a, b), min(a, b)
        ans = {"sum": a + b, "product": a * b, "difference": a - b}[op]
        return Task("format", kind, (op, key, a, b), f"Give the {op} of {a} and {b} as JSON with the single "
                    f'key "{key}". Reply with only the JSON.', "", json.dumps({key: ans}),
                    {"type": "json", "key": key, "answer": ans}, json.dumps({key: ans + rng.choice([-1, 1, 10])}),
                    rng.choice([f"The {op} is {ans}.", json.dumps({"answer": ans}), f"{key}: {ans}"]))
    if kind == "n_words":
        n = rng.randint(2, 6)
        a, b = rng.sample(range(2, 100), 2)
        which = rng.choice(["larger", "smaller"])
        ans = max(a, b) if which == "larger" else min(a, b)
        other = a + b - ans
        return Task("format", kind, (n, which, a, b), f"Using exactly {n} words, say which number is "
                    f"{which}: {a} or {b}.", "", _N_WORDS[n].format(ans),
                    {"type": "word_count", "n": n, "keyword": str(ans)}, _N_WORDS[n].format(other),
                    f"The {which} of the two numbers is {ans}.")
    words = _phrase(rng, 2, 4)
    shown = " ".join(w.upper() if rng.random() < 0.3 else w.capitalize() for w in words)
    ans = " ".join(words)
    return Task("format", kind, (shown,), "Rewrite the text below in all lowercase letters. "
                "Reply with only the rewritten text.", shown, ans,
                {"type": "text", "answer": ans, "case": "constraint"}, " ".join(words[:-1]), shown)


_MAKERS: dict[str, Callable[[random.Random], Task]] = {
    "arithmetic": arithmetic, "text": text, "lists": lists, "units": units, "format": format_}


# --------------------------------------------------------------------------- records


def split_of(task: Task) -> str:
    """The split a task belongs to, from a stable hash of its parameters."""
    bucket = int(hashlib.sha256(task.key.encode()).hexdigest()[:8], 16) % 100
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
        nxt = _MAKERS[task.family](rng)
        question = f"{nxt.instruction}\n{nxt.input}".strip()
        return task.output + rng.choice(_CONTINUATIONS).format(q=question, a=nxt.output)
    raise ValueError(f"unknown rejected kind {kind!r}; expected one of {REJECTED_KINDS}")


# --------------------------------------------------------------------------- checking


def has_check(meta: Optional[dict]) -> bool:
    return bool(meta) and isinstance(meta.get("check"), dict)


def check(meta: dict, output: str) -> Optional[str]:
    """None if ``output`` passes the record's checker, else "wrong_answer" or "constraint_broken".

    wrong_answer: the right answer is nowhere in the output. constraint_broken: it
    is there, but not in the form the instruction asked for (extra words, wrong
    case, not JSON, wrong number of words, a run-on continuation...).
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


def _has_number(text: str, answer) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(str(answer))}(?![\d])", _plain_numbers(text)) is not None


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
    """One of ``options``; the right option leading a longer reply breaks the constraint."""
    norm = normalize(output).lower()
    if norm == spec["answer"]:
        return None
    words = re.findall(r"[\w']+", norm)
    return "constraint_broken" if words and words[0] == spec["answer"] else "wrong_answer"


def _check_json(spec: dict, output: str) -> Optional[str]:
    try:
        obj = json.loads(output.strip())
    except ValueError:
        obj = None
    if isinstance(obj, dict) and list(obj) == [spec["key"]]:
        value = obj[spec["key"]]
        ok = isinstance(value, (int, float, str)) and _plain_numbers(str(value)).strip() == str(spec["answer"])
        return None if ok else "wrong_answer"
    return "constraint_broken" if _has_number(output, spec["answer"]) else "wrong_answer"


def _check_word_count(spec: dict, output: str) -> Optional[str]:
    words = [w.strip(".,;:!?\"'()") for w in output.split()]
    words = [w for w in words if w]
    if spec["keyword"].lower() not in (w.lower() for w in words):
        return "wrong_answer"
    return None if len(words) == spec["n"] else "constraint_broken"


_CHECKERS: dict[str, Callable[[dict, str], Optional[str]]] = {
    "number": _check_number, "choice": _check_choice, "text": _check_text, "list": _check_list, "json": _check_json,
    "word_count": _check_word_count}
