"""Reward model: a scalar score r(x, y) learned from preference pairs (the 2nd stage of RLHF).

Bradley-Terry: P(y_c preferred to y_r | x) = sigmoid(r(x, y_c) - r(x, y_r)), so maximum likelihood is

    L = mean(-log sigmoid(r_c - r_r - margin)) + center_rewards_coef * mean((r_c + r_r)^2)

r is a ``ScalarModel``: the SFT policy's trunk with a linear head read at the last real token (the EOS
that ends the completion). ``margin`` is the optional per-pair column of the data (a required gap,
Llama 2 style); the centring term (Eisenstein et al. 2023) pins the free offset of r near 0.

Metrics: ``train/loss``, ``train/accuracy`` (share of pairs with r_c > r_r), ``train/margin`` (mean
r_c - r_r), ``train/reward_chosen``, ``train/reward_rejected``; validation ``val/accuracy`` is the same
PAIRWISE accuracy on held-out pairs (there is nothing to generate), plus ``val/loss`` and ``val/margin``.

``export(path)`` writes ``ScalarModel.save``: an HF export of the trunk + value_head.safetensors, which PPO
loads as its reward model and initial critic (``ScalarModel.load(path)``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignlab.algorithms.base import PolicyModule, check
from alignlab.losses.preference import bradley_terry_loss
from alignlab.model.heads import ScalarModel


class RewardModel(PolicyModule):
    data_kind = "preference"

    def __init__(self, center_rewards_coef: float = 0.0, use_margin: bool = True, **kwargs):
        """
        Args:
            center_rewards_coef: weight of the reward-centring term mean((r_c + r_r)^2); 0 = off (TRL uses 0.01).
            use_margin: subtract the data's ``margin`` column from r_c - r_r when the rows have one.
            **kwargs: PolicyModule's arguments; ``init_from`` is the SFT export (a fresh head is added) or
                a saved reward model (head included); val_max_new_tokens and sampling_seed are unused.
        """
        check(center_rewards_coef >= 0, "center_rewards_coef", f"must be >= 0, got {center_rewards_coef}")
        super().__init__(**kwargs)

    def build_model(self, init_from, arch) -> None:
        """self.model: a saved reward model (head included), or the policy's trunk with a fresh head."""
        if init_from is not None and ScalarModel.is_scalar_model(init_from):
            self.model = ScalarModel.load(init_from)
            self.adapt(self.model.trunk, init_from)
        else:  # the trunk (adapted when lora is set) and a fresh, trained head
            self.model = ScalarModel(self.new_transformer(init_from, arch))

    # ------------------------------------------------------------------------ scoring
    def pair_rewards(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of chosen and rejected, ONE forward over the 2B concatenated rows: (B,), (B,)."""
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        rewards = self.model.score(ids, mask)  # (2B,)
        B = batch["chosen_input_ids"].shape[0]
        return rewards[:B], rewards[B:]

    def rm_step(self, batch):
        chosen, rejected = self.pair_rewards(batch)
        margin = batch.get("margin") if self.hparams.use_margin else None
        return bradley_terry_loss(chosen, rejected, margin=margin,
                                  center_rewards_coef=self.hparams.center_rewards_coef)

    def training_step(self, batch, batch_idx):
        loss, m = self.rm_step(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", m["accuracy"], prog_bar=True)
        self.log("train/margin", m["margin"])
        self.log("train/reward_chosen", m["reward_chosen"])
        self.log("train/reward_rejected", m["reward_rejected"])
        return loss

    # --------------------------------------------------------------------- validation
    def validation_step(self, batch, batch_idx):
        """Pairwise accuracy on held-out pairs (overrides the generation-based validation)."""
        chosen, rejected = self.pair_rewards(batch)
        margin = batch.get("margin") if self.hparams.use_margin else None
        loss, m = bradley_terry_loss(chosen, rejected, margin=margin,
                                     center_rewards_coef=self.hparams.center_rewards_coef)
        B = chosen.shape[0]
        correct = (chosen > rejected).float()
        # plain self.log (batch-size weighted epoch means): metric states created under validate's
        # inference mode could not be updated by a later fit
        self.log("val/accuracy", correct.mean(), batch_size=B, prog_bar=True)
        self.log("val/loss", loss, batch_size=B)
        self.log("val/margin", m["margin"], batch_size=B)
        k = max(0, min(B, self.hparams.num_logged_samples - len(self._val_samples)))
        if k:
            texts = [self.decode(batch[f"{side}_input_ids"][:k], batch[f"{side}_loss_mask"][:k])
                     for side in ("chosen", "rejected")]
            for i in range(k):
                self._val_samples.append((batch["prompt"][i], texts[0][i], texts[1][i],
                                          f"{chosen[i].item():.3f}", f"{rejected[i].item():.3f}"))
        return correct.mean()

    def on_validation_epoch_end(self):
        self.log_text("val/samples", ["prompt", "chosen", "rejected", "r_chosen", "r_rejected"], self._val_samples)
        self._val_samples = []

    def generation_budget(self) -> tuple[int, str]:
        return 0, ""  # a reward model never generates

    # ------------------------------------------------------------------ optimizer, export
    def trainable_parameters(self):
        return self.model.parameters()

    def export(self, path: str | Path) -> None:
        """ScalarModel.save: HF trunk + tokenizer + value_head.safetensors (what PPO loads)."""
        self.model.save(path, tokenizer=self.tokenizer)
