"""The guard before every optimizer step: gradient clipping, and what happens to a NaN/Inf.

Before every optimizer step -- automatic (SFT, DPO, RM) or manual (the on-policy loop) optimisation alike --
``on_before_optimizer_step`` clips the gradients to ``max_grad_norm`` and checks that the loss of the backward
and the total gradient norm are finite (the on-policy loop also checks the rewards before it updates,
through ``nonfinite_step``). If not, ``nonfinite="skip"`` drops the step (all gradients set to None: AdamW
then leaves weights and moments untouched), warns naming the step and the quantity and counts
``train/skipped_steps``; ``"stop"`` raises ``NonFiniteError`` before the step, so the weights -- and any
checkpoint saved later -- never see the NaN. Under DDP the decision is all-reduced, so every rank skips or
stops together. With fp16's GradScaler, inf gradients are the scaler's business (it skips those steps
itself) and are not checked here.

A mixin of ``PolicyModule``: it reads ``hparams.max_grad_norm``, ``hparams.nonfinite`` and
``hparams.nonfinite_patience``, and the host's ``logging_step()``.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteError(FloatingPointError):
    """A NaN/Inf loss, reward or gradient with ``nonfinite="stop"`` (or too many consecutive skipped steps)."""


class NonFiniteGuard:
    skipped_steps = 0  # optimizer steps (or rollouts) dropped for non-finite values
    _consecutive_skips = 0
    _loss_finite: torch.Tensor | None = None  # of the last backward, checked before the step

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        pass  # clipping happens in on_before_optimizer_step, where the gradient norm is computed once

    def clip_grad_norm(self, optimizer) -> torch.Tensor:
        """Scale the gradients to a total norm of at most ``max_grad_norm`` (0: leave them); return the
        total norm before clipping (``train/grad_norm``)."""
        max_norm = self.hparams.max_grad_norm
        model = self.trainer.model
        if hasattr(model, "clip_grad_norm_"):  # FSDP: the norm over every rank's shards
            return model.clip_grad_norm_(max_norm or float("inf"))
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if max_norm:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def nonfinite_step(self, what: str, bad: bool | torch.Tensor) -> bool:
        """Is ``what`` (e.g. "loss") non-finite on any rank? "skip": warn, count and return True; "stop": raise."""
        bad = bool(bad)
        if self._trainer is not None and self.trainer.world_size > 1:  # the same decision on every rank
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return False
        step, h = self.global_step, self.hparams
        if h.nonfinite == "stop":
            raise NonFiniteError(f"step {step}: {what} is NaN or Inf (model.nonfinite=stop); "
                                 f"stopped before the optimizer step, checkpoints hold earlier weights")
        self.skipped_steps += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= h.nonfinite_patience:
            raise NonFiniteError(f"step {step}: {what} is NaN or Inf, {self._consecutive_skips} steps in a row "
                                 f"(model.nonfinite_patience={h.nonfinite_patience}); stopping")
        rank_zero_warn(f"step {step}: {what} is NaN or Inf: skipped this optimizer step "
                       f"({self.skipped_steps} skipped so far; model.nonfinite=skip)")
        return True

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._loss_finite = torch.isfinite(loss.detach()).all()  # read before the step (no sync here)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the gradients (``max_grad_norm``), then skip (all grads -> None) or stop when the loss or the
        total gradient norm is not finite: one norm computation for both."""
        norm = self.clip_grad_norm(optimizer)
        to_logger = self.logging_step()
        if to_logger:
            self.log("train/grad_norm", norm.float(), on_step=True, on_epoch=False, batch_size=1)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16: the GradScaler skips overflowing steps itself
        loss_ok = self._loss_finite if self._loss_finite is not None else torch.tensor(True)
        self._loss_finite = None
        grad_ok = torch.isfinite(norm)
        what = "loss" if not loss_ok else "gradient norm"
        if self.nonfinite_step(what, not (loss_ok and grad_ok)):
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without gradients
        else:
            self._consecutive_skips = 0
        if to_logger:
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)
