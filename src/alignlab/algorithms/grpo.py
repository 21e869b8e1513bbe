"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath).

For each prompt q, sample a group of G completions o_1..o_G from pi_old and score them with rewards
R_1..R_G. The advantage of every token of o_i is its reward relative to the group:

    A_i = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + eps)                      (scale_rewards=group)

and the policy maximises the clipped surrogate minus a KL penalty to the frozen reference pi_ref:

    J(theta) = E_q E_{o_i ~ pi_old} [ 1/G sum_i 1/|o_i| sum_t (
                   min( r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i ) - beta * KL_it ) ]

    r_it  = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    KL_it = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1                          (k3, always >= 0)

The loss is -J. ``loss_agg_mode`` changes the 1/G sum_i 1/|o_i| sum_t reduction (token-mean for DAPO,
a constant max_len for Dr. GRPO), ``kl_estimator`` the KL estimate (k1 | k2 | k3).

Why the loss starts at 0 and then rises
---------------------------------------
With one update per rollout (num_iterations = 1, minibatches = 1, the default) pi_old IS pi_theta: the
ratio r_it = exp(logp - logp.detach()) is exactly 1 in value (its gradient is still grad logp, the
policy gradient). Per sequence the surrogate is then -A_i (its token mean is A_i), and advantages have
zero mean within each group, so 1/G sum_i A_i = 0: the policy term of the loss is 0 whatever the
rewards. What is left is beta * KL. At the first step the policy equals the reference, KL = 0 and
the loss is 0; as training moves the policy away from pi_ref, KL grows and the loss rises with it.
The loss curve is the KL curve times beta -- it says nothing about the rewards; watch train/reward.
(Exactly so with seq-mean-token-mean; with token-mean the policy term is sum_i A_i |o_i| / N_tokens,
which is 0 only when the group's completions have equal lengths.)
"""

from __future__ import annotations

from typing import Literal

import torch

from alignlab.algorithms.base import check
from alignlab.algorithms.on_policy import OnPolicyModule, Rollout
from alignlab.losses.advantages import ADVANTAGE_ESTIMATORS
from alignlab.losses.lm import masked_mean
from alignlab.losses.policy import aggregate, clipped_surrogate, kl_estimate


class GRPO(OnPolicyModule):
    """One training step (``OnPolicyModule.training_step``); the methods below, in this order, change it:

        r = self.make_rollout(batch)    # 1-2. o_1..o_G ~ pi_old(.|q) per prompt, R_i = sum_j w_j f_j(q, o_i)
        self.prepare(r)                 # 3.   log pi_old (only if reused), log pi_ref (beta > 0)
        self.compute_advantages(r)      # 4.   A_i = (R_i - mean_group R) / (std_group R + eps)
        self.update(r)                  # 5.   mu x minibatches optimizer steps on compute_loss = -J(theta)
    """

    def __init__(
        self,
        beta: float = 0.04,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        loss_agg_mode: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean",
        mask_truncated_completions: bool = False,
        advantage_estimator: Literal["grpo", "rloo"] = "grpo",
        **kwargs,
    ):
        """
        Args:
            beta: weight of the KL penalty to the frozen reference; 0 = no KL and no reference model.
            epsilon: lower clip range eps_low of the ratio (and upper, unless epsilon_high is set).
            epsilon_high: upper clip range eps_high (None = epsilon; DAPO's clip-higher uses 0.28).
            kl_estimator: k1 (log-ratio), k2 (half squared log-ratio) or k3 (GRPO's, unbiased and >= 0).
            scale_rewards: divide the group-centred rewards by the group std, the batch std, or nothing.
            loss_agg_mode: seq-mean-token-mean (GRPO) | token-mean (DAPO) | seq-mean-token-sum-norm (Dr. GRPO).
            mask_truncated_completions: completions without EOS get zero loss weight (overlong filtering).
            advantage_estimator: grpo (R_i - the group mean) or rloo (R_i - the mean of the group's others,
                Ahmadian et al. 2024; with scale_rewards: none as RLOO): a name of
                ``losses.advantages.ADVANTAGE_ESTIMATORS``, where another estimator is added.
        """
        check(beta >= 0, "beta", f"must be >= 0, got {beta}")
        super().__init__(**kwargs)
        check(epsilon >= 0, "epsilon", f"must be >= 0, got {epsilon}")
        check(epsilon_high is None or epsilon_high >= 0, "epsilon_high", f"must be >= 0, got {epsilon_high}")
        check(kl_estimator in ("k1", "k2", "k3"), "kl_estimator", f"must be k1|k2|k3, got {kl_estimator!r}")
        check(scale_rewards in ("group", "batch", "none"), "scale_rewards",
              f"must be group|batch|none, got {scale_rewards!r}")
        check(advantage_estimator in ADVANTAGE_ESTIMATORS, "advantage_estimator",
              f"must be {'|'.join(ADVANTAGE_ESTIMATORS)}, got {advantage_estimator!r}")
        check(loss_agg_mode in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"), "loss_agg_mode",
              f"must be seq-mean-token-mean|token-mean|seq-mean-token-sum-norm, got {loss_agg_mode!r}")
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.kl_estimator, self.scale_rewards, self.loss_agg_mode = kl_estimator, scale_rewards, loss_agg_mode
        self.mask_truncated_completions = mask_truncated_completions
        self.advantages_fn = ADVANTAGE_ESTIMATORS[advantage_estimator]

    def needs_reference(self) -> bool:
        return self.hparams.beta > 0  # beta == 0: no reference model is created at all

    # -- 3. log-probs fixed during the updates: pi_old (only if the policy moves before the last
    #    update, else logp.detach() IS pi_old) and the frozen reference pi_ref
    @torch.no_grad()
    def prepare(self, r: Rollout) -> None:
        if self.mask_truncated_completions:
            r.loss_mask = r.completion_mask * (~r.truncated).unsqueeze(1).to(r.completion_mask.dtype)
        super().prepare(r)
        if self.beta > 0:
            r.ref_logp = self.logps_no_grad(self.ref, r)

    # -- 4. group-relative advantages: A_i = (R_i - mean_group R) / (std + eps)   (or RLOO's, by name)
    def compute_advantages(self, r: Rollout) -> dict[str, torch.Tensor]:
        G, estimate = self.hparams.num_generations, self.advantages_fn
        if self.scale_rewards == "batch" and self.world_size > 1:  # the batch std spans every rank's rewards
            adv, metrics = estimate(r.rewards, G, "none")
            adv = adv / (self.all_gather(r.rewards).reshape(-1).std() + 1e-4)
        else:
            adv, metrics = estimate(r.rewards, G, self.scale_rewards)
        r.advantages = adv  # (N,): the same advantage for every token of o_i
        return metrics

    # -- 5. the loss: clipped surrogate + beta * KL, aggregated over tokens and sequences
    summed_metrics = ("kl",)  # aggregated like the loss: a micro-batch's kl is its share

    def compute_loss(self, mb: Rollout, num_tokens, num_seqs):
        mask = mb.loss_mask
        logp, entropy = self.completion_logps(self.policy, mb.prompt_ids, mb.prompt_mask, mb.completion_ids,
                                              mb.completion_mask, temperature=self.hparams.temperature,
                                              with_entropy=True, prompt_index=mb.prompt_index)
        logp_old = mb.logp_old if mb.logp_old is not None else logp.detach()  # ratio == 1 by design

        per_token, metrics = clipped_surrogate(logp, logp_old, mb.advantages, mask,
                                               eps_low=self.epsilon, eps_high=self.epsilon_high)
        if mb.is_weights is not None:  # truncated importance sampling: the sampler was not pi_old
            per_token = per_token * mb.is_weights
        if self.beta > 0:  # padding may hold any ref log-prob (0 where trimmed): KL 0 there, never inf
            ref_logp = torch.where(mb.completion_mask.bool(), mb.ref_logp, logp.detach())
            kl = kl_estimate(logp, ref_logp, self.kl_estimator)  # (B, T)
            per_token = per_token + self.beta * kl

        def agg(x):  # this rank's share of the mean over the global minibatch
            return aggregate(x, mask, self.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                             max_len=self.hparams.max_new_tokens)

        loss = agg(per_token)
        metrics["entropy"] = masked_mean(entropy, mb.completion_mask)
        if self.beta > 0:  # aggregated like the loss, so that loss == beta * kl when the policy term is 0
            metrics["kl"] = agg(kl.detach()) * self.world_size
        return loss, metrics
