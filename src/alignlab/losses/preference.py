"""Preference losses: DPO (and its variants) and the Bradley-Terry reward-model loss.

Pure functions of tensors; they import only torch. B is the number of (chosen, rejected) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization (Rafailov et al. 2023) and variants.

    All inputs are (B,) log-probs SUMMED over each completion's tokens.

        logits = (logp_c - logp_ref_c) - (logp_r - logp_ref_r),   h = beta * logits
        sigmoid: -(1 - ls) log sigmoid(h) - ls log sigmoid(-h)          (cDPO when ls > 0)
        ipo:     (logits - 1 / (2 beta))^2                              (Azar et al. 2023)
        hinge:   relu(1 - h)                                            (SLiC)
        robust:  (-(1 - ls) log sigmoid(h) + ls log sigmoid(-h)) / (1 - 2 ls)   (Chowdhury et al. 2024)

    The loss is the mean over the batch. The implicit rewards beta * (logp - logp_ref) are logged.

    Returns:
        loss: scalar; metrics: {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
        "rewards/margins", "logps/chosen", "logps/rejected"} (batch means, detached).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust', got {label_smoothing}")
    elif not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    h = beta * logits
    ls = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(h) - ls * F.logsigmoid(-h)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    else:  # robust
        losses = (-(1 - ls) * F.logsigmoid(h) + ls * F.logsigmoid(-h)) / (1 - 2 * ls)
    loss = losses.mean()

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return loss, metrics


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise Bradley-Terry loss for a scalar reward model (as in TRL's RewardTrainer).

        L = mean(-log sigmoid(r_c - r_r - margin)) + center_rewards_coef * mean((r_c + r_r)^2)

    The second term (Eisenstein et al. 2023) keeps rewards centred on 0.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards.
        margin: optional (B,) required gap between chosen and rejected.
        center_rewards_coef: weight of the centring term.
    Returns:
        loss: scalar; metrics: {"loss", "accuracy" (share of r_c > r_r), "margin" (mean r_c - r_r),
        "reward_chosen", "reward_rejected"} (detached).
    """
    diff = chosen_rewards - rejected_rewards
    target = diff if margin is None else diff - margin
    loss = -F.logsigmoid(target).mean()
    if center_rewards_coef:
        loss = loss + center_rewards_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()

    diff = diff.detach()
    metrics = {
        "loss": loss.detach(),
        "accuracy": (diff > 0).float().mean(),
        "margin": diff.mean(),
        "reward_chosen": chosen_rewards.detach().mean(),
        "reward_rejected": rejected_rewards.detach().mean(),
    }
    return loss, metrics
