"""PPO for RLHF (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT).

The classic RLHF flow has three stages; this module is the third and holds four models:

    SFT (sft.py) --> reward model (rm.py, Bradley-Terry on preference pairs) --> PPO (this file)

    prompts --> policy pi_theta (trained) --> completions o
                  |                            |
                  |   frozen reference pi_ref  +--> reward model r(q, o)   (frozen; or rule rewards)
                  |   (the SFT policy)         |
                  |                            +--> critic V_phi(q, o_<t)   (trained, its own lr)
                  v
          per-token reward, GAE advantages, clipped policy + value losses

One ``training_step`` (one rollout), in the order the paper writes it:

1. Rollout: sample completions o ~ pi_old(.|q) (``OnPolicyModule.rollout``), no grad.
2. Score: s = r(q, o), the reward model's scalar at the last real token of prompt + completion
   (prompt left-padded, completion right-padded), or the rule rewards when there is no reward model.
   Optional: ``missing_eos_penalty`` is subtracted from completions that never emit EOS,
   ``reward_clip`` clamps s to [-c, c].
3. KL in the reward (Ziegler et al. 2019): with KL_t an estimate of log pi_old(o_t) / pi_ref(o_t)
   (k1 = logp - logp_ref, or k3),

       r_t = -beta * KL_t + [t == last completion token] * s

   (``whiten_rewards`` optionally normalises r_t over the batch, TRL's option.)
4. GAE (Schulman et al. 2016) with the critic's values V_t at rollout time, backwards over the tokens:

       delta_t = r_t + gamma * V_{t+1} - V_t              (V_{T} = 0 after the last token)
       A_t     = delta_t + gamma * lam * A_{t+1}
       R_t     = A_t + V_t                                 (the critic's targets: "returns")

   then the advantages are whitened over all completion tokens of the batch: A <- (A - mean) / std.
5. ``num_iterations`` passes x ``minibatches`` optimizer steps on the rollout, each minimising

       L = L_policy + vf_coef * L_value - entropy_coef * H
       L_policy = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t),   rho_t = pi_theta(o_t) / pi_old(o_t)
                  (dual clip for A_t < 0: min(L_policy, -dual_clip * A_t))
       L_value  = 0.5 * max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)^2)

   averaged over all completion tokens of the minibatch (token-mean, as TRL).
6. Adaptive KL controller (optional, ``target_kl``; Ziegler et al. 2019): after each rollout,

       beta <- beta * (1 + clip(KL / target_kl - 1, -0.2, 0.2) * n / kl_horizon)

   with KL the mean summed KL of a completion and n the number of completions of the rollout.
   The coefficient is saved in checkpoints.

Why PPO costs more memory than GRPO: the critic V_phi is a second network of the policy's size (here a
copy of the reward model's trunk), trained alongside the policy with its own optimizer state, plus the
frozen reference and reward model: four models of policy size. GRPO drops the critic (its baseline is
the group mean reward), DAPO drops the reference too.

Reward choice (``reward_model`` and ``rule_reward_weight``): with a reward model the score is the RM's
score; the configured ``reward_funcs`` (default: task accuracy) are still computed on every rollout and
logged as ``rewards/<name>/mean``, so the true accuracy can be watched next to the learned reward
(``objective/scores``) -- the two diverge under reward hacking. They enter the score only with an explicit
``rule_reward_weight`` (default 0 with a reward model). Without a reward model the rule rewards are the
score (``rule_reward_weight`` default 1): PPO on verifiable rewards.

Metrics (TRL's PPOTrainer names): ``objective/kl`` (mean over completions of sum_t KL_t),
``objective/entropy`` (mean of sum_t -logp_t, TRL's estimate), ``objective/non_score_reward``
(mean of sum_t -beta KL_t), ``objective/scores`` (mean s), ``objective/rlhf_reward`` (scores +
non-score reward), ``policy/approxkl_avg`` (0.5 (logp - logp_old)^2), ``policy/clipfrac_avg``,
``policy/entropy_avg``, ``loss/policy_avg``, ``loss/value_avg``, ``value/clipfrac_avg`` (value clipping;
TRL: ``val/clipfrac_avg``), ``policy/ratio_avg`` (mean rho; TRL: ``val/ratio``), ``train/beta`` (the KL
coefficient, adaptive with ``target_kl``), plus ``val/accuracy`` from validation: ``val/`` holds only what
validation computes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch

from alignlab.algorithms.base import check
from alignlab.algorithms.on_policy import OnPolicyModule, Rollout
from alignlab.data.tokenizer import load_tokenizer
from alignlab.losses.advantages import gae, per_token_rewards, whiten
from alignlab.losses.lm import masked_mean
from alignlab.losses.policy import aggregate, clipped_surrogate, clipped_value_loss, kl_estimate
from alignlab.model.heads import ScalarModel

def adaptive_kl_coef(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al. 2019's proportional controller: beta * (1 + clip(kl / target - 1, +-0.2) * n / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


class PPO(OnPolicyModule):
    """One training step (``OnPolicyModule.training_step``); the methods below, in this order, change it:

        r = self.make_rollout(batch)    # 1-2. o ~ pi_old(.|q); s = r_phi(q, o) (or the rule rewards)
        self.prepare(r)                 # 3.   log pi_old, log pi_ref, the critic's V_t at rollout time
        self.compute_advantages(r)      # 3-4. r_t = -beta KL_t + [t = T] s; GAE -> A_t, R_t
        self.update(r)                  # 5.   num_iterations x minibatches steps on L_policy + vf_coef L_value
        self.after_update(r)            # 6.   adaptive KL controller (target_kl)
    """

    def __init__(
        self,
        reward_model: str | None = None,
        rule_reward_weight: float | None = None,
        beta: float = 0.05,
        kl_estimator: Literal["k1", "k3"] = "k1",
        target_kl: float | None = None,
        kl_horizon: int = 10000,
        missing_eos_penalty: float | None = None,
        whiten_rewards: bool = False,
        reward_clip: float | None = None,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        dual_clip: float | None = None,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        critic_lr: float = 1e-4,
        critic_warmup_steps: int = 0,
        num_iterations: int = 4,
        minibatches: int = 1,
        num_generations: int = 1,
        export_critic: bool = True,
        **kwargs,
    ):
        """
        Args:
            reward_model: path to a reward-model export (``RewardModel.export``); None = rule rewards only.
            rule_reward_weight: weight of the rule rewards (``reward_funcs``) in the score; default 0 with a
                reward model (rules are then only logged) and 1 without.
            beta: weight of the per-token KL penalty in the reward (initial value if target_kl is set).
            kl_estimator: k1 (log-ratio, TRL's default) or k3 (>= 0) for the KL in the reward.
            target_kl: adaptive KL controller target (summed KL per completion); None = fixed beta.
            kl_horizon: horizon of the adaptive KL controller, in completions.
            missing_eos_penalty: subtracted from the score of completions that never emit EOS; None = off.
            whiten_rewards: whiten the per-token rewards over the batch (keeping their mean) before GAE.
            reward_clip: clamp the score to [-reward_clip, reward_clip]; None = off.
            gamma: discount of GAE.
            lam: lambda of GAE (bias-variance trade-off; 1 = Monte-Carlo returns minus V).
            whiten_advantages: normalise advantages to mean 0, std 1 over the batch's completion tokens.
            epsilon: eps of the clipped surrogate, ratio kept in [1 - eps, 1 + eps_high].
            epsilon_high: upper clip range eps_high (None = epsilon).
            dual_clip: dual-clip constant c > 1 for negative advantages (Ye et al. 2020); None = off.
            cliprange_value: the new value is kept within this distance of the rollout-time value.
            vf_coef: weight of the value loss.
            entropy_coef: weight of the entropy bonus (0 = off).
            critic_lr: peak learning rate of the critic (its own AdamW parameter groups).
            critic_warmup_steps: the first this many rollouts train only the critic.
            num_iterations: passes over each rollout (PPO's epochs).
            minibatches: optimizer steps per pass; the rollout is split into this many minibatches.
            num_generations: completions sampled per prompt (PPO needs no groups; 1 as in TRL).
            export_critic: also write the critic (ScalarModel) under ``<export dir>/critic``.
        """
        check(reward_model is None or ScalarModel.is_scalar_model(reward_model), "reward_model",
              f"{reward_model!r} is not a reward-model export (no alignlab_scalar.json); train one with "
              f"`python -m alignlab.train rm`")
        check(beta >= 0, "beta", f"must be >= 0, got {beta}")
        check(kl_estimator in ("k1", "k3"), "kl_estimator", f"must be k1|k3, got {kl_estimator!r}")
        check(target_kl is None or target_kl > 0, "target_kl", f"must be > 0 (or null), got {target_kl}")
        check(target_kl is None or beta > 0, "beta", "must be > 0 for the adaptive controller (target_kl)")
        check(kl_horizon >= 1, "kl_horizon", f"must be >= 1, got {kl_horizon}")
        check(reward_clip is None or reward_clip > 0, "reward_clip", f"must be > 0 (or null), got {reward_clip}")
        check(0 <= gamma <= 1, "gamma", f"must be in [0, 1], got {gamma}")
        check(0 <= lam <= 1, "lam", f"must be in [0, 1], got {lam}")
        check(epsilon >= 0, "epsilon", f"must be >= 0, got {epsilon}")
        check(epsilon_high is None or epsilon_high >= 0, "epsilon_high", f"must be >= 0, got {epsilon_high}")
        check(dual_clip is None or dual_clip > 1, "dual_clip", f"must be > 1 (or null), got {dual_clip}")
        check(cliprange_value > 0, "cliprange_value", f"must be > 0, got {cliprange_value}")
        check(vf_coef >= 0, "vf_coef", f"must be >= 0, got {vf_coef}")
        check(entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {entropy_coef}")
        check(critic_lr > 0, "critic_lr", f"must be > 0, got {critic_lr}")
        check(critic_warmup_steps >= 0, "critic_warmup_steps", f"must be >= 0, got {critic_warmup_steps}")
        super().__init__(num_iterations=num_iterations, minibatches=minibatches, num_generations=num_generations,
                         **kwargs)
        if rule_reward_weight is None:
            rule_reward_weight = 0.0 if reward_model is not None else 1.0
        check(reward_model is not None or rule_reward_weight != 0, "rule_reward_weight",
              "is 0 and there is no reward_model: every score would be 0 (drop the key: it defaults to 1 "
              "without a reward model)")
        self.rule_reward_weight = float(rule_reward_weight)
        self.beta = float(beta)  # the adaptive controller's state (saved in checkpoints)

    def build_model(self, init_from, arch) -> None:
        """The policy; the reward model (frozen, never trained); the critic: separate parameters, from the
        reward model (as InstructGPT) or the policy's trunk. With LoRA the critic gets adapters of its own
        on a frozen trunk (its head is trained in full)."""
        super().build_model(init_from, arch)
        path = self.hparams.reward_model
        self.reward_model = None
        if path is not None:
            check(load_tokenizer(path).get_vocab() == self.tokenizer.get_vocab(), "reward_model",
                  f"{path} has a different tokenizer from the policy")
            self.reward_model = self.frozen(ScalarModel.load(path))
            self.rebuildable(self.reward_model, path)
            self.critic = ScalarModel.load(path)
            self.adapt(self.critic.trunk, path)
        else:  # a copy of the policy: with LoRA its frozen base (= init_from) and fresh adapters like the policy's
            self.critic = ScalarModel(copy.deepcopy(self.policy))
            if self.lora is not None:
                self.rebuildable(self.critic.trunk, init_from)

    def needs_reference(self) -> bool:
        return True  # the KL in the reward is measured against the frozen SFT policy

    # ------------------------------------------------------------------------ 1-2. rollout, score
    @torch.no_grad()
    def score(self, r: Rollout) -> None:
        """r.rewards = s: RM score (+ rule_reward_weight * rules), - missing_eos_penalty, clipped."""
        super().score(r)  # rule rewards: r.rewards_per_func and their weighted sum in r.rewards
        s = self.rule_reward_weight * r.rewards
        if self.reward_model is not None:
            rm = self.reward_scores(r)
            r.rewards_per_func["reward_model"] = rm
            s = s + rm
        if self.hparams.missing_eos_penalty is not None:
            s = s - self.hparams.missing_eos_penalty * r.truncated.to(s.dtype)
        if self.hparams.reward_clip is not None:
            s = s.clamp(-self.hparams.reward_clip, self.hparams.reward_clip)
        r.rewards = s

    @torch.no_grad()
    def reward_scores(self, r: Rollout) -> torch.Tensor:
        """The reward model on prompt (left-padded) + completion (right-padded), read at the last real token."""
        ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
        mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
        return self.reward_model.score(ids, mask).float()  # (N,)

    def critic_values(self, critic, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        """V_t for each completion token t: the critic's value at the position that predicts it: (B, C)."""
        P, C = prompt_ids.shape[1], completion_ids.shape[1]
        values = critic(torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1))
        return values[:, P - 1 : P + C - 1]

    # ---------------------------------------------------------- 3. fixed log-probs and values
    @torch.no_grad()
    def prepare(self, r: Rollout) -> None:
        """pi_old's log-probs (the ratio's denominator in every update), pi_ref's, and V_t at rollout time."""
        r.loss_mask = r.completion_mask
        r.logp_old = self.logps_no_grad(self.policy, r)
        self.correct_rollout(r)  # the sampler/trainer mismatch, and the importance weights if asked
        r.ref_logp = self.logps_no_grad(self.ref, r)
        self.critic.eval()
        r.values = self.critic_values(self.critic, r.prompt_ids, r.prompt_mask, r.completion_ids,
                                      r.completion_mask) * r.completion_mask.float()
        self.critic.train()

    # ------------------------------------------------------------------- 3-4. KL reward, GAE
    @torch.no_grad()
    def compute_advantages(self, r: Rollout) -> dict[str, torch.Tensor]:
        mask = r.completion_mask.float()
        kl = kl_estimate(r.logp_old, r.ref_logp, self.hparams.kl_estimator) * mask  # (N, C)
        rewards = per_token_rewards(r.rewards, kl, mask, self.beta)  # -beta KL_t, + s on the last token
        if self.hparams.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, r.values, mask, self.hparams.gamma, self.hparams.lam)
        r.returns = returns
        r.advantages = whiten(advantages, mask) if self.hparams.whiten_advantages else advantages

        n = self.global_sum(len(r))
        seq_kl = self.global_sum(kl.sum()) / n  # mean over completions of sum_t KL_t
        non_score = -self.beta * seq_kl
        scores = self.global_sum(r.rewards.sum()) / n
        return {
            "objective/kl": seq_kl,
            "objective/entropy": self.global_sum((-r.logp_old * mask).sum()) / n,
            "objective/non_score_reward": non_score,
            "objective/scores": scores,
            "objective/rlhf_reward": scores + non_score,
            "train/beta": torch.tensor(self.beta),
            "train/value_mean": masked_mean(r.values, mask),
            "train/returns_mean": masked_mean(returns, mask),
        }

    # ------------------------------------------------------------------------------ 5. loss
    def in_critic_warmup(self) -> bool:
        return self.global_step // self.optimizer_steps_per_batch() < self.hparams.critic_warmup_steps

    summed_metrics = ("loss/value_avg", "loss/policy_avg")  # shares of the minibatch's token mean

    def compute_loss(self, mb: Rollout, num_tokens, num_seqs):
        h = self.hparams
        mask = mb.loss_mask

        def token_mean(x):  # this rank's share of the token mean over the global minibatch
            return aggregate(x, mask, "token-mean", num_tokens=num_tokens)

        values = self.critic_values(self.critic, mb.prompt_ids, mb.prompt_mask, mb.completion_ids,
                                    mb.completion_mask)
        vf_per_token, vm = clipped_value_loss(values, mb.values, mb.returns, mask, h.cliprange_value)
        vf_loss = token_mean(vf_per_token)
        metrics = {"loss/value_avg": vf_loss.detach() * self.world_size, "value/clipfrac_avg": vm["vf_clipfrac"]}
        if self.in_critic_warmup():
            return h.vf_coef * vf_loss, metrics

        logp, entropy = self.completion_logps(self.policy, mb.prompt_ids, mb.prompt_mask, mb.completion_ids,
                                              mb.completion_mask, temperature=h.temperature, with_entropy=True,
                                              prompt_index=mb.prompt_index, entropy_grad=h.entropy_coef > 0)
        pg_per_token, pm = clipped_surrogate(logp, mb.logp_old, mb.advantages, mask, eps_low=h.epsilon,
                                             eps_high=h.epsilon_high, dual_clip=h.dual_clip)
        if mb.is_weights is not None:  # truncated importance sampling: the sampler was not pi_old
            pg_per_token = pg_per_token * mb.is_weights
        pg_loss = token_mean(pg_per_token)
        loss = pg_loss + h.vf_coef * vf_loss
        if h.entropy_coef > 0:
            loss = loss - h.entropy_coef * token_mean(entropy)
        with torch.no_grad():
            log_ratio = torch.where(mask.bool(), logp - mb.logp_old, torch.zeros_like(logp))
            metrics.update({
                "loss/policy_avg": pg_loss.detach() * self.world_size,
                "policy/approxkl_avg": masked_mean(0.5 * log_ratio**2, mask),
                "policy/clipfrac_avg": pm["clip_ratio/region"],
                "policy/entropy_avg": masked_mean(entropy.detach(), mask),
                "policy/ratio_avg": pm["ratio/mean"],
            })
        return loss, metrics

    # ------------------------------------------------------------- 6. adaptive KL controller
    def after_update(self, r: Rollout) -> None:
        if self.hparams.target_kl is not None:
            self.beta = adaptive_kl_coef(self.beta, float(r.stats["objective/kl"]), self.hparams.target_kl,
                                            int(self.global_sum(len(r))), self.hparams.kl_horizon)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_beta"] = self.beta

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.beta = float(checkpoint.get("ppo_beta", self.beta))

    # ------------------------------------------------------------------------------ logging
    metric_groups = (*OnPolicyModule.metric_groups, "objective", "policy", "loss", "value")  # TRL's groups
    every_step_metrics = (*OnPolicyModule.every_step_metrics, "objective/scores")
    prog_bar_metrics = (*OnPolicyModule.prog_bar_metrics, "objective/scores")

    # ---------------------------------------------------------------------- optimizer, export
    def configure_optimizers(self):
        """One AdamW, two learning rates: the policy's groups at lr, the critic's at critic_lr."""
        h = self.hparams
        groups = []
        for name, model, lr in (("policy", self.policy, h.lr), ("critic", self.critic, h.critic_lr)):
            decay, no_decay = self.param_groups(model.parameters(), lr)
            groups += [{**decay, "name": name}, {**no_decay, "name": f"{name}_no_decay"}]
        opt = self.adamw(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def trainable_parameters(self):
        return list(self.policy.parameters()) + list(self.critic.parameters())

    def export(self, path: str | Path) -> None:
        """The policy (HF format, what the next stage loads) and, optionally, the critic under <path>/critic."""
        super().export(path)
        if self.hparams.export_critic:
            self.critic.save(Path(path) / "critic", tokenizer=self.tokenizer)
