"""``precision: auto`` decided by measuring this machine, not by reading its CPU flags.

    choice = choose("auto", "models/base")
    # {"precision": "bf16", "source": "probe", "bf16_speedup": 3.4, "fp32_ms": 41.0, "bf16_ms": 12.1, ...}

Why a measurement: CPU flags said "native bf16" on two machines the project ran on, and
bf16 training was 4.2x faster than fp32 (matmul peak) on one of them (AMD EPYC) and 0.59x
on the other (Intel Xeon, AVX512-BF16 without AMX), where `auto` made training 1.6x
slower. So the probe times what training does: one decoder layer's projections at the
model's own shapes, frozen fp32 weights plus a LoRA adapter, forward and backward,
plain fp32 against ``torch.autocast(bfloat16)`` (which recasts the frozen weights every
step, as in training). bf16 is chosen only when clearly faster (``CLEARLY_FASTER``).

The result is cached per machine (CPU model and flags, threads), torch version and shapes
in ``$XDG_CACHE_HOME/tunepipe/precision.json`` (default ``~/.cache``), so every stage on a
machine makes the same choice and the probe runs once; delete the file to measure again.
Results are then the same run to run on one machine but may differ across machines: set
``precision: fp32`` (or bf16) explicitly where results must match across machines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Optional

from tunepipe.cli import StageError

log = logging.getLogger("tunepipe.precision")

CLEARLY_FASTER = 1.2  # bf16 must beat fp32 by this factor: under it, noise and bf16's rounding are not worth it
PROBE_TOKENS = 512    # a training batch: 8 examples of ~60 tokens (SFT), 4 pairs of ~70 (DPO)
LORA_R = 16
# SmolLM2-135M, the default base: used when no model folder is given
DEFAULT_SHAPES = {"hidden": 576, "kv": 192, "intermediate": 1536}


def choose(precision: str, model_dir: Optional[str | Path] = None) -> dict:
    """The precision to train in and why: ``{"precision", "source", ...}`` (source: params, cuda, probe, cache)."""
    import torch

    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise StageError("precision: fp16 needs a CUDA GPU; use fp32 or auto on CPU")
        return {"precision": precision, "source": "params"}
    if torch.cuda.is_available():
        return {"precision": "bf16" if torch.cuda.is_bf16_supported() else "fp32", "source": "cuda"}
    return cpu_choice(shapes_of(model_dir))


def inference_dtype(dtype: str, model_dir: Optional[str | Path] = None) -> str:
    """A scoring stage's ``dtype`` (evaluate, forgetting): ``auto`` -> bfloat16 where training's
    ``precision: auto`` picks bf16 (measured, the same cached probe), else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if choose("auto", model_dir)["precision"] == "bf16" else "float32"


