"""The LM head's per-token log-probs on a CPU, in tiles that stay in cache.

TRL scores tokens through ``trl.kernels.ChunkedLogProbFunction``: the LM head in tiles
of up to [4096 tokens x 32768 vocab], folded into online-logsumexp statistics. On a
device without Triton the fold is a dozen torch ops, each allocating and sweeping a
fresh tile (262 MB in fp32 for a step's 2000 labelled tokens): on long answers, where
most positions carry a label, that was half of a train-sft step on a 2-core CPU
(profiled: aten::mul, sub, exp and fill of those tiles); timed alone, the fold took 2.6
times as long as the head's matmuls.

``TiledLogProbs`` computes the same outputs (log-probs; entropy, mean logit and is_top1 when asked)
over tiles of ``TOKENS`` tokens x the whole vocabulary, in two buffers reused by every
tile: one matmul, one max, one exp pass, and the gradient formed in place. The backward
recomputes each tile, as TRL's does, and like TRL's runs its matmuls in fp32 when the
forward ran under autocast. Forward + backward of 2000 tokens of SmolLM2's head took
1.7 s against TRL's 5.2-5.5 s on a 2-core Intel Xeon (benchmarks/RESULTS.md).

    from tunepipe.lm_head import use_tiled_log_probs
    use_tiled_log_probs()     # before training; TRL's CPU calls it can serve come here

Anything else (a GPU, temperature, logit scaling or softcapping, outputs beyond those
three) goes to TRL's function unchanged.
"""

from __future__ import annotations

import torch

from tunepipe.casts import cast_kept

TOKENS = 128  # tokens per tile: 128 x 49152 fp32 = 25 MB (64 to 512 timed within 20% of each other here)
SUPPORTED_OUTPUTS = {"log_probs", "entropy", "mean_logits", "is_top1"}  # DPO asks for all four


def use_tiled_log_probs() -> None:
    """Route TRL's fused LM head through ``TiledLogProbs`` where it applies (idempotent)."""
    from trl.trainer import utils

    if getattr(utils._ChunkedLogProbFunction, "tiled", False):
        return
    utils._ChunkedLogProbFunction = _Dispatch(utils._ChunkedLogProbFunction)


class _Dispatch:
    """Stands in for TRL's autograd function: ``apply`` picks ours or TRL's per call."""

    tiled = True

    def __init__(self, plain):
        self.plain = plain

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        if applies(hidden, temperature, softcap, logit_scale, outputs):
            return TiledLogProbs.apply(hidden, weight, bias, targets, tuple(outputs))
        return self.plain.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)


def applies(hidden, temperature, softcap, logit_scale, outputs) -> bool:
    return (hidden.device.type == "cpu" and temperature == 1.0 and softcap is None and logit_scale == 1.0
            and set(outputs) <= SUPPORTED_OUTPUTS)


