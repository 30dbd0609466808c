"""Exporting the final model to where people run it: a GGUF file (llama.cpp, Ollama, LM Studio)
and an Ollama Modelfile; and checking that the GGUF still answers like the model it came from.
(The Hub folder, its model card and the upload: tunepipe/hub.py, the publish stage.)

    converter = find_converter()                     # llama.cpp's own convert_hf_to_gguf.py, pinned
    convert(converter, "models/final", out / "model-f16.gguf", "f16")
    meta = gguf_metadata(out / "model-f16.gguf")     # chat template, EOS and stop ids, BOS handling
    modelfile(tokenizer, "model-f16.gguf", stops)    # FROM, TEMPLATE, PARAMETER stop, SYSTEM
    round_trip(...)                                  # GGUF read back by transformers vs the original

The converter is llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion`` package and
its own ``gguf-py`` (newer than the ``gguf`` release on PyPI, and the one it is written for),
taken from the llama-cpp-python sdist of a pinned version, which vendors llama.cpp: ``make setup``
extracts those files into ``.venv/llama.cpp-<version>/`` (nothing is copied into the repository).
It runs in a subprocess so that its ``gguf`` never meets the PyPI ``gguf`` that transformers'
GGUF reader imports. What it converts with is pinned by a hash over those files
(CONVERTER_SHA256): this module is a dependency of the export stage, so a different converter is
refused, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tunepipe.cli import StageError

log = logging.getLogger("tunepipe.export")

# --------------------------------------------------------------------------- the converter

LLAMA_CPP_PYTHON = "0.3.36"   # the PyPI sdist the Makefile downloads (it vendors llama.cpp)
# sha256 over convert_hf_to_gguf.py, conversion/ and gguf-py/ as `make setup` extracts them
# (converter_hash); a different converter changes this module, so DVC reruns the export
CONVERTER_SHA256 = "85819934576cd5d9735f013a6c5e088c795208a609378edf4d730644b3842bad"
CONVERTER_DIR = Path(sys.prefix) / f"llama.cpp-{LLAMA_CPP_PYTHON}"
CONVERTED_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
SETUP_HINT = "run `make setup` (it extracts llama.cpp's converter from the pinned llama-cpp-python sdist)"

# What llama.cpp's converter can write from Python alone (no compiled quantizer), and the
# largest |logit difference| against the original that each may show before the stage fails.
# Measured on SmolLM2-135M-Instruct (3 chat prompts, 16 greedy tokens): f16 0.041, bf16 0.28,
# q8_0 1.32; the limits leave about 4x room for a fine-tuned model's weights.
GGUF_TYPES = {"f32": 1e-2, "f16": 0.2, "bf16": 1.0, "q8_0": 5.0}


def converter_hash(root: Path) -> str:
    """One sha256 over the converter's files (relative paths and contents; bytecode ignored)."""
    h = hashlib.sha256()
    files = []
    for part in CONVERTED_PARTS:
        p = root / part
        files += [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for f in sorted(files):
        if "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).hexdigest().encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Converter:
    root: Path
    sha256: str

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def metadata_script(self) -> Path:
        return self.root / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"


def find_converter(root: Path = CONVERTER_DIR, expected: Optional[str] = CONVERTER_SHA256) -> Converter:
    """The pinned converter, or StageError with the one-line fix."""
    missing = [part for part in CONVERTED_PARTS if not (root / part).exists()]
    if missing:
        raise StageError(f"llama.cpp's converter is missing ({root / missing[0]}); {SETUP_HINT}")
    got = converter_hash(root)
    if expected is not None and got != expected:
        raise StageError(f"{root}: converter files differ from llama-cpp-python {LLAMA_CPP_PYTHON}'s "
                         f"(sha256 {got[:12]}, expected {expected[:12]}); delete the folder and {SETUP_HINT}")
    return Converter(root, got)


def _converter_env(converter: Converter) -> dict:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(converter.root / "gguf-py")}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py, not PyPI's
    return env


def _run(args: list[str], converter: Converter, what: str) -> None:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_converter_env(converter))
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise StageError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def convert(converter: Converter, model_dir: Path, out: Path, gguf_type: str) -> None:
    """models/final -> one GGUF file of ``gguf_type`` (tokenizer and chat template included)."""
    if gguf_type not in GGUF_TYPES:
        raise StageError(f"GGUF type {gguf_type!r} is not supported; use one of {sorted(GGUF_TYPES)}")
    _run([str(converter.script), str(model_dir), "--outfile", str(out), "--outtype", gguf_type],
         converter, f"convert_hf_to_gguf.py {model_dir} --outtype {gguf_type}")


def rewrite_metadata(converter: Converter, src: Path, dst: Path, *, special_ids: dict[str, int],
                     chat_template: Optional[str]) -> None:
    """A copy of ``src`` with special token ids (eot, eom, ...) and/or the chat template set."""
    args = [str(converter.metadata_script), str(src), str(dst), "--force"]
    for kind, token_id in special_ids.items():
        args += ["--special-token-by-id", kind, str(token_id)]
    if chat_template is not None:
        template = dst.with_suffix(".jinja")
        template.write_text(chat_template, encoding="utf-8")
        args += ["--chat-template-file", str(template)]
    try:
        _run(args, converter, "gguf_new_metadata.py")
    finally:
        if chat_template is not None:
            template.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading a GGUF's metadata

