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
  the policy -- which at that point IS the reference -- scores every training and validation pair once
  into a table keyed by each sequence's content, saved in (and restored from) Lightning checkpoints
  (``self.ref_table``: algorithms/reference_table.py).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from alignlab.algorithms.base import PolicyModule, check
from alignlab.algorithms.reference_table import CKPT_KEYS, ReferenceTable
from alignlab.losses.preference import DPO_LOSS_TYPES, dpo_loss


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
        self.ref_table = ReferenceTable(self.score_with_policy) if precompute_ref_logps else None

    def needs_reference(self) -> bool:
        return not self.hparams.precompute_ref_logps  # precomputed: no copy of the policy to keep

    # ---------------------------------------------------------------------------- the loss
    def dpo_step(self, batch):
        """(loss, metrics) of one batch of pairs: DPO loss (+ rpo_alpha * NLL of the chosen tokens)."""
        chosen, rejected = self.pair_logps(self.policy, batch)  # log pi(y_c|x), log pi(y_r|x)
        ref_chosen, ref_rejected = self.ref_logps(batch)        # log pi_ref(y_c|x), log pi_ref(y_r|x)
        h = self.hparams
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=h.beta, loss_type=h.loss_type,
                                 label_smoothing=h.label_smoothing)
        if h.rpo_alpha:
            nll = -chosen.sum() / batch["chosen_loss_mask"][:, 1:].sum().clamp(min=1)  # mean over chosen tokens
            loss = loss + h.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics

    # ------------------------------------------------------------------------ log-probs
    def pair_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs of chosen and rejected: ONE forward over the 2B completions, in which
        each pair's prompt is computed once and its keys/values shared by both completions
        (``completion_states`` with a prompt index). The same values as ``sequence_logps`` of each full
        sequence (tested)."""
        B = batch["prompt_ids"].shape[0]
        prompt_ids, prompt_mask = batch["prompt_ids"].repeat(2, 1), batch["prompt_mask"].repeat(2, 1)
        ids = torch.cat([batch["chosen_completion_ids"], batch["rejected_completion_ids"]])  # (2B, C)
        mask = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
        prompt_index = torch.arange(B, device=ids.device).repeat(2)  # row b and row B + b share prompt b
        logps = self.completion_logps(model, prompt_ids, prompt_mask, ids, mask, prompt_index=prompt_index)
        logps = (logps * mask).sum(-1)  # (2B,)
        return logps[:B], logps[B:]

    def ref_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the pairs: from the frozen copy, or from the precomputed table."""
        if self.ref is not None:
            with torch.no_grad():
                return self.pair_logps(self.ref, batch)
        return self.ref_table.lookup(batch, self.device)

    # ---------------------------------------------------------------------------- steps
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

    # ------------------------------------------------------------- precomputed reference
    @torch.no_grad()
    def score_with_policy(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The table's scorer: the pairs' log-probs under the current policy (still the starting one), in eval
        mode and the trainer's precision."""
        was_training = self.policy.training
        self.policy.eval()
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        trainer = self._trainer
        ctx = trainer.precision_plugin.forward_context() if trainer is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            chosen, rejected = self.pair_logps(self.policy, batch)
        self.policy.train(was_training)
        return chosen, rejected

    def precompute_reference(self, loaders: list[DataLoader]) -> None:
        """One pass over every row of ``loaders`` with the starting policy (no shuffle, nothing dropped)."""
        n = self.ref_table.build(loaders)
        rank_zero_info(f"DPO: precomputed reference log-probs of {n} sequences")

    def on_fit_start(self) -> None:
        if self.ref_table is None or self.ref_table.frozen:
            return  # live reference, or resumed from a checkpoint that carries the table
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError("DPO(precompute_ref_logps=True) needs a LightningDataModule to precompute from")
        loaders = [dm.train_dataloader()]
        val = dm.val_dataloader() if self.trainer.limit_val_batches else []
        loaders += val if isinstance(val, (list, tuple)) else [val]
        self.precompute_reference(loaders)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ref_table is not None:
            self.ref_table.freeze()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ref_table is not None:
            checkpoint.update(self.ref_table.state_dict())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.ref_table is not None:
            if CKPT_KEYS in checkpoint:
                self.ref_table.load_state_dict(checkpoint)
            self.ref_table.freeze()