def cpu_choice(shapes: dict, tokens: int = PROBE_TOKENS) -> dict:
    """bf16 or fp32 on this CPU: from the cache, else measured now and cached."""
    key = cache_key(shapes, tokens)
    cached = _read_cache().get(key)
    if cached is not None:
        return {**cached, "source": "cache"}
    started = time.perf_counter()
    timing = measure(shapes, tokens)
    speedup = timing["fp32_ms"] / timing["bf16_ms"]
    record = {"precision": "bf16" if speedup >= CLEARLY_FASTER else "fp32", "bf16_speedup": round(speedup, 3),
              **timing, "threads": _threads(), "probe_seconds": round(time.perf_counter() - started, 3), "key": key,
              "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_cache(key, record)
    return {**record, "source": "probe"}


def describe(choice: dict) -> str:
    """One log line: the choice and the measured ratio behind it."""
    if "bf16_speedup" not in choice:
        return f"precision {choice['precision']} ({choice['source']})"
    return (f"precision {choice['precision']}: bf16 autocast ran {choice['bf16_speedup']:.2f}x fp32 at this model's "
            f"shapes ({choice['source']}; bf16 only from {CLEARLY_FASTER}x)")


# --------------------------------------------------------------------------- the probe


def shapes_of(model_dir: Optional[str | Path]) -> dict:
    """The projection sizes of one decoder layer, from the model's config.json (default: SmolLM2-135M)."""
    config = Path(model_dir) / "config.json" if model_dir is not None else None
    if config is None or not config.is_file():
        return dict(DEFAULT_SHAPES)
    cfg = json.loads(config.read_text(encoding="utf-8"))
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or DEFAULT_SHAPES["hidden"]
    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = (cfg.get("num_key_value_heads") or heads) * head_dim
    return {"hidden": int(hidden), "kv": int(kv), "intermediate": int(cfg.get("intermediate_size") or 4 * hidden)}


def measure(shapes: dict, tokens: int = PROBE_TOKENS, repeats: int = 3) -> dict:
    """Milliseconds of one LoRA decoder layer's projections, forward + backward, fp32 vs bf16 autocast."""
    layer = _ProbeLayer(shapes)
    # A first look at a few tokens: where bf16 is emulated (no native instructions) it runs 10-100x
    # slower and the full-size probe would take seconds; 10x cannot come from weight casting alone.
    small = max(8, tokens // 16)
    layer.step(small, False), layer.step(small, True)  # warm-up (oneDNN builds its kernels)
    f, b = layer.timed(small, False), layer.timed(small, True)
    if b > 10 * f:
        return {"fp32_ms": round(f * 1e3, 2), "bf16_ms": round(b * 1e3, 2), "tokens": small}
    layer.step(tokens, False), layer.step(tokens, True)
    fp32, bf16 = [], []
    for _ in range(repeats):  # alternating: a load change on a shared machine hits both alike
        fp32.append(layer.timed(tokens, False))
        bf16.append(layer.timed(tokens, True))
    return {"fp32_ms": round(statistics.median(fp32) * 1e3, 2), "bf16_ms": round(statistics.median(bf16) * 1e3, 2),
            "tokens": tokens}


class _ProbeLayer:
    """q, k, v, o, gate, up, down: frozen fp32 weights, each with a trainable rank-16 LoRA pair."""

    def __init__(self, shapes: dict):
        import torch

        g = torch.Generator().manual_seed(0)
        d, kv, i = shapes["hidden"], shapes["kv"], shapes["intermediate"]
        self.linears = []
        for n_in, n_out in ((d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)):
            w = torch.randn(n_out, n_in, generator=g) * n_in ** -0.5
            a = (torch.randn(LORA_R, n_in, generator=g) * n_in ** -0.5).requires_grad_(True)
            b = (torch.randn(n_out, LORA_R, generator=g) * 0.01).requires_grad_(True)
            self.linears.append((w, a, b))
        self.generator = g

    def step(self, tokens: int, autocast: bool) -> None:
        import torch
        from torch.nn.functional import linear

        inputs = [torch.randn(tokens, w.shape[1], generator=self.generator).requires_grad_(True)
                  for w, _, _ in self.linears]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = sum((linear(x, w) + linear(linear(x, a), b)).float().square().mean()
                       for x, (w, a, b) in zip(inputs, self.linears))
        loss.backward()  # input gradients (earlier layers need them) and LoRA weight gradients

    def timed(self, tokens: int, autocast: bool) -> float:
        start = time.perf_counter()
        self.step(tokens, autocast)
        return time.perf_counter() - start


# --------------------------------------------------------------------------- the cache


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "tunepipe" / "precision.json"


def cache_key(shapes: dict, tokens: int) -> str:
    """What the ratio depends on: the CPU (model name and flags), torch, shapes. Not the thread count,
    which follows the load at the moment: one machine keeps one decision (and gives the same results)."""
    import torch

    cpu, flags = _cpu_identity()
    return (f"{cpu} [flags {flags}] | torch {torch.__version__} | "
            f"d{shapes['hidden']} kv{shapes['kv']} i{shapes['intermediate']} r{LORA_R} t{tokens}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _cpu_identity() -> tuple[str, str]:
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), "-"
    model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith(("model name", "Model"))),
                 platform.machine())
    flags = next((l.split(":", 1)[1] for l in lines if l.startswith(("flags", "Features"))), "")
    # two machines sold under one name ("AMD EPYC") differed in exactly these flags
    return model, hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:10]


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, record: dict) -> None:
    """Add one record (atomically: stages may probe at the same time); a read-only home only logs."""
    from tunepipe.artifacts import write_json

    try:
        write_json(cache_file(), {**_read_cache(), key: record})
    except OSError as exc:
        log.warning("cannot cache the precision probe in %s: %s", cache_file(), exc)
