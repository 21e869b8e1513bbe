"""Supervised fine-tuning: next-token cross-entropy on completion tokens only.

    L = - 1/|C| * sum_{t in completion} log pi(y_t | prompt, y_<t)

Prompt tokens are context, never targets (loss_mask marks the completion, including its EOS).
"""

from __future__ import annotations

from alignlab.algorithms.base import PolicyModule
from alignlab.losses.lm import sft_loss


class SFT(PolicyModule):
    data_kind = "sft"

    def __init__(self, **kwargs):
        """All arguments are PolicyModule's (init_from, arch, lr, ...)."""
        super().__init__(**kwargs)

    def loss(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.policy(ids[:, :-1], mask[:, :-1])  # position t predicts token t + 1
        return sft_loss(logits, ids[:, 1:], batch["loss_mask"][:, 1:])

    def training_step(self, batch, batch_idx):
        loss, metrics = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/num_tokens", metrics["num_tokens"].float(), reduce_fx="sum")
        return loss
