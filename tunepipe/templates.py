"""Rendering canonical records into the exact text the model sees.

A canonical record (see data/raw in the README) becomes ``{"id", "prompt",
"completion", "meta"}`` (SFT), ``{"id", "prompt", "chosen", "rejected",
"meta"}`` (a preference pair) or ``{"id", "prompt", "completion", "label", "meta"}``
(an unpaired preference row: one answer, good or bad). The prompt runs up to where the model's answer starts;
the answer is kept separate and WITHOUT an EOS, so the tokenize stage can mask
the prompt exactly and append the EOS once.

    render = make_renderer("chat", tokenizer, system_prompt=None)
    row = template_sft(record, render)

Two templates:

* ``alpaca``: the Stanford Alpaca prompt. A system prompt replaces the Alpaca
  preamble (as axolotl's system-prompt Alpaca does), and earlier turns are
  rendered as ``### Instruction:`` / ``### Response:`` blocks before the current one.
* ``chat``: the tokenizer's own chat template (``apply_chat_template`` with
  ``add_generation_prompt=True``), or the one given in ``template.chat_template``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from tunepipe.artifacts import DataError
from tunepipe.cli import StageError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# ChatML, for base models whose tokenizer has no chat template (template.chat_template: chatml).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_CHAT_TEMPLATES = {"chatml": CHATML}

Render = Callable[[dict], str]


# --------------------------------------------------------------------------- record checks


def _require_str(record: dict, key: str, where: str, optional: bool = False) -> None:
    value = record.get(key)
    if value is None and optional:
        return
    if not isinstance(value, str):
        got = "missing" if key not in record else f"got {type(value).__name__}"
        raise DataError(f"{where}: field '{key}' must be a string ({got})")


def check_record(record: dict, answers: tuple[str, ...], where: str) -> None:
    """Raise DataError (naming ``where``) unless ``record`` is a canonical record."""
    if not isinstance(record.get("id"), (str, int)):
        raise DataError(f"{where}: field 'id' must be a string")
    _require_str(record, "instruction", where)
    _require_str(record, "input", where, optional=True)
    _require_str(record, "system", where, optional=True)
    for key in answers:
        _require_str(record, key, where)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history' must be a list of {{role, content}} turns")
    for i, turn in enumerate(history):
        if not (isinstance(turn, dict) and turn.get("role") in ("user", "assistant")
                and isinstance(turn.get("content"), str)):
            raise DataError(f"{where}: history[{i}] must be {{\"role\": \"user\"|\"assistant\", \"content\": str}}")
    if not isinstance(record.get("meta", {}), dict):
        raise DataError(f"{where}: field 'meta' must be an object")


def is_unpaired(record: dict) -> bool:
    """An unpaired preference record or row (fetch.preference.format: unpaired): one answer and its label."""
    return "label" in record


def check_pref_record(record: dict, where: str) -> None:
    """Raise DataError (naming ``where``) unless ``record`` is a canonical pair or unpaired row."""
    if not is_unpaired(record):
        return check_record(record, ("chosen", "rejected"), where)
    check_record(record, ("completion",), where)
    if not isinstance(record["label"], bool):
        raise DataError(f"{where}: field 'label' must be true or false (got {record['label']!r})")


def preference_kind(records: list[dict], where: str) -> Optional[str]:
    """"paired" or "unpaired" for preference records all of one kind; None when there are none."""
    kinds = {"unpaired" if is_unpaired(r) else "paired" for r in records}
    if len(kinds) > 1:
        raise DataError(f"{where}: mixes preference pairs and unpaired rows; use one format")
    return next(iter(kinds), None)


def user_message(record: dict) -> str:
    """The current turn's user text: the instruction, then the input (if any) after a blank line."""
    text = record["instruction"]
    return text + "\n\n" + record["input"] if record.get("input") else text


def system_text(record: dict, system_prompt: Optional[str]) -> Optional[str]:
    """params' system prompt wins over the record's; None leaves the template's default."""
    return system_prompt if system_prompt is not None else record.get("system")


# --------------------------------------------------------------------------- templates


