"""Callbacks: the HF export that hands a trained model to the next stage."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L


class HFExport(L.Callback):
    """At the end of training write ``<run dir>/hf`` (config.json, model.safetensors, tokenizer) and point
    ``<log root>/<name>/latest_hf`` at it, so the next stage can use ``init_from: logs/<algo>/latest_hf``.

    The link points at the export itself, not at the run: a link to a run directory is a second copy of
    that run for TensorBoard, which lists every directory with event files, links included.

    The export never overwrites an existing one, except in a run resumed from a checkpoint (``--ckpt_path
    last`` continues the run directory): then the new export replaces the old. ``latest_hf`` is swapped
    atomically (a symlink rename). A ``latest`` link to a run, which earlier versions wrote, is removed.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir if trainer.logger is not None else None  # a broadcast: every rank calls it
        if not trainer.is_global_zero or log_dir is None:
            return
        run_dir = Path(log_dir)
        out = run_dir / "hf"
        if out.exists():
            if trainer.ckpt_path is None:
                raise FileExistsError(f"{out}: an export is already there; not overwriting it")
            old = run_dir / f".hf.replaced.{os.getpid()}"
            os.replace(out, old)
            pl_module.export(out)
            shutil.rmtree(old)
        else:
            pl_module.export(out)
        tmp = run_dir.parent / f".latest_hf.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(Path(run_dir.name, "hf"))
        os.replace(tmp, run_dir.parent / "latest_hf")
        if (run_dir.parent / "latest").is_symlink():
            (run_dir.parent / "latest").unlink()



class ValidateAtEnd(L.Callback):
    """The last optimizer step (``trainer.max_steps``) is always followed by a validation, whatever
    ``val_check_interval`` is: a run shorter than it still logs ``val/*``, and the HF export (written at the
    end of training) is of a validated model. Done the way early stopping asks Lightning for a last
    validation: ``trainer.should_stop`` on the last step, read by the loop right after this hook; a step
    that is a validation step anyway is validated once. Lightning logs a validation after step ``n`` at
    step ``n - 1`` (its ``_batches_that_stepped`` counter), as it does every scheduled one."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class ValidateAtStart(L.Callback):
    """A validation before the first step (logged at step 0; not when resuming), so the curves begin at the
    starting model's accuracy. Opt-in (the recipes add it): ``--trainer.callbacks+=alignlab.callbacks.ValidateAtStart``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:
            return
        trainer.validating = True  # as Lightning's in-training validation; without val data the loop skips itself
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
