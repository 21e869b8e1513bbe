"""Language-model basics: token log-probs, entropy, masked reductions and the SFT loss.

Pure functions of tensors; they import only torch. Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