class TiledLogProbs(torch.autograd.Function):
    """log p(target) of ``hidden @ weight.T (+ bias)`` per token, and the entropy, the mean logit over the
    vocabulary (no gradient) and whether the target is the (first) argmax when ``outputs`` names them;
    returned in TRL's order (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), log_sum_sq_probs
    (WPO's weights: not computed) as None.

    Like TRL's: under autocast the logits are computed in its dtype and the statistics in fp32; the
    backward's matmuls run in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, outputs):
        ctx.set_materialize_grads(False)
        ctx.compute_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        n = hidden.shape[0]
        log_z, target_logit = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
        entropy = torch.empty(n, dtype=torch.float32) if "entropy" in outputs else None
        is_top1 = torch.empty(n, dtype=torch.bool) if "is_top1" in outputs else None
        mean_logits = torch.empty(n, dtype=torch.float32) if "mean_logits" in outputs else None
        with torch.autocast("cpu", enabled=False):
            head = _Head(weight, bias, ctx.compute_dtype, n)
            for s in range(0, n, TOKENS):
                e = min(s + TOKENS, n)
                z = head.logits(hidden[s:e])
                target_logit[s:e] = z.gather(-1, targets[s:e, None])[:, 0]
                if mean_logits is not None:  # DPO's logits/chosen and logits/rejected metrics
                    mean_logits[s:e] = z.sum(-1).div_(z.shape[-1])
                top, first = z.max(-1)  # the first maximum, as TRL's kernel counts the target's rank
                if is_top1 is not None:
                    is_top1[s:e] = first == targets[s:e]
                shifted = z.sub_(top[:, None])
                exp = head.exp(shifted)  # the one exp pass: log Z and the entropy both come from it
                total = exp.sum(-1)
                log_z[s:e] = top + total.log()
                if entropy is not None:  # H = log Z - sum_v p_v z_v, in shifted logits; bmm: no [T, V] product
                    entropy[s:e] = total.log() - torch.bmm(exp[:, None], shifted[:, :, None])[:, 0, 0] / total
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy)
        ctx.mark_non_differentiable(*(t for t in (mean_logits, is_top1) if t is not None))
        return target_logit - log_z, entropy, None, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias = ctx.saved_tensors[:3]
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if needs_bias else None
        with torch.autocast("cpu", enabled=False):
            _backward_tiles(ctx, grad_log_probs, grad_entropy, grad_hidden, grad_weight, grad_bias)
        return (_cast(grad_hidden, hidden), _cast(grad_weight, weight), _cast(grad_bias, bias), None, None)


def _backward_tiles(ctx, grad_log_probs, grad_entropy, grad_hidden, grad_weight, grad_bias) -> None:
    """Recompute each tile's logits, turn them into their gradient, accumulate the input gradients (fp32)."""
    hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
    if grad_log_probs is None and grad_entropy is None:
        return
    head = _Head(weight, bias, ctx.compute_dtype, hidden.shape[0])
    for s in range(0, hidden.shape[0], TOKENS):
        e = min(s + TOKENS, hidden.shape[0])
        tile = (lambda t: None if t is None else t[s:e].float())  # noqa: E731
        grad = _logit_grad(head.logits(hidden[s:e]), targets[s:e], log_z[s:e], tile(entropy),
                           tile(grad_log_probs), tile(grad_entropy), head)
        if grad_hidden is not None:
            grad_hidden[s:e] = grad @ head.weight32
        if grad_weight is not None:
            grad_weight.addmm_(grad.t(), hidden[s:e].float())
        if grad_bias is not None:
            grad_bias += grad.sum(0)


class _Head:
    """The LM head's weights in the dtype the logits are computed in (cast once per call, not per tile), and
    two tile buffers reused by every tile: fresh 25 MB tensors per op cost page faults, not just arithmetic."""

    def __init__(self, weight, bias, dtype, tokens: int):
        self.weight = cast_kept(weight, dtype)
        self.bias = None if bias is None else bias.to(dtype)
        self.weight32 = cast_kept(weight, torch.float32)
        shape = (min(TOKENS, tokens), weight.shape[0])
        self.tile = torch.empty(shape, dtype=dtype)
        self.tile32 = self.tile if dtype == torch.float32 else torch.empty(shape)
        self.spare = torch.empty(shape)

    def logits(self, hidden):
        """fp32 logits of a tile of tokens, in the tile buffer (valid until the next call)."""
        n = hidden.shape[0]
        h = hidden.to(self.weight.dtype)
        if self.bias is None:
            z = torch.mm(h, self.weight.t(), out=self.tile[:n])
        else:
            z = torch.addmm(self.bias, h, self.weight.t(), out=self.tile[:n])
        return z if z.dtype == torch.float32 else self.tile32[:n].copy_(z)

    def exp(self, z):
        """exp(z) in the spare buffer."""
        return torch.exp(z, out=self.spare[: z.shape[0]])


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


def _logit_grad(z, targets, log_z, entropy, grad_log_probs, grad_entropy, head):
    """d(loss)/dz for one tile, written over ``z``: g_lp (1[v = target] - p_v) - g_H p_v (log p_v + H)."""
    log_p = z.sub_(log_z[:, None])
    if grad_entropy is None:
        grad = log_p.exp_().mul_(-grad_log_probs[:, None])
    else:
        p = head.exp(log_p)
        grad = log_p.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])
        if grad_log_probs is not None:
            grad.addcmul_(p, grad_log_probs[:, None], value=-1)
    if grad_log_probs is not None:
        grad.scatter_add_(-1, targets[:, None], grad_log_probs[:, None])
    return grad