def render_alpaca(record: dict, system_prompt: Optional[str] = None) -> str:
    system = system_text(record, system_prompt)
    if system is None:
        system = ALPACA_PREAMBLE_INPUT if record.get("input") else ALPACA_PREAMBLE
    parts = [system + "\n\n"] if system else []
    for turn in record.get("history") or []:
        header = "### Instruction:" if turn["role"] == "user" else "### Response:"
        parts.append(f"{header}\n{turn['content']}\n\n")
    parts.append(f"### Instruction:\n{record['instruction']}\n\n")
    if record.get("input"):
        parts.append(f"### Input:\n{record['input']}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)


def chat_messages(record: dict, system_prompt: Optional[str] = None) -> list[dict]:
    system = system_text(record, system_prompt)
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": t["role"], "content": t["content"]} for t in record.get("history") or []]
    messages.append({"role": "user", "content": user_message(record)})
    return messages


def render_chat(record: dict, tokenizer: Any, system_prompt: Optional[str] = None,
                chat_template: Optional[str] = None) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(chat_messages(record, system_prompt), chat_template=chat_template,
                                             tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        # e.g. a template that forbids a system turn or needs strictly alternating roles
        raise DataError(f"record {record.get('id')!r}: the chat template rejected its messages: {exc}") from None


def resolve_chat_template(tokenizer: Any, override: Optional[str]) -> Optional[str]:
    """The chat template to use: ``override`` (a name in NAMED_CHAT_TEMPLATES or Jinja text), else the tokenizer's."""
    if override:
        return NAMED_CHAT_TEMPLATES.get(override, override)
    if getattr(tokenizer, "chat_template", None):
        return None  # the tokenizer's own
    raise StageError(
        "template.kind is 'chat' but the base model's tokenizer has no chat template; "
        "set template.kind: alpaca, or give one in template.chat_template "
        f"({' | '.join(NAMED_CHAT_TEMPLATES)} | Jinja text)")


def make_renderer(kind: str, tokenizer: Any = None, system_prompt: Optional[str] = None,
                  chat_template: Optional[str] = None) -> Render:
    """A function record -> prompt text for ``template.kind``; fails early if the template cannot work."""
    if kind == "alpaca":
        return lambda record: render_alpaca(record, system_prompt)
    if kind == "chat":
        template = resolve_chat_template(tokenizer, chat_template)
        return lambda record: render_chat(record, tokenizer, system_prompt, template)
    raise StageError(f"template.kind: unknown template {kind!r} (alpaca | chat)")


# --------------------------------------------------------------------------- records


def template_sft(record: dict, render: Render) -> dict:
    return {"id": str(record["id"]), "prompt": render(record), "completion": record["output"],
            "instruction": written_instruction(record), "meta": record.get("meta") or {}}


def written_instruction(record: dict) -> str:
    """The last request as the user wrote it (instruction, then its input), for people to read:
    the report shows this, not the templated prompt."""
    return "\n\n".join(part for part in (record.get("instruction"), record.get("input")) if part)


def template_pref(record: dict, render: Render) -> dict:
    answers = ("completion", "label") if is_unpaired(record) else ("chosen", "rejected")
    return {"id": str(record["id"]), "prompt": render(record), **{key: record[key] for key in answers},
            "meta": record.get("meta") or {}}


def chat_roundtrip_problem(record: dict, prompt: str, answer: str, tokenizer: Any, system_prompt: Optional[str],
                           chat_template: Optional[str]) -> Optional[str]:
    """Why prompt+answer+EOS differs from the template's own rendering of the whole conversation, or None.

    The training text is built as prompt + answer + EOS; if the template renders a
    finished conversation differently (trims content, drops a thinking block, ends
    the turn with another token) the model learns a format it will not see at inference.
    """
    messages = chat_messages(record, system_prompt) + [{"role": "assistant", "content": answer}]
    full = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    if not full.startswith(prompt + answer):
        return "the rendered conversation does not start with prompt + answer"
    eos = tokenizer.eos_token or ""
    if eos and not full[len(prompt + answer):].startswith(eos):
        return f"the template ends the answer with {full[len(prompt + answer):][:20]!r}, not the EOS {eos!r}"
    return None
