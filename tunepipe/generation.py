"""Batched generation for evaluation: left padding, the KV cache, a stop per sequence.

Prompts are sorted by length (longest first, so a memory problem shows in the
first batch) to keep padding small, generated in batches, and returned in the
caller's order. Greedy decoding gives what ``model.generate`` gives one prompt
at a time: left padding plus the attention mask leave each row's tokens and
positions unchanged. The decoding loop is our own, not ``model.generate``, for
two savings generate cannot make (see decode_batch); benchmarks.generate
measures them against the one-prompt-at-a-time loop.

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
    def from_params(cls, cfg, max_new_tokens: Optional[int] = None) -> "Decoding":
        """``max_new_tokens`` overrides cfg's (which may be "auto": see answer_length_limit)."""
        return cls(max_new_tokens=max_new_tokens or cfg.max_new_tokens, do_sample=cfg.do_sample,
                   temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)


def answer_length_limit(tokenizer, answers: Sequence[str], cap: int) -> tuple[int, str]:
    """(max_new_tokens, how it was chosen) for answers like ``answers`` (the training references).

    The 95th percentile of their length, with a quarter to spare plus room for the EOS and a
    few tokens of drift, so a model that answers like the references is never cut, and one
    that rambles is cut soon; capped, as generation cost grows with it.
    """
    import numpy as np

    if not answers:
        raise ValueError("no training answers to derive evaluate.max_new_tokens from; set it to a number")
    lengths = [len(ids) for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]
    p95 = int(np.ceil(np.percentile(lengths, 95)))
    limit = min(cap, int(np.ceil(p95 * 1.25)) + 8)
    return limit, (f"auto: 95th percentile of {len(lengths)} training answers ({p95} tokens) x 1.25 + 8"
                   + (f", capped at evaluate.max_new_tokens_cap={cap}" if limit == cap else ""))


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


def generate(model, tokenizer, prompts: Sequence[str], decoding: Decoding = Decoding(), *,
             batch_size: int = 16, eos_token_ids: Optional[Iterable[int]] = None,
             desc: str = "generate") -> list[Generation]:
    """Generate an answer for every prompt, in the order given."""
    if not prompts:
        return []
    eos = sorted(set(eos_token_ids)) if eos_token_ids is not None else eos_ids(model, tokenizer)
    pad_id = pad_id_for(model, tokenizer)
    encoded = encode_prompts(tokenizer, prompts)
    results: list[Optional[Generation]] = [None] * len(prompts)
    for batch in inference_batches(model, [len(e) for e in encoded], batch_size, desc):
        new_tokens = decode_batch(model, [encoded[i] for i in batch], decoding, eos, pad_id)
        for i, tokens in zip(batch, new_tokens):
            results[i] = _split_answer(tokens, set(eos), decoding.max_new_tokens, tokenizer)
    return results


def decode_batch(model, rows: list[list[int]], decoding: Decoding, eos: list[int], pad_id: int) -> list[list[int]]:
    """The new tokens of each prompt, up to and including its EOS (or max_new_tokens of them).

    Two things make this faster than ``model.generate`` on the same batch, with the
    same greedy tokens: the prefix all prompts share (the system prompt and chat
    header, ~40% of a templated prompt here) runs once and its KV cache is copied
    to every row; and a row that reached its EOS leaves the batch and the cache
    instead of being computed, padded, until the longest answer ends.
    """
    import torch

    device = next(model.parameters()).device
    cache, shared = shared_prefix_cache(model, rows, device)
    ids, mask = left_pad([r[shared:] for r in rows], pad_id)
    # [shared prefix | left padding | rest of the prompt]; positions count real tokens only
    mask = torch.cat([torch.ones(len(rows), shared, dtype=mask.dtype), mask], 1).to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, shared:]
    step_out = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions,
                     past_key_values=cache, use_cache=True, logits_to_keep=1)
    last, pick, stops = positions[:, -1:], token_picker(decoding), torch.tensor(eos, device=device)
    out: list[list[int]] = [[] for _ in rows]
    alive = list(range(len(rows)))  # the rows still in the batch
    for step in range(decoding.max_new_tokens):
        cache, nxt = step_out.past_key_values, pick(step_out.logits[:, -1])
        for row, token in zip(alive, nxt.tolist()):
            out[row].append(token)
        going = ~torch.isin(nxt, stops)
        if step == decoding.max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive = [alive[k] for k in keep.tolist()]
            nxt, mask, last = nxt[keep], mask[keep], last[keep]
        mask, last = torch.cat([mask, mask.new_ones(len(alive), 1)], 1), last + 1
        step_out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last,
                         past_key_values=cache, use_cache=True)
    return out


def shared_prefix_cache(model, rows: list[list[int]], device, min_tokens: int = 4):
    """(KV cache of the tokens every row starts with, repeated for each row, its length),
    or (None, 0) when they share fewer than ``min_tokens``. Every row keeps at least one
    token of its own, so the first new token is predicted from the row's own logits."""
    import torch

    shared = 0
    limit = min(len(r) for r in rows) - 1
    while shared < limit and all(r[shared] == rows[0][shared] for r in rows):
        shared += 1
    if shared < min_tokens:
        return None, 0
    cache = model(input_ids=torch.tensor([rows[0][:shared]], device=device), use_cache=True,
                  logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(len(rows))
    return cache, shared


def token_picker(decoding: Decoding):
    """Logits of the last position -> the next token of each row: argmax, or a sample after
    transformers' own temperature / top-k / top-p warpers (in generate's order)."""
    import torch

    if not decoding.do_sample:
        return lambda logits: logits.argmax(-1)
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if decoding.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(decoding.temperature))
    if decoding.top_k:
        warpers.append(TopKLogitsWarper(decoding.top_k))
    if decoding.top_p < 1.0:
        warpers.append(TopPLogitsWarper(decoding.top_p))
    return lambda logits: torch.multinomial(warpers(None, logits.float()).softmax(-1), 1).squeeze(1)


def inference_batches(model, lengths: Sequence[int], batch_size: int, desc: str) -> Iterator[list[int]]:
    """Indices of the items in batches, longest first, under a progress bar, with the model
    in eval mode, autograd off and its LM head fed contiguous inputs (all restored after).

    Longest first keeps the padding in each batch small and shows a memory problem at once.
    """
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hook = head.register_forward_pre_hook(_contiguous_inputs) if head is not None else None
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="prompt") as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                yield batch
                bar.update(len(batch))
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()


def _contiguous_inputs(module, args):
    """transformers hands the LM head ``hidden_states[:, -1:]``, a strided view. With a frozen bf16
    weight (an adapter merged in memory: evaluate@sft), torch's linear then copied the whole head
    for every row: 7 s against 0.02 s for a batch of 48 at SmolLM2's size on a 2-core AMD EPYC."""
    return tuple(a.contiguous() if hasattr(a, "contiguous") else a for a in args)


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
