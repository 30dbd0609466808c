"""Single levers, measured in isolation on the real model's shapes (cheap enough to run on every `make bench`).

    python -m benchmarks.levers [--repeats 3]

Each lever times the same work two ways, alternating, median of ``repeats``:

    bf16_autocast        one SmolLM2 decoder layer, forward + backward on one example (120 tokens),
                         fp32 vs torch.autocast(bfloat16)          (expected to lose on an AVX2-only CPU)
    label_only_lm_head   LM head + cross-entropy, forward + backward, on every position vs only the answer
                         (label != -100) positions               (TRL 1.16's default fused head does this)
    no_checkpointing     two decoder layers, forward + backward, with vs without activation checkpointing
    packed_attention     two decoder layers, forward + backward, on 8 long examples (256 tokens) packed in one
                         row: SDPA with transformers' block-diagonal mask vs tunepipe.attention's one causal
                         call over the examples as rows (at the default data's ~60 tokens it is a wash)
    fast_lora_dropout    the LoRA dropouts of one decoder layer (six of the hidden size, one of the MLP's), forward +
                         backward on 960 tokens: nn.Dropout vs tunepipe.dropout's (a quarter of the random draws)
    tiled_log_probs      the LM head's log-probs, entropy and top-1 flags (what TRL's SFTTrainer asks for), forward +
                         backward, on 960 tokens that all carry a label (long answers): TRL's own CPU fold
                         (trl.kernels.ChunkedLogProbFunction) vs tunepipe.lm_head's tiles
    batched_map          tokenizing the templated SFT records with datasets.map, one row at a time vs batched

"speedup" is always lever-on over lever-off time (>1: the lever pays).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks import harness

TOKENS = 960          # a batch of 8 examples of ~120 tokens, packed (what train-sft sees)
LABEL_TOKENS = 64     # ~8 answer tokens each: only these carry loss
BF16_TOKENS = 120     # one example: emulated bf16 runs at ~1/30 of fp32 here, a whole batch takes minutes
PACKED_EXAMPLES, PACKED_LENGTH = 8, 256  # long examples: where a mask over the whole row wastes most


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def compare(off, on, repeats: int) -> dict:
    off(), on()  # warm-up
    t_off, t_on = [], []
    for _ in range(repeats):
        t_off += _time(off, 1)
        t_on += _time(on, 1)
    m_off, m_on = statistics.median(t_off), statistics.median(t_on)
    return {"off_seconds": round(m_off, 4), "on_seconds": round(m_on, 4), "speedup": round(m_off / m_on, 2)}


def llama_config(ws: Path):
    from transformers import LlamaConfig

    cfg = json.loads((ws / "models/base/config.json").read_text())
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k in LlamaConfig().to_dict()})
    config._attn_implementation = "sdpa"
    return config


def decoder_step(layers, config, x, autocast=False, checkpoint=False, pos=None, mask=None):
    import torch
    from torch.utils.checkpoint import checkpoint as ckpt
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    pos = torch.arange(x.shape[1])[None] if pos is None else pos
    rope = LlamaRotaryEmbedding(config)(x, pos)

    def run():
        h = x
        for layer in layers:
            h = ckpt(layer, h, position_embeddings=rope, position_ids=pos, use_reentrant=False) if checkpoint \
                else layer(h, position_embeddings=rope, position_ids=pos, attention_mask=mask)
            h = h[0] if isinstance(h, tuple) else h
        h.float().square().mean().backward()

    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run()
    else:
        run()


def main(repeats: int = 3, ws: Path | None = None) -> dict:
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    ws = harness.workspace(ws)
    torch.manual_seed(0)
    config = llama_config(ws)
    d, vocab = config.hidden_size, config.vocab_size
    layers = [LlamaDecoderLayer(config, i) for i in range(2)]
    x = torch.randn(1, TOKENS, d, requires_grad=True)
    rows = []

    one = x[:, :BF16_TOKENS].detach().requires_grad_(True)
    r = compare(lambda: decoder_step(layers[:1], config, one),
                lambda: decoder_step(layers[:1], config, one, autocast=True), max(1, repeats - 2))
    rows.append({"lever": "bf16_autocast", **r, "kept": r["speedup"] > 1.05})

    head = torch.nn.Linear(d, vocab, bias=False)
    h = torch.randn(TOKENS, d, requires_grad=True)
    labels = torch.full((TOKENS,), -100)
    labels[torch.randperm(TOKENS)[:LABEL_TOKENS]] = torch.randint(0, vocab, (LABEL_TOKENS,))

    def full_head():
        torch.nn.functional.cross_entropy(head(h), labels, ignore_index=-100).backward()

    def label_head():
        keep = labels != -100
        torch.nn.functional.cross_entropy(head(h[keep]), labels[keep]).backward()

    r = compare(full_head, label_head, repeats)
    rows.append({"lever": "label_only_lm_head", **r, "kept": r["speedup"] > 1.05})

    r = compare(lambda: decoder_step(layers, config, x, checkpoint=True), lambda: decoder_step(layers, config, x),
                repeats)
    rows.append({"lever": "no_checkpointing", **r, "kept": r["speedup"] > 1.0})

    rows.append({"lever": "packed_attention", **packed_attention(layers, config, repeats)})
    rows[-1]["kept"] = rows[-1]["speedup"] > 1.05

    rows.append({"lever": "fast_lora_dropout", **lora_dropouts(config, repeats)})
    rows[-1]["kept"] = rows[-1]["speedup"] > 1.05

    rows.append({"lever": "tiled_log_probs", **tiled_log_probs(head.weight.detach(), repeats)})
    rows[-1]["kept"] = rows[-1]["speedup"] > 1.05

    rows.append({"lever": "batched_map", **batched_map(ws, repeats)})
    rows[-1]["kept"] = rows[-1]["speedup"] > 1.05
    return {"command": f"python -m benchmarks.levers --repeats {repeats}", "tokens": TOKENS,
            "label_tokens": LABEL_TOKENS, "rows": rows}


def packed_attention(layers, config, repeats: int) -> dict:
    import torch

    from tunepipe.attention import PACKED_SDPA, register_packed_sdpa

    register_packed_sdpa()
    n, length = PACKED_EXAMPLES, PACKED_LENGTH
    x = torch.randn(1, n * length, config.hidden_size, requires_grad=True)
    pos = torch.arange(length).repeat(n)[None]
    example = torch.arange(n).repeat_interleave(length)
    causal = pos[0][:, None] >= pos[0][None, :]
    mask = ((example[:, None] == example[None, :]) & causal)[None, None]  # what transformers builds

    def step(implementation):
        config._attn_implementation = implementation  # the layers read it at every call
        decoder_step(layers, config, x, pos=pos, mask=mask)

    try:
        return compare(lambda: step("sdpa"), lambda: step(PACKED_SDPA), repeats)
    finally:
        config._attn_implementation = "sdpa"


def lora_dropouts(config, repeats: int) -> dict:
    import torch

    from tunepipe.dropout import FastDropout

    inputs = [torch.randn(1, TOKENS, width, requires_grad=True)
              for width in [config.hidden_size] * 6 + [config.intermediate_size]]

    def step(dropout):
        for x in inputs:
            dropout(x).sum().backward()

    return compare(lambda: step(torch.nn.Dropout(0.05)), lambda: step(FastDropout(0.05)), repeats)


def tiled_log_probs(weight, repeats: int) -> dict:
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from tunepipe.lm_head import TiledLogProbs

    h = torch.randn(TOKENS, weight.shape[1], requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (TOKENS,))
    outputs = ("log_probs", "entropy", "is_top1")

    def step(out):
        (-out[0].mean()).backward()

    return compare(lambda: step(ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, 32768, None, 1.0, outputs)),
                   lambda: step(TiledLogProbs.apply(h, weight, None, targets, outputs)), repeats)


def batched_map(ws: Path, repeats: int) -> dict:
    from datasets import Dataset

    from tunepipe.modeling import load_tokenizer

    tok = load_tokenizer(ws / "data/tokenized/tokenizer")
    templated = ws / "data/templated/sft_train.jsonl"
    if templated.is_file():
        from tunepipe.artifacts import read_jsonl

        texts = [r["prompt"] + r["completion"] for r in read_jsonl(templated)]
    else:
        texts = list(Dataset.load_from_disk(str(ws / "data/tokenized/pref/train"))["prompt"])
    ds = Dataset.from_dict({"text": texts})
    kw = dict(keep_in_memory=True, load_from_cache_file=False)
    return compare(lambda: ds.map(lambda r: tok(r["text"]), **kw),
                   lambda: ds.map(lambda b: tok(b["text"]), batched=True, **kw), repeats)


def report(result: dict) -> str:
    return (f"levers in isolation ({result['tokens']} packed tokens, {result['label_tokens']} of them labels)\n"
            + harness.table(result["rows"], ["lever", "off_seconds", "on_seconds", "speedup", "kept"]))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    res = main(a.repeats)
    harness.save_results("levers", res)
    print(report(res))
