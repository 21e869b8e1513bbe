"""Direct Preference Optimization (Rafailov et al. 2023): preference pairs -> policy, in one stage.

    h    = beta * ((log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x)))
    loss = -log sigmoid(h)          (+ cDPO label smoothing, ipo, hinge, robust: see losses/preference.py)

log pi(y|x) is the SUM of the completion's token log-probs (the prompt is context, never scored).
The reference pi_ref is the starting policy (usually the SFT export); the implicit reward of a completion
is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), logged as ``rewards/chosen`` and ``rewards/rejected``.

Unlike PPO there is no reward model and no sampling: it is SFT-shaped (a forward over fixed sequences,
a loss, a step), only the loss compares two completions of the same prompt. ``rpo_alpha > 0`` adds the
SFT loss on the chosen completion (RPO), which keeps log pi(y_c) from falling along with log pi(y_r).

Reference log-probs come from one of two places:

- ``precompute_ref_logps=False`` (default): a frozen copy of the starting policy (``self.ref``: eval mode,
  no grad, not in the optimizer, restored with the checkpoint) runs on every batch.
- ``precompute_ref_logps=True``: no copy is ever made. Before the first optimizer step (``on_fit_start``)
  the policy -- which at that point IS the reference -- scores every training and validation pair once,
  and the results are stored in a table. The table is keyed by CONTENT, not by position: the key of a
  sequence is a 16-byte blake2b hash of its real token ids and its loss mask, so any loader order,
  shuffling, padding length or duplicated row finds the same value and no row index has to travel
  through the DataModule. The pass goes over the whole training set (no shuffle, no dropped last batch).
  A sequence missing from the table is scored on the fly while the policy is still the starting one
  (e.g. ``trainer.validate`` before training); after the first step a missing sequence is an error.
  The table is saved in (and restored from) Lightning checkpoints, so a resumed run keeps its reference.
"""

from __future__ import annotations

import hashlib

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from alignlab.algorithms.base import PolicyModule, check
from alignlab.losses.preference import DPO_LOSS_TYPES, dpo_loss


def sequence_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> list[bytes]:
    """Content key of each row: blake2b-128 of its real token ids and of its loss mask over them. (B,) bytes."""
    keys = []
    for ids, m, lm in zip(input_ids.cpu(), attention_mask.cpu().bool(), loss_mask.cpu()):
        h = hashlib.blake2b(digest_size=16)
        h.update(ids[m].numpy().astype("int64").tobytes())
        h.update(lm[m].numpy().astype("int8").tobytes())
        keys.append(h.digest())
    return keys


