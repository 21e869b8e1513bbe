"""Language-model basics: token log-probs, entropy, masked reductions and the SFT loss.

Pure functions of tensors; they import only torch. Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index] without materialising the full (B, T, V) log-softmax.

    log p(index) = logits[index] - logsumexp(logits)

    Args:
        logits: (B, T, V) scores; logits[:, t] is the distribution that predicts index[:, t].
        index: (B, T) token ids to gather.
    Returns:
        (B, T) log-probs in fp32 when the logits are fp16/bf16, else in the logits' dtype.
    """
    if logits.dtype in _LOW_PRECISION:
        # One row at a time: the fp32 copy is (T, V), not (B, T, V).
        return torch.stack([selective_log_softmax(row.float(), idx) for row, idx in zip(logits, index)])
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    H = -sum_v p_v log p_v = logsumexp(logits) - sum_v p_v * logits_v

    Args:
        logits: (B, T, V).
    Returns:
        (B, T) entropies (fp32 for fp16/bf16 logits).
    """
    if logits.dtype in _LOW_PRECISION:
        return torch.stack([entropy_from_logits(row.float()) for row in logits])
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def _head_logps(hidden, weight, index, temperature: float, with_entropy: bool):
    """log-probs of index (and entropies) under softmax(hidden @ weight^T / temperature): (n,) fp32 each.

    Log-probs alone go through ``HeadLogps`` (the same values and gradients, with the backward computed in
    the logits' own buffer); with entropies, autograd differentiates the formula as written."""
    if not with_entropy:
        return HeadLogps.apply(hidden, weight, index, temperature), None
    logits = _scaled_logits(hidden, weight, temperature)
    return selective_log_softmax(logits, index), entropy_from_logits(logits)


def _scaled_logits(hidden, weight, temperature: float) -> torch.Tensor:
    """(hidden @ weight^T) / temperature in fp32: (n, V)."""
    logits = (hidden @ weight.T).float()
    return logits / temperature if temperature != 1.0 else logits  # x / 1 == x: skipped, not changed


class HeadLogps(torch.autograd.Function):
    """log p(index_n) = z_n[index_n] - logsumexp(z_n), z_n = (hidden_n @ weight^T) / temperature, (n,) fp32,
    with the gradient autograd would compute, written out:

        dL/dz_n = g_n * (onehot(index_n) - softmax(z_n))      (g_n = dL/dlog p(index_n))
        dL/dhidden = (dL/dz / temperature) @ weight,   dL/dweight = (dL/dz / temperature)^T @ hidden

    Autograd, differentiating gather and logsumexp, allocates four (n, V) tensors on the way (the scattered
    one-hot, exp(z - lse), its product with g, their sum); here the gradient is computed in place in the
    logits the forward saved, the same operations on the same values in the same order (tested to the bit
    in fp32), so a vocabulary of 49152 costs no fresh (n, V) memory in the backward. The saved logits are
    consumed: a second backward through the same graph (``retain_graph=True``) raises. Under autocast the
    matmuls run in the autocast dtype, as ``hidden @ weight.T`` would, and the logits in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, index, temperature):
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = _scaled_logits(h, w, temperature)
            lse = torch.logsumexp(logits, dim=-1)
            logps = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - lse
        ctx.save_for_backward(h, w, logits, lse, index)
        ctx.temperature, ctx.dtypes, ctx.consumed = temperature, (hidden.dtype, weight.dtype), False
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.consumed:
            raise RuntimeError("HeadLogps: the saved logits were consumed by an earlier backward "
                               "(retain_graph=True is not supported; compute the log-probs again)")
        ctx.consumed = True
        h, w, logits, lse, index = ctx.saved_tensors
        g = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(grad.neg().unsqueeze(-1))  # -g_n * softmax(z_n)
        g.scatter_add_(-1, index.unsqueeze(-1), grad.unsqueeze(-1))  # + g_n at index_n
        if ctx.temperature != 1.0:
            g.div_(ctx.temperature)
        g = g.to(h.dtype)
        grad_h = (g @ w).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_w = (g.T @ h).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def chunked_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
    chunk_size: int | None = 1024, with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-probs (and entropies) of N positions, the LM head computed chunk_size rows at a time.

    log p(index_n) = z_n[index_n] - logsumexp(z_n),   z_n = hidden_n @ weight^T / temperature

    The caller passes only the positions it scores (e.g. the real completion tokens), so the V-wide logits
    exist for those rows only. With ``chunk_size`` they exist for at most that many rows at once: under
    autograd each chunk is recomputed in the backward (``torch.utils.checkpoint``), the graph keeps
    ``hidden``, never the (N, V) logits, so the peak is one chunk's (chunk_size, V) logits and their
    gradient. ``chunk_size=None``: one chunk, kept for the backward (no recomputation). Same values and
    gradients as ``selective_log_softmax(hidden @ weight^T / temperature, index)`` (tested).

    Args:
        hidden: (N, C) final hidden states (after the last norm) at the positions that predict index.
        weight: (V, C) the LM head (the tied embedding, or lm_head.weight).
        index: (N,) token ids to score.
        temperature: logits are divided by it (the sampling temperature).
        chunk_size: rows per LM-head computation (None: all N at once).
        with_entropy: also return the entropy of each position's distribution (with gradients: PPO's bonus).
    Returns:
        (N,) log-probs in fp32, and (N,) fp32 entropies or None.
    """
    if chunk_size is None:
        return _head_logps(hidden, weight, index, temperature, with_entropy)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = [checkpoint(_head_logps, h, weight, i, temperature, with_entropy, use_reentrant=False) if grad
             else _head_logps(h, weight, i, temperature, with_entropy)
             for h, i in zip(hidden.split(chunk_size), index.split(chunk_size))]
    if not parts:  # no position to score
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty if with_entropy else None
    logps = torch.cat([lp for lp, _ in parts])
    return logps, torch.cat([e for _, e in parts]) if with_entropy else None


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all elements when None). mask is bool or float, broadcastable to x.

    Masked-out entries are dropped, not multiplied, so an inf/nan there cannot leak into the sum.
    """
    mask = mask.to(x.dtype)
    x = torch.where(mask != 0, x * mask, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over `dim` (all elements when None); 0 where sum(mask) == 0."""
    mask = mask.to(x.dtype).expand_as(x)
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / torch.where(count == 0, torch.ones_like(count), count)


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on the tokens selected by loss_mask (the completion), averaged over those tokens.

    L = -sum_{b,t} m_{b,t} log p(labels_{b,t} | logits_{b,t}) / sum_{b,t} m_{b,t}

    The caller shifts: logits[:, t] predicts labels[:, t]. Labels outside the mask are never read,
    so they may hold any value (e.g. -100 or a pad id).

    Args:
        logits: (B, T, V).
        labels: (B, T) target ids.
        loss_mask: (B, T) 1 on tokens that count, 0 elsewhere.
    Returns:
        loss: scalar; metrics: {"loss", "num_tokens"}.
    """
    keep = loss_mask.bool()
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels))
    token_logp = selective_log_softmax(logits, safe_labels)  # (B, T)
    loss = masked_mean(-token_logp, keep)
    metrics = {"loss": loss.detach(), "num_tokens": keep.sum().detach()}
    return loss, metrics
