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
- ``read_checkpoint``, ``check_weights``: what the CLI asks of a ``--ckpt_path`` before anything runs: a
  readable Lightning checkpoint of this run's algorithm whose weights fit this run's model; else one line
  saying what is wrong.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
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
    runs = [d for d in Path(save_dir, name).glob("*") if d.is_dir() and not d.is_symlink()]  # not a link
    found = [d / "checkpoints" / "last.ckpt" for d in runs if (d / "checkpoints" / "last.ckpt").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_checkpoint(path: str | Path, model_class: type | None = None) -> dict:
    """The Lightning checkpoint at ``path`` (tensors memory-mapped, not read), or a ``ValueError`` naming the
    file and what is wrong: unreadable, not a Lightning checkpoint, or written by another class than
    ``model_class`` (the algorithm this run configures)."""
    where = f"ckpt_path: {path}"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...: which one depends on the bytes
        raise ValueError(f"{where}: {unreadable(Path(path), e)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{where}: not a Lightning checkpoint (a torch.save file without a state_dict)")
    written_by = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if model_class is not None and written_by is not None and resolve(written_by) is not model_class:
        raise ValueError(f"{where}: a checkpoint of {written_by}, not of this run's model "
                         f"({model_class.__name__})")
    return ckpt


def check_weights(path: str | Path, model: L.LightningModule) -> None:
    """A ``ValueError`` unless the checkpoint's weights have the names and shapes of ``model``'s."""
    where = f"ckpt_path: {path}"
    ckpt = read_checkpoint(path, type(model))
    expected, found = model.state_dict(), ckpt["state_dict"]
    # frozen weights the checkpoint left out to be reloaded from a directory (PolicyModule.on_save_checkpoint):
    # present as far as shapes go; on_load_checkpoint checks their directory's digest
    rebuilt = tuple(ckpt.get("rebuilt_from") or ())
    found = {**{k: v for k, v in expected.items() if rebuilt and k.startswith(rebuilt)}, **found}
    for key, value in found.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{where}: another model shape: {key} is {tuple(value.shape)} in the "
                             f"checkpoint, {tuple(expected[key].shape)} in this run's model (built from "
                             f"init_from or arch)")
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if model.strict_loading and (missing or unexpected):
        what = [f"{name} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
                for name, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ValueError(f"{where}: its weights do not fit this run's model ({'; '.join(what)}): written "
                         f"with other options or by another version of alignlab")


def unreadable(path: Path, error: Exception) -> str:
    """Why ``torch.load`` failed, in words: Lightning writes checkpoints as torch.save's zip archive."""
    if path.stat().st_size == 0:
        return "an empty file, not a checkpoint"
    with open(path, "rb") as f:
        zip_start = f.read(4) == b"PK\x03\x04"
    if not zipfile.is_zipfile(path):
        return ("truncated or damaged: a torch.save archive whose end is missing" if zip_start else
                "not a checkpoint: not a torch.save archive")
    detail = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if detail and detail[0].startswith("Weights only load failed"):
        boilerplate = ("Check the documentation", "Please file")
        reason = next((ln for ln in detail[1:] if not ln.startswith(boilerplate)), "")
        return f"holds objects other than tensors and plain containers, which are never loaded ({reason})"
    return f"damaged: {detail[0] if detail else type(error).__name__}"


def resolve(class_path: str):
    """The class a checkpoint's ``_class_path`` names among the modules already imported (a file's contents
    never make us import anything), or None."""
    module, _, name = class_path.rpartition(".")
    return getattr(sys.modules.get(module), name, None)

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
