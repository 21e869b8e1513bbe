"""Policy-gradient pieces shared by PPO, GRPO and DAPO: KL estimators, the clipped surrogate,
loss aggregation over ragged completions, and the clipped value loss.

Pure functions of tensors; they import only torch. Shapes: B completions, T completion tokens;
`mask` is 1 on real completion tokens and 0 on padding.
"""

from __future__ import annotations

import math

import torch

from alignlab.losses.lm import masked_mean, masked_sum

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL").

        k1 = logp - ref_logp                                  unbiased, can be negative
        k2 = 0.5 * (logp - ref_logp)^2                        biased, >= 0
        k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1     unbiased, >= 0 (GRPO's choice)

    k3 is computed as expm1(d) - d with d = ref_logp - logp, the same value without the
    cancellation of exp(d) - 1 that would make it slightly negative for small d.

    Args:
        logp, ref_logp: (B, T) token log-probs under the policy and the reference.
    Returns:
        (B, T) per-token KL estimates.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        d = ref_logp - logp
        return torch.expm1(d) - d
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, per token, with clip-higher (DAPO) and optional dual clip.

        r = exp(logp - logp_old)
        L = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
        dual clip (Ye et al. 2020), for A < 0 only:  L = min(L, -dual_clip * A)

    eps_high defaults to eps_low (symmetric PPO clip). DAPO raises it (0.28) so low-probability
    tokens with A > 0 can grow more before the clip stops their gradient.

    Args:
        logp: (B, T) token log-probs under the current policy (with grad).
        old_logp: (B, T) token log-probs at sampling time.
        advantages: (B, T), or (B,) broadcast to every token of the sequence.
        mask: (B, T) completion mask; masked tokens get ratio 1 and a loss of 0.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high].
        dual_clip: cap c > 1 on the loss of negative-advantage tokens; None to disable.
    Returns:
        per_token_loss: (B, T), 0 where mask is 0 (reduce it with `aggregate`);
        metrics: masked token means {"clip_ratio/low", "clip_ratio/high", "clip_ratio/region",
        "ratio/mean"} (detached).
    """
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1) -> broadcasts over T
    advantages = advantages.expand_as(logp)
    keep = mask.bool()

    # Padding may hold garbage log-probs: give it ratio 1 so exp() cannot overflow into the grads.
    log_ratio = torch.where(keep, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token_loss = torch.maximum(unclipped, clipped)  # -min(rA, clip(r)A)
    if dual_clip is not None:
        capped = torch.minimum(per_token_loss, -dual_clip * advantages)
        per_token_loss = torch.where(advantages < 0, capped, per_token_loss)
    per_token_loss = torch.where(keep, per_token_loss, torch.zeros_like(per_token_loss))

    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (advantages < 0)).float()
        high = ((ratio > 1 + eps_high) & (advantages > 0)).float()
        clip_low, clip_high = masked_mean(low, keep), masked_mean(high, keep)
        metrics = {
            "clip_ratio/low": clip_low,
            "clip_ratio/high": clip_high,
            "clip_ratio/region": clip_low + clip_high,
            "ratio/mean": masked_mean(ratio, keep),
        }
    return per_token_loss, metrics


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "seq-mean-token-mean",
    num_tokens: int | torch.Tensor | None = None,
    num_seqs: int | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce per-token values over ragged completions to one scalar (verl's `loss_agg_mode`).

        token-mean:               sum_{i,t} m_it x_it / N_tokens                    (DAPO)
        seq-mean-token-mean:      (1/N_seqs) sum_i [sum_t m_it x_it / |o_i|]        (GRPO)
        seq-mean-token-sum-norm:  (1/N_seqs) sum_i [sum_t m_it x_it / max_len]      (Dr. GRPO)

    token-mean gives every token the same weight, so long sequences weigh more;
    seq-mean-token-mean gives every sequence the same weight, so a token of a short sequence weighs
    more; seq-mean-token-sum-norm divides by a constant and so has neither length bias.

    By default N_tokens = mask.sum() and N_seqs = B. Pass the GLOBAL counts (over the whole rollout
    batch, or all-reduced over DDP ranks) when `values` is only a minibatch or a shard: each call
    then returns that part's share, and summing the results over the parts gives exactly the
    full-batch value.

    Args:
        values: (B, T) per-token values (e.g. losses).
        mask: (B, T) completion mask.
        mode: one of LOSS_AGG_MODES.
        num_tokens: token-mean normaliser (global token count).
        num_seqs: sequence normaliser for the seq-mean modes (global sequence count).
        max_len: constant max completion length; required by seq-mean-token-sum-norm.
    Returns:
        0-dim tensor. Sequences with no valid token contribute 0 (never NaN).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"mode must be one of {LOSS_AGG_MODES}, got {mode!r}")
    mask = mask.to(values.dtype)
    seq_sums = masked_sum(values, mask, dim=-1)  # (B,)

    if mode == "token-mean":
        count = mask.sum() if num_tokens is None else num_tokens
        return seq_sums.sum() / _nonzero(count, values)

    if mode == "seq-mean-token-mean":
        seq_values = masked_mean(values, mask, dim=-1)  # (B,), 0 for empty rows
    else:  # seq-mean-token-sum-norm
        if max_len is None or max_len <= 0:
            raise ValueError(f"max_len (a positive max completion length) is required for mode={mode!r}")
        seq_values = seq_sums / max_len
    count = values.shape[0] if num_seqs is None else num_seqs
    return seq_values.sum() / _nonzero(count, values)


def _nonzero(count: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """count as a tensor like `like`, with 0 replaced by 1 (the numerator is then 0 too)."""
    count = torch.as_tensor(count, dtype=like.dtype, device=like.device)
    return torch.where(count == 0, torch.ones_like(count), count)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO value loss with the new value kept within cliprange_value of the rollout-time value.

        V_clip = V_old + clip(V - V_old, -c, c)
        L = 0.5 * max((V - R)^2, (V_clip - R)^2)

    Args:
        values: (B, T) critic values now (with grad).
        old_values: (B, T) critic values at rollout time.
        returns: (B, T) GAE returns (targets).
        mask: (B, T) completion mask.
    Returns:
        per_token_loss: (B, T), 0 where mask is 0; metrics: {"vf_clipfrac"} = masked share of tokens
        where the clipped term is the larger one.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    per_token_loss = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    per_token_loss = torch.where(mask.bool(), per_token_loss, torch.zeros_like(per_token_loss))
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask).detach()
    return per_token_loss, {"vf_clipfrac": clipfrac}


ROLLOUT_CORRECTIONS = ("none", "token_tis", "sequence_tis")


def logp_difference(logp_old: torch.Tensor, logp_sampler: torch.Tensor, mask: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """How far the sampler's log-probs are from the trainer's, on the real tokens only.

        d_t = |logp_old_t - logp_sampler_t|        mean and max over the tokens where mask is 1

    Args:
        logp_old: (B, T) the trainer's log-probs of the sampled tokens (pi_old, recomputed).
        logp_sampler: (B, T) the log-probs the rollout engine reported when it drew them.
        mask: (B, T) completion mask.
    Returns:
        {"logp_difference/mean", "logp_difference/max"} (0 without any real token).
    """
    d = (logp_old - logp_sampler).abs()[mask.bool()]
    if d.numel() == 0:
        zero = logp_old.new_zeros(())
        return {"logp_difference/mean": zero, "logp_difference/max": zero}
    return {"logp_difference/mean": d.mean(), "logp_difference/max": d.max()}


def truncated_importance_weights(
    logp_old: torch.Tensor,
    logp_sampler: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    cap: float = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling (TIS) weights for completions drawn by a sampler mu that is not
    exactly the trainer's pi_old (vLLM's kernels, a lower precision, stale weights): Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"; TRL's and verl's rollout correction.

        token:     w_t = min(exp(logp_old_t - logp_sampler_t), C)                    one weight per token
        sequence:  w   = min(exp(sum_t m_t (logp_old_t - logp_sampler_t)), C)        = min(prod_t pi_old/mu, C),
                                                                                      for every token of the sequence

    The per-token policy loss is multiplied by w (detached: a constant of the update, like pi_old). The
    truncation at C bounds the variance; min(., C) is taken in log space, so no ratio overflows.

    Args:
        logp_old: (B, T) the trainer's log-probs of the sampled tokens.
        logp_sampler: (B, T) the sampler's log-probs of the same tokens.
        mask: (B, T) completion mask (padding contributes nothing to a sequence's sum).
        level: "token" or "sequence".
        cap: C > 0, the truncation.
    Returns:
        weights: (B, T), 0 where mask is 0;
        metrics: {"importance_sampling_ratio/min", "/mean", "/max"} of the truncated weights over the real
        tokens (sequence level: over the sequences).
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be token|sequence, got {level!r}")
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    keep = mask.bool()
    log_ratio = torch.where(keep, logp_old - logp_sampler, torch.zeros_like(logp_old))
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True)  # (B, 1)
    w = torch.exp(torch.clamp(log_ratio, max=math.log(cap)))
    real = w.expand_as(logp_old)[keep] if level == "token" else w.squeeze(-1)[keep.any(-1)]
    if real.numel() == 0:
        real = w.new_ones(1)
    metrics = {"importance_sampling_ratio/min": real.min(), "importance_sampling_ratio/mean": real.mean(),
               "importance_sampling_ratio/max": real.max()}
    weights = torch.where(keep, w.expand_as(logp_old), torch.zeros_like(logp_old))
    return weights.detach(), metrics
