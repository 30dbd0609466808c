"""Rows of common Hub data formats -> the project's canonical SFT and preference records.

    records, stats = convert_rows(rows, "hh_rlhf", source="Anthropic/hh-rlhf",
                                  fields={}, filters=[], on_bad_row="skip")

Formats (default column names in ``DEFAULT_FIELDS``; ``DataSource.fields`` maps a
canonical field to another column, e.g. ``{prompt: question}`` for orca pairs):

    alpaca      instruction / input / output (/ system)
    dolly       instruction / context / response
    messages    a list of {role, content}: last assistant turn = output, the user turn
                before it = instruction, earlier turns = history, a system message = system
    sharegpt    ``conversations``: a list of {from, value}, from in human/gpt/system
    preference  prompt / chosen / rejected as strings, or chosen and rejected as message lists
    hh_rlhf     chosen and rejected as whole "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogues
    unpaired    ("KTO" data: thumbs up/down) prompt / completion / label: one answer per row, a string
                or a message list like preference's chosen, and whether it is good; label true/false,
                1/0, "up"/"down" or "good"/"bad". Only train_dpo.algorithm kto trains on it

``filters`` keep a row only when ``row[field] <op> value`` holds. A malformed row
raises DataError naming the source and row (1-based, counting every row read),
or with ``on_bad_row="skip"`` is dropped and counted by reason in ``stats``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import re
from collections import Counter
from typing import Any, Callable, Iterable, Optional

from tunepipe.artifacts import DataError

log = logging.getLogger(__name__)

SFT_FORMATS = ("alpaca", "dolly", "messages", "sharegpt")
PREFERENCE_FORMATS = ("preference", "hh_rlhf", "unpaired")

# canonical field -> column name; fields marked optional may be absent from a row.
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
    "dolly": {"instruction": "instruction", "input": "context", "output": "response", "system": "system"},
    "messages": {"messages": "messages"},
    "sharegpt": {"conversations": "conversations"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system"},
    "hh_rlhf": {"chosen": "chosen", "rejected": "rejected"},
    "unpaired": {"prompt": "prompt", "completion": "completion", "label": "label", "system": "system"},
}
OPTIONAL_FIELDS = {"input", "system", "id"}
# Canonical fields a mapping may name beyond the defaults.
EXTRA_FIELDS = {"preference": {"input", "id"}, "unpaired": {"input", "id"}}
# An unpaired row's label, as people write thumbs up and down: text is compared case-folded, and the
# keys True and False also match the numbers 1 and 0 (1.0 and 0.0 too: Python's equality).
LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False,
          "up": True, "down": False, "good": True, "bad": False}

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq, "ne": operator.ne, "ge": operator.ge, "gt": operator.gt, "le": operator.le,
    "lt": operator.lt, "in": lambda a, b: a in b, "not_in": lambda a, b: a not in b}


class BadRow(Exception):
    """One row cannot be converted; ``reason`` is the short key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def field_map(fmt: str, fields: dict[str, str]) -> dict[str, str]:
    """The format's default columns overridden by ``fields``; unknown canonical names are an error."""
    if fmt not in DEFAULT_FIELDS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {sorted(DEFAULT_FIELDS)}")
    allowed = set(DEFAULT_FIELDS[fmt]) | EXTRA_FIELDS.get(fmt, set()) | {"id"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise DataError(f"fields: {unknown} are not fields of format {fmt!r}; it has {sorted(allowed)}")
    return {**DEFAULT_FIELDS[fmt], **fields}


# --------------------------------------------------------------------------- row access


def _get(row: dict, cols: dict[str, str], name: str, kind=str):
    """Read canonical field ``name``; optional ones give None when absent or null."""
    col = cols.get(name)
    value = row.get(col) if col else None
    if value is None:
        if name in OPTIONAL_FIELDS:
            return None
        raise BadRow("missing_field", f"missing field {col!r} ({name})")
    if not isinstance(value, kind):
        raise BadRow("wrong_type", f"field {col!r} should be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", list: "a list", dict: "an object"}.get(k, k.__name__) for k in kinds)


def _text(row: dict, cols: dict[str, str], name: str) -> Optional[str]:
    value = _get(row, cols, name)
    if value is None:
        return None
    if not value.strip():
        if name in OPTIONAL_FIELDS:
            return None
        raise BadRow("empty_text", f"field {cols[name]!r} ({name}) is empty")
    return value.strip()


def _nonempty(value: str, what: str) -> str:
    if not value.strip():
        raise BadRow("empty_text", f"{what} is empty")
    return value.strip()


# --------------------------------------------------------------------------- conversations


def _messages(raw: list, role_key: str = "role", content_key: str = "content",
              roles: Optional[dict[str, str]] = None) -> list[dict]:
    """Validate a message list into [{role, content}] with roles system/user/assistant."""
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise BadRow("wrong_type", f"message {i} should be an object, got {type(msg).__name__}")
        role, content = msg.get(role_key), msg.get(content_key)
        if role is None or content is None:
            raise BadRow("missing_field", f"message {i} lacks {role_key!r} or {content_key!r}")
        if not isinstance(content, str):
            raise BadRow("wrong_type", f"message {i} {content_key!r} should be a string")
        if roles:
            role = roles.get(role, role)
        if role not in ("system", "user", "assistant"):
            raise BadRow("bad_conversation", f"message {i} has unknown role {msg.get(role_key)!r}")
        out.append({"role": role, "content": content})
    return out


