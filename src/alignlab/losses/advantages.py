"""Advantages: GRPO group normalisation, RLOO's leave-one-out baseline, PPO's GAE, whitening, and the RLHF per-token reward.

Pure functions of tensors; they import only torch. Shapes: B completions, T completion tokens,
right-padded, `mask` 1 on real tokens. Everything here is a target, not a prediction: inputs are
detached and no gradient flows out.
"""

from __future__ import annotations

import torch

from alignlab.losses.lm import masked_mean

SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO advantages: each reward relative to the other samples of its prompt.

        A_i = (R_i - mean_group(R)) / (std + eps)

    The mean is always the group's. std is the std of the group ("group", GRPO), of the whole
    batch ("batch", Liu et al. 2025 "Tricks or Traps?"), or no division at all ("none",
    Dr. GRPO: dividing by the group std up-weights prompts that are nearly always solved or
    failed). std is the unbiased estimate (torch.std default, as in TRL); one sample has std 0.

    Args:
        rewards: (N,) rewards ordered as N / group_size consecutive groups of group_size samples.
    Returns:
        advantages: (N,); metrics, as TRL's GRPOTrainer defines them: "reward_std" (the std of all N
        rewards), "frac_reward_zero_std" (the share of rewards whose scaling std is 0: with "group" and
        "none" the share of groups whose rewards are all equal -- they give no learning signal -- with
        "batch" 1 if every reward of the batch is equal, else 0); and "group_reward_std" (the mean of the
        group stds, what GRPO divides by).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {'|'.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size ({group_size}) must be >= 1 and divide the number of rewards ({rewards.numel()})"
        )
    rewards = rewards.detach()
    grouped = rewards.reshape(-1, group_size)  # (N / G, G)
    group_mean = grouped.mean(dim=1, keepdim=True)
    group_std = _std(grouped, dim=1, keepdim=True)  # (N / G, 1)

    batch_std = _std(rewards)
    advantages = grouped - group_mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (batch_std + eps)

    if scale_rewards == "batch":  # one std for the batch: is it 0?
        zero_std = (rewards == rewards[:1]).all()[None]
    else:  # each group's
        zero_std = (grouped == grouped[:, :1]).all(dim=1)
    metrics = {
        "reward_std": batch_std,
        "group_reward_std": group_std.mean(),
        "frac_reward_zero_std": zero_std.float().mean(),
    }
    return advantages.reshape(-1), metrics


def rloo_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str = "none", eps: float = 1e-4
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO (Ahmadian et al. 2024): each reward minus the mean of the OTHER G - 1 rewards of its group,

        A_i = R_i - 1/(G-1) sum_{j != i} R_j  =  G / (G - 1) * (R_i - mean_group(R))

    an unbiased baseline (it does not depend on o_i); then divided as ``scale_rewards`` says, like GRPO's
    (RLOO's own: "none"). One sample per group has no other sample: A = 0. Metrics as ``group_advantages``.
    """
    advantages, metrics = group_advantages(rewards, group_size, scale_rewards, eps)
    return advantages * (group_size / (group_size - 1) if group_size > 1 else 0.0), metrics


# ``model.advantage_estimator`` of GRPO / DAPO: name -> fn(rewards, group_size, scale_rewards) -> (A, metrics)
ADVANTAGE_ESTIMATORS = {"grpo": group_advantages, "rloo": rloo_advantages}


def _std(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std, 0 (not NaN) when there is a single element."""
    if dim is None:
        return x.std() if x.numel() > 1 else x.new_zeros(())
    if x.shape[dim] > 1:
        return x.std(dim=dim, keepdim=keepdim)
    return torch.zeros_like(x.sum(dim=dim, keepdim=keepdim))


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), backwards over each completion.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V

    Completions are right-padded: V_{t+1} and A_{t+1} are 0 after the last valid token.

    Args:
        rewards: (B, T) per-token rewards (see `per_token_rewards`).
        values: (B, T) critic values at rollout time.
        mask: (B, T) completion mask.
    Returns:
        advantages, returns: (B, T) each, 0 where mask is 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards.detach(), values.detach() * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # V_{t+1}, masked
    next_adv = torch.zeros_like(values[:, 0])  # A_{t+1}, masked
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t], advantages[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to mean 0, std 1 over the masked entries (as TRL's masked_whiten).

        x' = (x - mean) / sqrt(var + eps)      (+ mean again if not shift_mean)

    var is the unbiased masked variance (Bessel factor n / (n - 1); 0 when n < 2).

    Args:
        x: (B, T); mask: (B, T).
    Returns:
        (B, T), 0 where mask is 0.
    """
    mask = mask.to(x.dtype)
    x = x.detach()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), torch.zeros_like(var))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """The RLHF-PPO per-token reward (Ziegler et al. 2019): a KL penalty on every token, and the
    reward-model score on the last token of the completion.

        r_t = -beta * KL_t + [t == last valid token] * score

    Args:
        scores: (B,) sequence-level rewards (reward model or rule).
        kl: (B, T) per-token KL estimates between the policy and the reference.
        mask: (B, T) right-padded completion mask; a row with no valid token gets no score.
    Returns:
        (B, T) rewards, 0 where mask is 0.
    """
    mask = mask.to(kl.dtype)
    rewards = -beta * kl.detach() * mask
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)  # (B,)
    has_token = mask.bool().any(dim=1)
    score = torch.where(has_token, scores.detach().to(kl.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))