STOP_KINDS = ("eos", "eot", "eom")  # the special token kinds llama.cpp ends a generation on


def gguf_metadata(path: Path) -> dict:
    """The metadata this stage cares about (read with the PyPI gguf package, no tensors loaded)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    return {"architecture": value("general.architecture"), "file_type": value("general.file_type"),
            "chat_template": value("tokenizer.chat_template"), "tokenizer_model": value("tokenizer.ggml.model"),
            "add_bos": value("tokenizer.ggml.add_bos_token"), "bos": value("tokenizer.ggml.bos_token_id"),
            **{kind: value(f"tokenizer.ggml.{kind}_token_id") for kind in STOP_KINDS},
            "n_tokens": len(value("tokenizer.ggml.tokens") or [])}


def missing_metadata(meta: dict, stops: Sequence[int], chat_template: Optional[str]) -> tuple[dict, Optional[str]]:
    """What the GGUF lacks: {kind: id} for stop ids it does not carry, and the chat template if it differs.

    llama.cpp ends a generation on its EOS, EOT and EOM ids, so extra stop ids (Llama 3 stops on
    <|eot_id|> and <|eom_id|> as well as its EOS) go into the free ones of those slots."""
    carried = {meta.get(kind) for kind in STOP_KINDS} - {None}
    extra = [s for s in stops if s not in carried]
    free = [kind for kind in STOP_KINDS if meta.get(kind) is None]
    if meta.get("eos") is None and stops:  # the EOS first: every runtime knows it
        free, extra = [k for k in free if k != "eos"], [s for s in extra if s != stops[0]]
        fixes = {"eos": stops[0]}
    else:
        fixes = {}
    if len(extra) > len(free):
        raise StageError(f"the GGUF can carry at most {len(STOP_KINDS)} stop ids; this model has "
                         f"{len(stops)} ({list(stops)})")
    fixes.update(zip(free, extra))
    template = chat_template if chat_template and meta.get("chat_template") != chat_template else None
    return fixes, template


# --------------------------------------------------------------------------- Ollama Modelfile


@dataclass(frozen=True)
class ChatFamily:
    """A chat format written as an Ollama (Go text/template) TEMPLATE over .Messages.

    ``bos``: the Hugging Face template starts with the BOS token, which llama.cpp adds itself
    (the Ollama template leaves it out). ``system``: a regex pulling the default system prompt
    out of the Hugging Face rendering of a conversation that has none."""

    name: str
    template: str
    system: str
    bos: bool = False


CHAT_FAMILIES = (
    ChatFamily(
        "chatml",
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n"),
    ChatFamily(
        "llama3",
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        r"^<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|><\|start_header_id\|>user",
        bos=True),
)

# Conversations the translation must render exactly as the tokenizer's chat template does.
PROBES = (
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
     {"role": "user", "content": "And 4 + 4?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}],
)


def render_ollama(template: str, messages: list[dict], system: Optional[str] = None) -> str:
    """What Ollama feeds the model for ``messages`` under a TEMPLATE of the families above.

    Ollama puts the Modelfile's SYSTEM in front of a conversation that has no system message,
    then executes the template over .Messages (.Role, .Content). This renders the subset of Go
    text/template the family templates use: ``{{ range .Messages }}...{{ end }}``, ``{{ .Role }}``
    and ``{{ .Content }}``."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    match = re.fullmatch(r"(.*?)\{\{ range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.DOTALL)
    if not match or "{{" in match.group(1) + match.group(3):
        raise ValueError("render_ollama renders only '<text>{{ range .Messages }}...{{ end }}<text>' templates")
    head, body, tail = match.groups()
    rendered = [body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages]
    return head + "".join(rendered) + tail


def _render_hf(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_family(tokenizer) -> tuple[Optional[ChatFamily], Optional[str]]:
    """The family whose Ollama template renders every probe as the tokenizer's chat template does,
    and the template's default system prompt (None if it adds none); (None, None) if none fits."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    try:
        hf = [_render_hf(tokenizer, conv) for conv in PROBES]
    except Exception as exc:  # a template that cannot render these plain conversations
        log.warning("the chat template does not render a plain conversation (%s)", exc)
        return None, None
    bos = tokenizer.bos_token or ""
    for family in CHAT_FAMILIES:
        texts = [t[len(bos):] if family.bos and bos and t.startswith(bos) else t for t in hf]
        found = re.match(family.system, texts[0], re.DOTALL)
        system = found.group(1) if found else None
        if all(render_ollama(family.template, conv, system) == text for conv, text in zip(PROBES, texts)):
            return family, system
    return None, None


def _quoted(text: str) -> str:
    if '"""' in text:
        raise StageError('a chat template or system prompt containing """ cannot go into a Modelfile')
    return f'"""{text}"""'


def modelfile(gguf_name: str, family: Optional[ChatFamily], system: Optional[str], stop_texts: Sequence[str],
              params: dict[str, Any] | None = None) -> str:
    """The Ollama Modelfile: FROM the GGUF beside it, TEMPLATE, PARAMETER stop per stop token, SYSTEM."""
    lines = ["# Ollama Modelfile written by tunepipe's export stage: ollama create <name> -f Modelfile",
             f"FROM ./{gguf_name}"]
    if family is not None:
        lines.append(f"TEMPLATE {_quoted(family.template)}")
    else:
        lines.append("# no TEMPLATE: the chat template is of no family tunepipe translates; Ollama reads the "
                     "GGUF's tokenizer.chat_template")
    for text in stop_texts:
        lines.append(f"PARAMETER stop {json.dumps(text)}")
    for key, value in (params or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the round trip


def load_gguf(path: Path):
    """(model, tokenizer) as transformers' GGUF reader loads them (dequantized to float32)."""
    from transformers import AutoTokenizer

    from tunepipe.modeling import load_gguf_model
    from tunepipe.sources import _cached_gguf_parsing

    path = Path(path)
    with _cached_gguf_parsing():  # parse the file once for both
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError) as exc:
            raise StageError(f"{path}: transformers cannot read the GGUF's tokenizer back: {exc}") from None
        model = load_gguf_model(path.parent)
    return model.eval(), tokenizer


def greedy(model, ids: list[int], new_tokens: int, stops: Sequence[int]) -> list[int]:
    """The greedy answer to one prompt, by evaluate's own decoding loop (stop id included)."""
    from tunepipe.generation import Decoding, decode_batch

    return decode_batch(model, [ids], Decoding(max_new_tokens=new_tokens), list(stops), pad_id=0)[0]  # no padding


def next_token_logits(model, ids: list[int], n: int):
    """Logits for the last ``n`` + 1 positions of ``ids`` (each predicting the token after it)."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -(n + 1):].float()


def compare_prompt(reference, exported, ids: list[int], new_tokens: int, stops: Sequence[int], atol: float) -> dict:
    """Greedy answers of both models and the exported model's logits along the reference's answer.

    A greedy difference is allowed only at a near tie: where the reference's logits for its own
    choice and the exported model's choice are within ``atol`` of each other."""
    ref = greedy(reference, ids, new_tokens, stops)
    out = greedy(exported, ids, new_tokens, stops)
    seq = ids + ref
    a, b = next_token_logits(reference, seq, len(ref)), next_token_logits(exported, seq, len(ref))
    diff = (a - b).abs()
    first = next((i for i, (x, y) in enumerate(zip(ref, out)) if x != y), None)
    if first is None and len(ref) != len(out):
        first = min(len(ref), len(out))
    gap = None
    if first is not None and first < len(ref) and first < len(out):
        gap = float(a[first, ref[first]] - a[first, out[first]])
    return {"same_tokens": first is None, "n_tokens": len(ref), "first_difference": first,
            "reference_gap": None if gap is None else round(gap, 4), "max_logit_diff": float(diff.max()),
            "reference_tokens": ref, "exported_tokens": out}


def check_result(results: list[dict], atol: float, decode) -> None:
    """StageError naming the prompt and the difference, if any result is beyond ``atol``."""
    for n, r in enumerate(results, 1):
        if r["max_logit_diff"] > atol:
            raise StageError(f"round trip: prompt {n}: the GGUF's logits differ from models/final by "
                             f"{r['max_logit_diff']:.3g} > {atol:g} (the tolerance for this type; export.check_atol)")
        if not r["same_tokens"]:
            at = r["first_difference"]
            near_tie = r["reference_gap"] is not None and r["reference_gap"] <= atol
            if not near_tie:
                raise StageError(
                    f"round trip: prompt {n}: greedy answers differ at token {at}: models/final "
                    f"{decode(r['reference_tokens'][at:at + 1])!r}, GGUF {decode(r['exported_tokens'][at:at + 1])!r} "
                    f"(not a near tie: the original prefers its token by {r['reference_gap']})")
            log.info("round trip: prompt %d: greedy answers part at token %d, a near tie (logit gap %.3g <= %g)",
                     n, at, r["reference_gap"], atol)


def llama_cpp_generate(path: Path, prompt_ids: list[list[int]], new_tokens: int, stops: Sequence[int],
                       prompts: Sequence[str]) -> Optional[list[dict]]:
    """Greedy answers from a compiled llama.cpp (the llama-cpp-python package), or None if not installed:
    its own tokenization of each prompt and its tokens."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=max(len(i) for i in prompt_ids) + new_tokens + 8, seed=0,
                verbose=False)
    out = []
    for ids, text in zip(prompt_ids, prompts):
        own = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        tokens = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if token in stops or len(tokens) >= new_tokens:
                break
        out.append({"tokenizer_matches": list(own) == list(ids), "tokens": tokens})
    return out
