"""Batched generation for evaluation: left padding, the KV cache, a stop per sequence.

Prompts are sorted by length (longest first, so a memory problem shows in the
first batch) to keep padding small, generated in batches, and returned in the
caller's order. Greedy decoding gives exactly what ``model.generate`` gives one
prompt at a time: left padding plus the attention mask leave each row's tokens
and positions unchanged.

    decoding = Decoding.from_params(params.evaluate)
    outs = generate(model, tokenizer, prompts, decoding, batch_size=48)
    outs[0].text, outs[0].n_new_tokens, outs[0].stopped_at_eos, outs[0].truncated
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence


@dataclass(frozen=True)
class Decoding:
    """Decoding settings (params.evaluate); greedy unless do_sample."""

    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50

    @classmethod
    def from_params(cls, cfg) -> "Decoding":
        return cls(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                   temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)


@dataclass(frozen=True)
class Generation:
    text: str               # the answer, decoded without special tokens and without the EOS
    n_new_tokens: int       # tokens the model generated, the EOS included when it stopped
    stopped_at_eos: bool
    truncated: bool         # ran into max_new_tokens without an EOS


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts, by the tokenize stage's rule, so the model
    sees exactly what it was trained on (one BOS where the tokenizer uses one)."""
    from tunepipe.tokenization import adds_bos
    from tunepipe.tokenization import encode_prompts as encode

    return encode(tokenizer, list(prompts), adds_bos(tokenizer)) if prompts else []


def pad_id_for(model, tokenizer) -> int:
    """The tokenizer's pad, unless the model has no embedding for it (a pad the
    tokenize stage added, on a model not resized for it): then id 0. Padded
    positions are masked, but generate feeds the pad back in after a row's EOS,
    so it must be a valid input id."""
    pad = tokenizer.pad_token_id
    n_embeddings = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else None
    if pad is None or (n_embeddings is not None and pad >= n_embeddings):
        return 0
    return pad


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation EOS(s)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer and the model's generation config define no EOS token")
    return sorted(ids)


def generation_config(decoding: Decoding, *, eos: list[int], pad_id: int):
    """A complete GenerationConfig, so no model default (a repetition penalty, a
    sampling temperature) silently changes what is evaluated."""
    from transformers import GenerationConfig

    sampling = dict(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k) \
        if decoding.do_sample else {}
    return GenerationConfig(
        max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample, num_beams=1,
        repetition_penalty=1.0, use_cache=True, eos_token_id=eos, pad_token_id=pad_id, **sampling)


def generate(model, tokenizer, prompts: Sequence[str], decoding: Decoding = Decoding(), *,
             batch_size: int = 16, eos_token_ids: Optional[Iterable[int]] = None,
             desc: str = "generate") -> list[Generation]:
    """Generate an answer for every prompt, in the order given."""
    if not prompts:
        return []
    eos = sorted(set(eos_token_ids)) if eos_token_ids is not None else eos_ids(model, tokenizer)
    pad_id = pad_id_for(model, tokenizer)
    config = generation_config(decoding, eos=eos, pad_id=pad_id)
    encoded = encode_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    results: list[Optional[Generation]] = [None] * len(prompts)
    for batch in inference_batches(model, [len(e) for e in encoded], batch_size, desc):
        input_ids, attention = left_pad([encoded[i] for i in batch], pad_id)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             generation_config=config)
        for i, tokens in zip(batch, out[:, input_ids.shape[1]:].tolist()):
            results[i] = _split_answer(tokens, set(eos), decoding.max_new_tokens, tokenizer)
    return results


def inference_batches(model, lengths: Sequence[int], batch_size: int, desc: str) -> Iterator[list[int]]:
    """Indices of the items in batches, longest first, under a progress bar, with the model
    in eval mode and autograd off (its mode is restored after).

    Longest first keeps the padding in each batch small and shows a memory problem at once.
    """
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="prompt") as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                yield batch
                bar.update(len(batch))
    finally:
        model.train(was_training)


def left_pad(rows: list[list[int]], pad_id: int):
    """(ids, attention mask) with each row's tokens at the right end."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        if row:
            ids[k, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[k, width - len(row):] = 1
    return ids, mask


def _split_answer(tokens: list[int], eos: set[int], max_new_tokens: int, tokenizer) -> Generation:
    """Cut a generated row at its first EOS; what follows is padding from the batch."""
    stop = next((j for j, t in enumerate(tokens) if t in eos), None)
    answer = tokens if stop is None else tokens[:stop]
    n_new = len(tokens) if stop is None else stop + 1
    return Generation(
        text=tokenizer.decode(answer, skip_special_tokens=True),
        n_new_tokens=n_new,
        stopped_at_eos=stop is not None,
        truncated=stop is None and n_new >= max_new_tokens,
    )
