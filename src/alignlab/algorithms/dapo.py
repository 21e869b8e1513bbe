"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al. 2025) = GRPO + five changes.

    J(theta) = E_{(q,a), {o_i} ~ pi_old} [ 1 / sum_i |o_i| * sum_i sum_t
                   min( r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i ) ]
    s.t.  0 < |{o_i : is_equivalent(a, o_i)}| < G                   (every group has mixed rewards)

    R_i = R_task(o_i) + R_overlong(|o_i|),
    R_overlong(L) = 0 if L <= L_max - L_cache;  ((L_max - L_cache) - L) / L_cache if L <= L_max;  -1 beyond

Every change is a switch, so each one can be ablated (the defaults are the paper's):

| switch (model.*)                    | default     | what it changes in the code                                       |
|-------------------------------------|-------------|-------------------------------------------------------------------|
| 1. ``beta``                         | 0.0         | no ``beta * KL`` term in ``GRPO.compute_loss``; ``self.ref`` is None: no reference model in memory, no reference forward in ``prepare`` |
| 2. ``epsilon`` / ``epsilon_high`` | 0.2 / 0.28 | clip range ``[1 - eps_low, 1 + eps_high]`` of ``clipped_surrogate``: low-probability tokens with A > 0 may grow more |
| 3. ``dynamic_sampling``, ``max_gen_rounds``, ``unfilled`` | True, 8, top_up | ``make_rollout``: drop groups whose rewards are all equal (A = 0, no gradient), generate from more training prompts until the batch of prompts is full, trim to the batch size; still short after max_gen_rounds: top the batch up with equal-reward groups (as GRPO would train on them; ``unfilled: error`` stops instead, as verl does) |
| 4. ``loss_agg_mode``                | token-mean  | ``aggregate``: sum over all tokens of the batch / total token count (long answers weigh by their length) |
| 5. ``overlong_buffer_len`` (L_cache), ``max_new_tokens`` (L_max) | 4, 8 | ``score``: soft overlong punishment added to the reward (0 = off), logged as ``rewards/overlong/mean`` |
| 5b. ``mask_truncated_completions``  | True        | ``prepare``: completions that hit L_max without EOS get zero loss weight (overlong filtering) |

Set ``beta: 0.04, epsilon_high: 0.2, dynamic_sampling: false, loss_agg_mode: seq-mean-token-mean,
overlong_buffer_len: 0, mask_truncated_completions: false`` and DAPO is GRPO again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch.utils.data import DataLoader

from alignlab.algorithms.base import check
from alignlab.algorithms.grpo import GRPO
from alignlab.algorithms.on_policy import Rollout
from alignlab.data.datamodule import ResumableSampler
from alignlab.rewards.rules import overlong_penalty


class DAPO(GRPO):
    def __init__(
        self,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float = 0.28,
        dynamic_sampling: bool = True,
        max_gen_rounds: int = 8,
        unfilled: Literal["top_up", "error"] = "top_up",
        loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean",
        overlong_buffer_len: int = 4,
        mask_truncated_completions: bool = True,
        **kwargs,
    ):
        """
        Args:
            beta: KL weight; DAPO removes the KL term (0), and then no reference model is loaded.
            epsilon: lower clip range eps_low (ratio >= 1 - eps_low for A < 0).
            epsilon_high: upper clip range eps_high, decoupled and higher (clip-higher).
            dynamic_sampling: keep only groups with mixed rewards and refill the batch with new prompts.
            max_gen_rounds: generation rounds allowed per step to fill the batch with mixed-reward groups.
            unfilled: the batch is still short after max_gen_rounds: top_up = fill it with equal-reward groups
                of those rounds (A = 0: no policy gradient, but they count in the token mean, as in GRPO; logged
                as train/filler_groups); error = stop with a RuntimeError (verl's behaviour).
            loss_agg_mode: token-mean (DAPO's token-level loss) | seq-mean-token-mean | seq-mean-token-sum-norm.
            overlong_buffer_len: L_cache of the soft overlong punishment (0 = off); L_max is max_new_tokens.
            mask_truncated_completions: truncated completions (no EOS) get zero loss weight.
        """
        check(max_gen_rounds >= 1, "max_gen_rounds", f"must be >= 1, got {max_gen_rounds}")
        check(unfilled in ("top_up", "error"), "unfilled", f"must be top_up|error, got {unfilled!r}")
        check(overlong_buffer_len >= 0, "overlong_buffer_len", f"must be >= 0, got {overlong_buffer_len}")
        super().__init__(beta=beta, epsilon=epsilon, epsilon_high=epsilon_high, loss_agg_mode=loss_agg_mode,
                         mask_truncated_completions=mask_truncated_completions, **kwargs)
        check(overlong_buffer_len <= self.hparams.max_new_tokens, "overlong_buffer_len",
              f"must be <= max_new_tokens ({self.hparams.max_new_tokens}), got {overlong_buffer_len}")
        self._extra_prompts: Iterator[dict] | None = None
        self._extra_drawn = 0  # batches drawn from it (per rank), saved in checkpoints

    # -- 5. soft overlong punishment, added to the task reward
    @torch.no_grad()
    def score(self, r: Rollout) -> None:
        super().score(r)
        h = self.hparams
        if h.overlong_buffer_len > 0:
            penalty = overlong_penalty(r.lengths, h.max_new_tokens, h.overlong_buffer_len).to(r.rewards)
            r.rewards_per_func["overlong"] = penalty
            r.rewards = r.rewards + penalty

    # -- 3. dynamic sampling: only groups with mixed rewards, until the batch of prompts is full
    def make_rollout(self, batch: dict) -> Rollout:
        if not self.hparams.dynamic_sampling:
            return super().make_rollout(batch)
        G, max_rounds = self.hparams.num_generations, self.hparams.max_gen_rounds
        want = batch["prompt_ids"].shape[0]  # prompts per batch (on this rank)
        rounds_r: list[Rollout] = []  # every round's groups
        mixed: list[torch.Tensor] = []  # (groups,) of every round: are its rewards not all equal?
        for rounds in range(1, max_rounds + 1):
            r = super().make_rollout(batch)
            grouped = r.rewards.reshape(-1, G)
            rounds_r.append(r)
            mixed.append((grouped != grouped[:, :1]).any(dim=1))
            if int(torch.cat(mixed).sum()) >= want or rounds == max_rounds:
                break
            batch = self.next_prompts()
        is_mixed = torch.cat(mixed)  # the share of equal groups is taken among ALL generated ones
        n_kept = int(is_mixed.sum())
        if n_kept < want and self.hparams.unfilled == "error":
            raise RuntimeError(
                f"DAPO dynamic sampling: only {n_kept} of {want} prompts had mixed rewards after "
                f"model.max_gen_rounds={max_rounds} rounds ({len(is_mixed)} groups generated, all others had "
                f"equal rewards). Raise max_gen_rounds or num_generations, start from a better/worse policy, "
                f"set model.unfilled=top_up or model.dynamic_sampling=false.")
        # the mixed groups in the order generated, then (only if still short) equal-reward groups as filler
        groups = torch.cat([is_mixed.nonzero().squeeze(1), (~is_mixed).nonzero().squeeze(1)])[:want]
        rows = (groups.unsqueeze(1) * G + torch.arange(G)).reshape(-1)  # group j = rows jG .. jG + G - 1
        r = Rollout.cat(rounds_r, pad_id=self.pad_id).select(rows)
        r.stats = {"frac_reward_zero_std": (~is_mixed).float().mean(),
                   "dropped_groups": (~is_mixed).sum().float() - max(0, want - n_kept),  # generated, not trained
                   "filler_groups": torch.tensor(float(max(0, want - n_kept)), device=self.device),
                   "gen_rounds": torch.tensor(float(rounds), device=self.device)}
        return r

    def next_prompts(self) -> dict:
        """The next batch from our own seeded, cycling iterator over the training prompts."""
        if self._extra_prompts is None:
            self._extra_prompts = self._cycle()
        batch = next(self._extra_prompts)
        self._extra_drawn += 1
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _cycle(self) -> Iterator[dict]:
        """Epochs of a shuffle of its own (seeded per rank), starting after the ``_extra_drawn`` batches drawn
        so far -- after a resume, exactly where the checkpointed run was."""
        dm = getattr(self.trainer, "datamodule", None)
        base = dm.train_dataloader() if dm is not None else self.trainer.train_dataloader
        seed = self.hparams.sampling_seed + 1 + 1000 * self.global_rank
        sampler = ResumableSampler(base.dataset, seed=seed)
        per_epoch = sampler.num_samples // base.batch_size
        epoch, batches = divmod(self._extra_drawn, per_epoch)
        sampler.start(epoch, batches * base.batch_size)
        loader = DataLoader(base.dataset, batch_size=base.batch_size, sampler=sampler, drop_last=True,
                            generator=torch.Generator().manual_seed(seed), collate_fn=base.collate_fn)
        while True:
            yield from loader

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        drawn = torch.tensor([self._extra_drawn], device=self.device)  # the refill iterator's position, per rank
        checkpoint["dapo_extra_prompts_drawn"] = self.all_gather(drawn).reshape(-1) if self.world_size > 1 else drawn

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        drawn = checkpoint.get("dapo_extra_prompts_drawn", torch.zeros(1))
        self._extra_drawn = int(drawn[self.global_rank % len(drawn)])
        self._extra_prompts = None  # rebuilt at that position on first use
