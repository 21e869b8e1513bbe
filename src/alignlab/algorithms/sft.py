"""Supervised fine-tuning: next-token cross-entropy on completion tokens only.

    L = - 1/|C| * sum_{t in completion} log pi(y_t | prompt, y_<t)

Prompt tokens are context, never targets (loss_mask marks the completion, including its EOS). The log-probs
come from the LM head at completion positions only (``PolicyModule.token_logps``; in chunks with
``logits_chunk_size``): the same loss as ``sft_loss`` on the full (B, T, V) logits (tested).
"""

from __future__ import annotations

from alignlab.algorithms.base import PolicyModule
from alignlab.losses.lm import masked_mean


class SFT(PolicyModule):
    data_kind = "sft"

    def __init__(self, **kwargs):
        """All arguments are PolicyModule's (init_from, arch, lr, ...)."""
        super().__init__(**kwargs)

    def loss(self, batch):
        """(mean -log p over completion tokens, {"loss", "num_tokens"})"""
        ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        keep = loss_mask[:, 1:].bool()
        loss = masked_mean(-self.sequence_token_logps(self.policy, ids, mask, loss_mask), keep)
        return loss, {"loss": loss.detach(), "num_tokens": keep.sum().detach()}

    def training_step(self, batch, batch_idx):
        loss, metrics = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/num_tokens", metrics["num_tokens"].float(), reduce_fx="sum")
        return loss
