"""Checkpoints you can trust: atomic writes, loads that never run code, a save on SIGTERM, ``--ckpt_path last``.

- ``AtomicCheckpointIO`` (``trainer.plugins`` in configs/base.yaml): ``torch.save`` to a temporary file in
  the same directory, fsync, ``os.replace`` onto the target. A crash mid-write leaves the previous
  ``last.ckpt`` intact (Lightning's own write goes through a temp file in /tmp and a cross-device move,
  which copies into the target). Loading uses ``torch.load(weights_only=True)``: tensors, containers and
  allow-listed plain classes only (``TransformerConfig``), never code from the file.
- ``CheckpointOnSigterm`` (configs/base.yaml callbacks): on SIGTERM Lightning stops after the current batch
  (``SIGTERMException``); this writes ``last.ckpt`` first, so the run resumes from the step it reached.
- ``weights_digest``: a hash of a model directory's weights, with which a checkpoint that leaves out a frozen
  model (a reference, a reward model, a LoRA base) checks on resume that the directory still holds it
  (``PolicyModule.on_save_checkpoint``).
- ``find_last_checkpoint``: the newest ``<save_dir>/<name>/version_*/checkpoints/last.ckpt``; the CLI uses it
  for ``--ckpt_path last`` and keeps logging into that run's directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes are all-or-nothing (tmp + fsync + rename); loads are ``weights_only=True`` whatever is asked."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (pre-emption, ``kill``, a cluster's time limit) save ``last.ckpt`` before the process exits."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        ckpt = trainer.checkpoint_callback
        dirpath = ckpt.dirpath if ckpt is not None and ckpt.dirpath else os.path.join(trainer.default_root_dir,
                                                                                      "checkpoints")
        path = os.path.join(dirpath, "last.ckpt")
        trainer.save_checkpoint(path)
        if ckpt is not None:
            ckpt.last_model_path = path
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")


def find_last_checkpoint(save_dir: str | Path, name: str) -> Path | None:
    """The most recently written ``last.ckpt`` among the runs ``<save_dir>/<name>/version_*``, or None."""
    runs = [d for d in Path(save_dir, name).glob("*") if d.is_dir() and not d.is_symlink()]  # not `latest`
    found = [d / "checkpoints" / "last.ckpt" for d in runs if (d / "checkpoints" / "last.ckpt").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def weights_digest(directory: str | Path) -> str:
    """blake2b of a model directory's config.json and weights (every top-level ``*.safetensors``, by name)."""
    directory = Path(directory)
    h = hashlib.blake2b(digest_size=16)
    for f in [directory / "config.json", *sorted(directory.glob("*.safetensors"))]:
        if not f.is_file():
            continue
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