def _prompt_parts(msgs: list[dict]) -> tuple[Optional[str], list[dict], str]:
    """(system, history, instruction) from a conversation that ends with a user turn."""
    system = None
    if msgs and msgs[0]["role"] == "system":
        system = msgs[0]["content"].strip() or None
        msgs = msgs[1:]
    if not msgs or msgs[-1]["role"] != "user":
        raise BadRow("bad_conversation", "no user turn before the answer")
    history = msgs[:-1]
    if any(m["role"] not in ("user", "assistant") for m in history):
        raise BadRow("bad_conversation", "a system message inside the conversation")
    return system, history, _nonempty(msgs[-1]["content"], "the last user turn")


def _split_at_last_answer(msgs: list[dict]) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn); later unanswered turns are dropped."""
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise BadRow("bad_conversation", "no assistant turn")
    return msgs[:last], _nonempty(msgs[last]["content"], "the last assistant turn")


def _conversation_record(msgs: list[dict]) -> dict:
    before, output = _split_at_last_answer(msgs)
    system, history, instruction = _prompt_parts(before)
    return {"instruction": instruction, "input": "", "output": output, "system": system, "history": history}


# --------------------------------------------------------------------------- formats


def _alpaca(row: dict, cols: dict[str, str]) -> dict:
    return {"instruction": _text(row, cols, "instruction"), "input": _text(row, cols, "input") or "",
            "output": _text(row, cols, "output"), "system": _text(row, cols, "system"), "history": []}


def _messages_fmt(row: dict, cols: dict[str, str]) -> dict:
    return _conversation_record(_messages(_get(row, cols, "messages", list)))


def _sharegpt(row: dict, cols: dict[str, str]) -> dict:
    return _conversation_record(_messages(_get(row, cols, "conversations", list), "from", "value",
                                          _SHAREGPT_ROLES))


def _preference(row: dict, cols: dict[str, str]) -> dict:
    chosen = _get(row, cols, "chosen", (str, list))
    rejected = _get(row, cols, "rejected", (str, list))
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise BadRow("wrong_type", "chosen and rejected should both be strings or both message lists")
    if isinstance(chosen, str):
        record = _prompt_from_columns(row, cols)
        record.update(chosen=_nonempty(chosen, "chosen"), rejected=_nonempty(rejected, "rejected"))
        return record
    before, chosen_text = _split_at_last_answer(_messages(chosen))
    before_r, rejected_text = _split_at_last_answer(_messages(rejected))
    if before != before_r:
        raise BadRow("prefix_mismatch", "chosen and rejected conversations differ before the last answer")
    record = _prompt_before(before, row, cols)
    record.update(chosen=chosen_text, rejected=rejected_text)
    return record


def _unpaired(row: dict, cols: dict[str, str]) -> dict:
    completion = _get(row, cols, "completion", (str, list))
    if isinstance(completion, str):
        record = _prompt_from_columns(row, cols)
        record["completion"] = _nonempty(completion, f"field {cols['completion']!r} (completion)")
    else:
        before, answer = _split_at_last_answer(_messages(completion))
        record = {**_prompt_before(before, row, cols), "completion": answer}
    record["label"] = _label(row, cols)
    return record


def _label(row: dict, cols: dict[str, str]) -> bool:
    value = _get(row, cols, "label", (bool, int, float, str))
    key = value.strip().casefold() if isinstance(value, str) else value
    try:
        return LABELS[key]
    except (KeyError, TypeError):
        raise BadRow("bad_label", f"field {cols['label']!r} (label) should be true/false, 1/0, up/down or "
                                  f"good/bad, got {value!r}") from None


def _prompt_before(before: list[dict], row: dict, cols: dict[str, str]) -> dict:
    """The prompt of an answer given as a message list: the turns before it when they hold a user
    turn; else (only the answers are message lists) the prompt column."""
    if any(m["role"] == "user" for m in before):
        system, history, instruction = _prompt_parts(before)
        return {"instruction": instruction, "input": "", "system": system, "history": history}
    return _prompt_from_columns(row, cols)


def _prompt_from_columns(row: dict, cols: dict[str, str]) -> dict:
    prompt = _get(row, cols, "prompt", (str, list))
    if isinstance(prompt, list):
        system, history, instruction = _prompt_parts(_messages(prompt))
    else:
        system, history, instruction = None, [], _nonempty(prompt, f"field {cols['prompt']!r} (prompt)")
    return {"instruction": instruction, "input": _text(row, cols, "input") or "",
            "system": _text(row, cols, "system") or system, "history": history}


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def _hh_turns(dialogue: str, which: str) -> list[dict]:
    _nonempty(dialogue, which)
    parts = _HH_TURN.split("\n\n" + dialogue.lstrip("\n"))
    if parts[0].strip():
        raise BadRow("bad_conversation", f"{which} does not start with a Human: turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _hh_rlhf(row: dict, cols: dict[str, str]) -> dict:
    chosen = _hh_turns(_get(row, cols, "chosen"), "chosen")
    rejected = _hh_turns(_get(row, cols, "rejected"), "rejected")
    for turns, which in ((chosen, "chosen"), (rejected, "rejected")):
        if not turns or turns[-1]["role"] != "assistant":
            raise BadRow("bad_conversation", f"{which} does not end with an Assistant: turn")
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("prefix_mismatch", "chosen and rejected dialogues differ before the last Assistant: turn")
    system, history, instruction = _prompt_parts(chosen[:-1])
    return {"instruction": instruction, "input": "", "system": system, "history": history,
            "chosen": _nonempty(chosen[-1]["content"], "chosen's last answer"),
            "rejected": _nonempty(rejected[-1]["content"], "rejected's last answer")}


_CONVERTERS: dict[str, Callable[[dict, dict[str, str]], dict]] = {
    "alpaca": _alpaca, "dolly": _alpaca, "messages": _messages_fmt, "sharegpt": _sharegpt,
    "preference": _preference, "hh_rlhf": _hh_rlhf, "unpaired": _unpaired}


# --------------------------------------------------------------------------- driver


def describe_filter(f) -> str:
    return f"{f.field} {f.op} {f.value!r}"


def _passes(row: dict, f) -> bool:
    if f.field not in row:
        raise BadRow("missing_field", f"missing field {f.field!r} (used by filter {describe_filter(f)})")
    try:
        return bool(_OPS[f.op](_like(row[f.field], f.value), f.value))
    except TypeError:
        raise BadRow("wrong_type", f"filter {describe_filter(f)} cannot compare {row[f.field]!r}") from None


def _like(value, example):
    """A text cell (CSV) read as the filter value's type: "8.0" >= 8, "false" == False."""
    if not isinstance(value, str) or isinstance(example, str) or example is None:
        return value
    text = value.strip().lower()
    if isinstance(example, bool):
        return {"true": True, "false": False}.get(text, value)
    try:
        return float(text) if isinstance(example, (int, float)) else value
    except ValueError:
        return value