class DPO(PolicyModule):
    data_kind = "preference"

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_ref_logps: bool = False,
        rpo_alpha: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            beta: strength of the implicit KL to the reference (higher = stay closer to it).
            loss_type: sigmoid (DPO / cDPO), ipo, hinge (SLiC) or robust.
            label_smoothing: assumed share of flipped labels (cDPO for sigmoid, robust DPO for robust).
            precompute_ref_logps: score every pair with the starting policy once before training and keep
                no reference model in memory (see the module docstring).
            rpo_alpha: weight of an NLL term on the chosen completion (RPO, Pang et al. 2024; TRL's rpo_alpha);
                0 = pure DPO.
            **kwargs: PolicyModule's arguments (init_from, arch, lr, ...).
        """
        check(beta > 0, "beta", f"must be > 0, got {beta}")
        check(loss_type in DPO_LOSS_TYPES, "loss_type", f"must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
        if loss_type == "robust":
            check(0 <= label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5) for robust, got {label_smoothing}")
        else:
            check(0 <= label_smoothing <= 1, "label_smoothing", f"must be in [0, 1], got {label_smoothing}")
        check(rpo_alpha >= 0, "rpo_alpha", f"must be >= 0, got {rpo_alpha}")
        super().__init__(**kwargs)
        self._ref_table: dict[bytes, float] = {}
        self._policy_is_reference = True  # no optimizer step yet: the policy can still score missing rows

    def needs_reference(self) -> bool:
        return not self.hparams.precompute_ref_logps  # precomputed: no copy of the policy to keep

    # ------------------------------------------------------------------------ log-probs
    def pair_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs of chosen and rejected, ONE forward over the 2B concatenated rows."""
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        loss_mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
        logps = self.sequence_logps(model, ids, mask, loss_mask)  # (2B,)
        B = batch["chosen_input_ids"].shape[0]
        return logps[:B], logps[B:]

    def ref_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the pairs: from the frozen copy, or from the precomputed table."""
        if self.ref is not None:
            with torch.no_grad():
                return self.pair_logps(self.ref, batch)
        out = []
        for side in ("chosen", "rejected"):
            keys = sequence_keys(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"])
            if any(k not in self._ref_table for k in keys):
                self._score_into_table(batch)
            out.append(torch.tensor([self._ref_table[k] for k in keys], device=self.device, dtype=torch.float32))
        return out[0], out[1]

    # ---------------------------------------------------------------- precomputed reference
    @torch.no_grad()
    def _score_into_table(self, batch) -> None:
        """Score the batch's pairs with the current policy (which must still be the starting policy)."""
        if not self._policy_is_reference:
            raise RuntimeError("DPO(precompute_ref_logps=True): a pair that was not precomputed before training "
                               "reached the module after the policy changed, so its reference log-probs are lost. "
                               "Precomputation covers the DataModule's train and validation rows; "
                               "use precompute_ref_logps=false for other data.")
        was_training = self.policy.training
        self.policy.eval()
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        trainer = self._trainer
        ctx = trainer.precision_plugin.forward_context() if trainer is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            chosen, rejected = self.pair_logps(self.policy, batch)
        self.policy.train(was_training)
        for side, logps in (("chosen", chosen), ("rejected", rejected)):
            keys = sequence_keys(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"])
            self._ref_table.update(zip(keys, logps.float().cpu().tolist()))

    def precompute_reference(self, loaders: list[DataLoader]) -> None:
        """One pass over every row of ``loaders`` with the starting policy (no shuffle, nothing dropped)."""
        n = len(self._ref_table)
        for loader in loaders:
            full = DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False, drop_last=False,
                              collate_fn=loader.collate_fn)
            for batch in full:
                self._score_into_table(batch)
        rank_zero_info(f"DPO: precomputed reference log-probs of {len(self._ref_table) - n} sequences")

    def on_fit_start(self) -> None:
        if self.ref is not None or not self._policy_is_reference:
            return  # live reference, or resumed from a checkpoint that carries the table
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError("DPO(precompute_ref_logps=True) needs a LightningDataModule to precompute from")
        loaders = [dm.train_dataloader()]
        val = dm.val_dataloader() if self.trainer.limit_val_batches else []
        loaders += val if isinstance(val, (list, tuple)) else [val]
        self.precompute_reference(loaders)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._policy_is_reference = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ref is None:
            keys = list(self._ref_table)
            checkpoint["dpo_ref_keys"] = torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(-1, 16)
            checkpoint["dpo_ref_logps"] = torch.tensor([self._ref_table[k] for k in keys], dtype=torch.float64)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "dpo_ref_keys" in checkpoint:
            keys = [bytes(row) for row in checkpoint["dpo_ref_keys"].tolist()]
            self._ref_table = dict(zip(keys, checkpoint["dpo_ref_logps"].tolist()))
        self._policy_is_reference = False

    # ---------------------------------------------------------------------------- steps
    def dpo_step(self, batch):
        """(loss, metrics) of one batch of pairs: DPO loss (+ rpo_alpha * NLL of the chosen tokens)."""
        chosen, rejected = self.pair_logps(self.policy, batch)
        ref_chosen, ref_rejected = self.ref_logps(batch)
        h = self.hparams
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=h.beta, loss_type=h.loss_type,
                                 label_smoothing=h.label_smoothing)
        if h.rpo_alpha:
            nll = -chosen.sum() / batch["chosen_loss_mask"][:, 1:].sum().clamp(min=1)  # mean over chosen tokens
            loss = loss + h.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics

    def training_step(self, batch, batch_idx):
        loss, metrics = self.dpo_step(batch)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "rewards/accuracies")
        return loss

    def validation_step(self, batch, batch_idx):
        correct = super().validation_step(batch, batch_idx)  # greedy generation -> val/accuracy
        loss, metrics = self.dpo_step(batch)
        B = batch["chosen_input_ids"].shape[0]
        self.log("val/loss", loss, batch_size=B)
        for name in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            self.log(f"val/{name}", metrics[name], batch_size=B)
        return correct
