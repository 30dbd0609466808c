"""Loading models and tokenizers, setting them up for LoRA / QLoRA / full training, and merging adapters.

Every stage that touches weights goes through here, so the safety rules live in
one place: safetensors only, remote code only when params allow it, and a clear
error (naming the file) for a missing or damaged weights file.

    tok = load_tokenizer("data/tokenized/tokenizer")
    model = load_model("models/base", dtype="float32")
    fit_embeddings(model, tok)                          # only grows when a pad token was added
    model = with_adapters_merged(model, ["models/sft", "models/dpo"])

torch, transformers and peft are imported inside the functions, so importing
this module is cheap (stages import it before params are validated).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from tunepipe.cli import StageError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunepipe.params import TrainCommon

log = logging.getLogger("tunepipe.modeling")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
ADAPTER_CONFIG = "adapter_config.json"
SKIPPED = "skipped.json"  # a training stage's whole output when it had nothing to train on


# --------------------------------------------------------------------------- loading


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, DTYPES[name])
    except KeyError:
        raise StageError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPES))}") from None


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise StageError(f"{path}: tokenizer folder not found (run the stage that writes it first)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot load the tokenizer: {exc}") from None


def check_safetensors(path: str | Path) -> list[Path]:
    """Every weights file in ``path`` is a readable safetensors file; else StageError naming it."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".gguf"})
        hint = f" (found {', '.join(other)}: only safetensors weights are loaded)" if other else ""
        raise StageError(f"{path}: no .safetensors weights file{hint}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if keys:  # the header can be intact while the data is cut short
                    st.get_slice(keys[-1])
            _check_safetensors_size(f)
        except StageError:
            raise
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise StageError(f"{f}: corrupt or truncated safetensors file ({exc}); re-run the stage that wrote it") from None
    return files


def _check_safetensors_size(f: Path) -> None:
    """The header promises byte ranges; a truncated file ends before the last one."""
    import struct

    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if f.stat().st_size < 8 + n + end:
        raise StageError(f"{f}: truncated safetensors file ({f.stat().st_size} bytes, header needs {8 + n + end}); "
                         "re-run the stage that wrote it")


def load_model(path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False,
               quantization=None) -> "PreTrainedModel":
    """A causal LM from a plain folder of safetensors weights (``quantization``: a BitsAndBytesConfig or None)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise StageError(f"{path}: not a model folder (no config.json)")
    check_safetensors(path)
    kwargs = {"dtype": torch_dtype(dtype), "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        import torch

        if torch.cuda.is_available():  # 4-bit weights cannot move after loading: each process loads onto its GPU
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot load the model: {exc}") from None


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer gained tokens (an added pad); never shrink them."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        log.info("resizing embeddings %d -> %d for the added pad token",
                 model.get_input_embeddings().weight.shape[0], len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id


# --------------------------------------------------------------------------- adapters


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def skipped_reason(path: str | Path) -> Optional[str]:
    """Why a training stage trained nothing (its output folder holds only skipped.json), or None."""
    marker = Path(path) / SKIPPED
    if not marker.is_file():
        return None
    from tunepipe.artifacts import read_json

    return read_json(marker)["skipped"]


def with_adapters_merged(model, adapter_dirs: Iterable[str | Path]) -> "PreTrainedModel":
    """Load each PEFT adapter in order and merge it into the weights (base + SFT + DPO composes)."""
    from peft import PeftModel

    for adapter in adapter_dirs:
        adapter = Path(adapter)
        if not is_adapter_dir(adapter):
            raise StageError(f"{adapter}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        check_safetensors(adapter)
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
    return model


def load_merged(base_dir: str | Path, stage_dirs: Iterable[str | Path], tokenizer=None, *,
                dtype: str = "float32", trust_remote_code: bool = False) -> "PreTrainedModel":
    """The model a chain of training stages produced: the base, then each stage's adapter merged in.

    A stage trained with ``method: full`` saves a whole model instead of an adapter;
    the chain then restarts from the last such folder.
    """
    stage_dirs = [Path(d) for d in stage_dirs]
    start = Path(base_dir)
    for i, d in enumerate(stage_dirs):
        if not is_adapter_dir(d) and (d / "config.json").is_file():
            start, stage_dirs = d, stage_dirs[i + 1:]
    model = load_model(start, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return with_adapters_merged(model, stage_dirs)


# The models the evaluation stages score, by name, as the folders each is made of: sft is the
# base with its adapter merged in memory, export the GGUF that ships, read back by transformers.
NAMED_MODELS = {"base": (Path("models/base"),), "sft": (Path("models/base"), Path("models/sft")),
                "final": (Path("models/final"),), "export": (Path("models/export"),)}
_MADE_BY = {"base": "fetch", "sft": "train-sft", "final": "merge", "export": "export"}


def check_named_model(name: str, listed_in: str) -> None:
    """Fail with the fix when a folder the model called ``name`` needs is missing (before any loading)."""
    for path in NAMED_MODELS[name]:
        if not path.is_dir():
            raise StageError(f"{path} is missing; it is needed for '{name}' (dvc repro {_MADE_BY[path.name]}, "
                             f"or drop '{name}' from {listed_in})")


def load_named_model(name: str, tokenizer, *, trust_remote_code: bool = False) -> "PreTrainedModel":
    """The model called ``name`` (NAMED_MODELS) in float32, its embeddings fitted to ``tokenizer``."""
    start, *adapters = NAMED_MODELS[name]
    if name == "export":
        return load_gguf_model(start, tokenizer)
    return load_merged(start, adapters, tokenizer, trust_remote_code=trust_remote_code)


def load_gguf_model(folder: str | Path, tokenizer=None) -> "PreTrainedModel":
    """The causal LM in the one .gguf file of ``folder`` (models/export), as transformers' GGUF
    reader loads it: dequantized to float32, so it computes what the exported weights hold."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise StageError(f"{folder}: expected one .gguf file, found {len(found)} (run the export stage)")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=found[0].name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"{found[0]}: transformers cannot read the GGUF: {exc}") from None
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model


# --------------------------------------------------------------------------- compute


@functools.lru_cache(maxsize=None)  # decided once per process (each stage is one)
def set_cpu_threads() -> int:
    """Torch CPU threads: every free core, measured now; TUNEPIPE_THREADS overrides.

    On the project's 2-core VM, while another process keeps one core busy, 2 threads
    run a SmolLM2-135M forward 4-5x slower than 1 thread (every op waits for the
    descheduled thread); on an idle machine 2 threads are about 2x faster. So count
    the cores other processes use over half a second and leave those alone.
    """
    import torch

    if os.environ.get("TUNEPIPE_THREADS"):
        n = int(os.environ["TUNEPIPE_THREADS"])
    elif torch.cuda.is_available():
        return torch.get_num_threads()
    elif "LOCAL_WORLD_SIZE" in os.environ:  # one of several training processes on this machine: share the cores
        n = max(1, len(os.sched_getaffinity(0)) // int(os.environ["LOCAL_WORLD_SIZE"]))
    else:
        cores = len(os.sched_getaffinity(0))
        n = max(1, cores - round(_busy_cores(cores)))
    torch.set_num_threads(n)
    log.info("using %d CPU thread(s)", n)
    return n


def _busy_cores(cores: int, interval: float = 0.5) -> float:
    def snapshot():
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(interval)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return 0.0
    return cores * (1 - (idle1 - idle0) / max(1, total1 - total0))


# --------------------------------------------------------------------------- training setup


def resolve_precision(precision: str, model_dir: Optional[str | Path] = None) -> str:
    """``auto`` -> the precision this machine trains fastest in: bf16 on CUDA GPUs with bf16; on a CPU,
    bf16 autocast only where a short measurement at the model's shapes finds it clearly faster
    (tunepipe.precision, which also says why: ``choose`` returns the measured ratio).

    CPU flags do not tell: two CPUs with AVX512-BF16 ran bf16 matmuls at 4.2x and 0.59x fp32.
    """
    from tunepipe.precision import choose

    return choose(precision, model_dir)["precision"]


def lora_config(cfg: "TrainCommon"):
    """The adapter of ``cfg``: LoRA, DoRA (``use_dora``: a magnitude per output trained apart from the
    LoRA direction; merges like LoRA) and/or rsLoRA (``use_rslora``: scaling lora_alpha/sqrt(r))."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM",
                      use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)


def quantization_config(cfg: "TrainCommon"):
    """QLoRA's 4-bit base: NF4 (or FP4) with double quantization, computing in ``bnb_4bit_compute_dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(cfg.bnb_4bit_compute_dtype))


def check_qlora_available() -> None:
    """QLoRA needs bitsandbytes; fail before loading anything if it is missing."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise StageError("method: qlora needs the bitsandbytes package (pip install bitsandbytes), "
                         "or use method: lora")


def prepare_for_training(model, cfg: "TrainCommon"):
    """Set up ``model`` for ``cfg.method``; returns (model, peft_config or None for full fine-tuning).

    The PEFT adapter itself is added by the TRL trainer from the returned config,
    after the trainer has seeded everything, so the adapter's initial weights
    depend only on ``shared.seed``.
    """
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and freezes the 4-bit weights; checkpointing keeps 4-bit activations small.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, lora_config(cfg)


def load_for_training(base_dir: str | Path, cfg: "TrainCommon", tokenizer, *, trust_remote_code: bool,
                      merged_stage_dirs: Iterable[str | Path] = ()):
    """The model to train (base with earlier stages merged in) and its PEFT config.

    QLoRA quantizes only after the earlier adapters are merged in full precision:
    merging into dequantized 4-bit weights would bake the rounding error in.
    """
    merged_stage_dirs = list(merged_stage_dirs)
    if cfg.method != "qlora":
        model = load_merged(base_dir, merged_stage_dirs, tokenizer, trust_remote_code=trust_remote_code)
        return prepare_for_training(model, cfg)
    check_qlora_available()
    if merged_stage_dirs:
        import tempfile

        merged = load_merged(base_dir, merged_stage_dirs, tokenizer, trust_remote_code=trust_remote_code)
        with tempfile.TemporaryDirectory(prefix="tunepipe-merged-") as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            del merged
            model = load_model(tmp, trust_remote_code=trust_remote_code, quantization=quantization_config(cfg))
    else:
        model = load_model(base_dir, trust_remote_code=trust_remote_code, quantization=quantization_config(cfg))
    fit_embeddings(model, tokenizer)
    return prepare_for_training(model, cfg)


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def read_tokenizer_info(tokenized_dir: str | Path) -> dict:
    """``data/tokenized/info.json`` (pad/eos ids, whether a pad token was added)."""
    from tunepipe.artifacts import read_json

    path = Path(tokenized_dir) / "info.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; run the tokenize stage first")
    return read_json(path)


def adapter_summary(path: str | Path) -> Optional[dict]:
    path = Path(path) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return {k: cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