def convert_rows(rows: Iterable[dict], fmt: str, source: str, fields: Optional[dict[str, str]] = None,
                 filters=(), on_bad_row: str = "error") -> tuple[list[dict], dict]:
    """Filter and convert rows; return canonical records and stats (read, filtered, skipped, kept).

    Each record gets ``id`` (the mapped id column, else ``<source>-<row>``) and
    ``meta = {"source", "row"}``.
    """
    cols = field_map(fmt, dict(fields or {}))
    filtered, skipped = Counter(), Counter()
    seen: set[str] = set()      # ids and content hashes
    records, n_read = [], 0
    for n_read, row in enumerate(rows, 1):
        try:
            failed = next((f for f in filters if not _passes(row, f)), None) if isinstance(row, dict) else None
            if failed is not None:
                filtered[describe_filter(failed)] += 1
                continue
            record = _convert_one(row, fmt, cols, f"{_slug(source)}-{n_read}", seen)
        except BadRow as bad:
            if on_bad_row != "skip":
                raise DataError(f"{source} row {n_read}: {bad} "
                                "(set fetch.on_bad_row: skip to skip such rows)") from None
            skipped[bad.reason] += 1
            continue
        records.append({**record, "meta": {"source": source, "row": n_read}})
    stats = {"read": n_read, "filtered": dict(sorted(filtered.items())), "skipped": dict(sorted(skipped.items())),
             "kept": len(records)}
    if skipped:
        log.warning("%s: skipped %d malformed rows: %s", source, sum(skipped.values()), stats["skipped"])
    if not records:
        raise DataError(f"{source}: no rows left ({explain(stats)})")
    return records, stats


def _convert_one(row, fmt: str, cols: dict[str, str], default_id: str, seen: set[str]) -> dict:
    """One canonical record with its id; ``seen`` catches repeated ids and repeated content."""
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"expected an object, got {type(row).__name__}")
    record = _CONVERTERS[fmt](row, cols)
    if "chosen" in record and record["chosen"] == record["rejected"]:
        raise BadRow("chosen_equals_rejected", "chosen and rejected are the same answer")
    rid = _get(row, cols, "id", (str, int))
    rid = default_id if rid is None else str(rid)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    if f"id:{rid}" in seen:
        raise BadRow("duplicate", f"duplicate id {rid!r}")
    if digest in seen:
        raise BadRow("duplicate", "duplicate of an earlier row")
    seen.update((f"id:{rid}", digest))
    return {"id": rid, **record}


def explain(stats: dict) -> str:
    parts = [f"read {stats['read']} rows"]
    parts += [f"filter '{k}' removed {v}" for k, v in stats["filtered"].items()]
    parts += [f"skipped {v} as {k}" for k, v in stats["skipped"].items()]
    return "; ".join(parts)


def _slug(source: str) -> str:
    name = re.split(r"[\\/]", source.rstrip("/\\"))[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name.rsplit(".", 1)[0] if "." in name else name) or "row"
