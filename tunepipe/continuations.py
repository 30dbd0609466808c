"""Log-likelihoods of continuations that share a context, each context computed once.

Used by the forgetting guard (through lm-eval) and by evaluate (preference pairs,
reference answers).

lm-eval scores a multiple-choice item as one (context, choice) sequence per choice:
ARC-Easy's question runs through the model four times, and its log-softmax covers
every position of the padded batch (lm-eval's own TODO asks for this). Here each
context is packed once into a row, followed by each choice (all but its last token)
at the positions that continue it; tunepipe.attention's packed SDPA lets every
choice attend to its context's one copy, and the LM head runs only where a choice
token is predicted. The numbers are lm-eval's (same tokens, same positions) to
within float rounding.

    from tunepipe.attention import use_packed_sdpa
    from tunepipe.continuations import shared_context_hflm
    use_packed_sdpa(model)   # needed: an SDPA model switched to the packed SDPA
    lm = shared_context_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=32)  # an lm-eval HFLM

Requests it cannot pack (longer than the model's context, an automatic batch size)
go to HFLM's own path.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Sequence

TOKENS_PER_BATCH_ITEM = 32  # a row holds about batch_size x this many tokens (8-64: within 15% on ARC-Easy)


def shared_context_hflm():
    """lm-eval's HFLM, whose log-likelihoods compute each context once (module docstring)."""
    from lm_eval.models.huggingface import HFLM

    class SharedContextHFLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            too_long = any(len(ctx) + len(cont) > self.max_length + 1 for _, ctx, cont in requests)
            if self.backend != "causal" or too_long or not isinstance(self.batch_size, int):
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            out = score(self.model, [(ctx, cont) for _, ctx, cont in requests], desc="forgetting: score",
                        tokens_per_row=self.batch_size * TOKENS_PER_BATCH_ITEM, show_progress=not disable_tqdm)
            for (request, _, _), answer in zip(requests, out):
                if request is not None:  # rolling windows come without one
                    self.cache_hook.add_partial("loglikelihood", request, answer)
            return out

    return SharedContextHFLM


def score(model, requests: Sequence[tuple[list[int], list[int]]], *, tokens_per_row: int,
          show_progress: bool = False, desc: str = "score") -> list[tuple[float, bool]]:
    """(sum of log-probs of ``cont`` given ``ctx``, whether greedy decoding gives ``cont``) for each
    (ctx, cont) request, in order. The model must run tunepipe.attention's packed SDPA.

    Contexts are packed sorted, each continuing what it shares with the one before it in its row
    (a chat template's system prompt: once per row)."""
    from tqdm.auto import tqdm

    from tunepipe.shared_prefix import common_prefix_length

    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (ctx, _) in enumerate(requests):
        groups[tuple(ctx)].append(i)
    rows, row, size, previous = [], [], 0, ()
    for ctx in sorted(groups):
        members = groups[ctx]
        shared = min(common_prefix_length(ctx, previous), len(ctx) - 1) if row else 0
        tokens = len(ctx) - shared + sum(len(requests[i][1]) - 1 for i in members)
        if row and size + tokens > tokens_per_row:
            rows.append(row)
            row, size, shared = [], 0, 0
            tokens = len(ctx) + sum(len(requests[i][1]) - 1 for i in members)
        row.append((list(ctx), shared, members))
        size += tokens
        previous = ctx
    rows += [row] if row else []
    out: list = [None] * len(requests)
    for row in tqdm(rows, desc=desc, unit="row", disable=not show_progress):
        for i, answer in _score_row(model, row, requests):
            out[i] = answer
    return out


def _score_row(model, row, requests):
    """One packed row: each context (from where it stops sharing the one before), then each of
    its continuations (all but the last token) at the positions that continue the context."""
    import torch

    ids, pos, predictors = [], [], {}  # predictors[i]: the row positions whose logits predict cont i
    for ctx, shared, members in row:
        ids += ctx[shared:]
        pos += range(shared, len(ctx))
        last = len(ids) - 1  # the context's last token: it predicts every continuation's first
        for i in members:
            body = requests[i][1][:-1]
            predictors[i] = [last] + list(range(len(ids), len(ids) + len(body)))
            ids += body
            pos += range(len(ctx), len(ctx) + len(body))
    kept = sorted({p for ps in predictors.values() for p in ps})
    where = {p: k for k, p in enumerate(kept)}
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = _logits(model, torch.tensor([ids], device=device), torch.tensor([pos], device=device),
                         torch.tensor(kept, device=device))
        logp = torch.log_softmax(logits.float(), dim=-1)
        for i, ps in predictors.items():
            cont = torch.tensor(requests[i][1], device=device)
            rows = logp[[where[p] for p in ps]]
            yield i, (float(rows.gather(-1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all()))


def _logits(model, ids, pos, kept):
    """Logits at the ``kept`` positions only, where the model can skip the LM head elsewhere."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, position_ids=pos, logits_to_keep=kept, use_cache=False).logits[0]
    return model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, kept]
