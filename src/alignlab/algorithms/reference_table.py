"""Reference log-probs scored once and looked up by content: DPO's ``precompute_ref_logps=True``.

Before the first optimizer step the policy -- which at that point IS the reference -- scores every training
and validation pair once (``build``), and the summed completion log-probs are kept in a table. The table is
keyed by CONTENT, not by position: the key of a sequence is a 16-byte blake2b hash of its real token ids and
its loss mask, so any loader order, shuffling, padding length or duplicated row finds the same value and no
row index has to travel through the DataModule. ``build`` goes over the whole dataset of each loader (no
shuffle, no dropped last batch). ``lookup`` scores a sequence missing from the table on the fly while the
policy is still the starting one (e.g. ``trainer.validate`` before training); after ``freeze()`` (the first
optimizer step) a missing sequence is an error. ``state_dict`` / ``load_state_dict`` carry the table in
Lightning checkpoints, so a resumed run keeps its reference.

    table = ReferenceTable(score)         # score(batch) -> (chosen, rejected) log-probs of the starting policy
    table.build([train_loader, val_loader])
    ref_chosen, ref_rejected = table.lookup(batch, device)
    table.freeze()                        # the policy has changed: it is no reference any more
    checkpoint.update(table.state_dict()) ... table.load_state_dict(checkpoint)
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch.utils.data import DataLoader

SIDES = ("chosen", "rejected")
CKPT_KEYS, CKPT_LOGPS = "dpo_ref_keys", "dpo_ref_logps"  # the checkpoint's entries


def sequence_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> list[bytes]:
    """Content key of each row: blake2b-128 of its real token ids and of its loss mask over them. (B,) bytes."""
    keys = []
    for ids, m, lm in zip(input_ids.cpu(), attention_mask.cpu().bool(), loss_mask.cpu()):
        h = hashlib.blake2b(digest_size=16)
        h.update(ids[m].numpy().astype("int64").tobytes())
        h.update(lm[m].numpy().astype("int8").tobytes())
        keys.append(h.digest())
    return keys


def side_keys(batch: dict, side: str) -> list[bytes]:
    """Content keys of a preference batch's ``chosen`` or ``rejected`` rows."""
    return sequence_keys(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"])


class ReferenceTable:
    """Sequence content -> its summed completion log-prob under the starting policy."""

    def __init__(self, score: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]):
        """
        Args:
            score: a preference batch -> (chosen, rejected) summed completion log-probs, (B,) each, of the
                starting policy; called only before ``freeze()``.
        """
        self.score = score
        self.logps: dict[bytes, float] = {}
        self.frozen = False  # True once the policy has changed: it can no longer score missing rows

    def __len__(self) -> int:
        return len(self.logps)

    def add(self, batch: dict) -> None:
        """Score the batch's pairs and store both sides."""
        if self.frozen:
            raise RuntimeError("DPO(precompute_ref_logps=True): a pair that was not precomputed before training "
                               "reached the module after the policy changed, so its reference log-probs are lost. "
                               "Precomputation covers the DataModule's train and validation rows; "
                               "use precompute_ref_logps=false for other data.")
        for side, logps in zip(SIDES, self.score(batch)):
            self.logps.update(zip(side_keys(batch, side), logps.float().cpu().tolist()))

    def build(self, loaders: list[DataLoader]) -> int:
        """One pass over every row of each loader's dataset (no shuffle, nothing dropped); the number of new
        sequences."""
        n = len(self)
        for loader in loaders:
            full = DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False, drop_last=False,
                              collate_fn=loader.collate_fn)
            for batch in full:
                self.add(batch)
        return len(self) - n

    def lookup(self, batch: dict, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs of the batch, float32 on ``device``; rows missing from the
        table are scored first (an error after ``freeze()``)."""
        out = []
        for side in SIDES:
            keys = side_keys(batch, side)
            if any(k not in self.logps for k in keys):
                self.add(batch)
            out.append(torch.tensor([self.logps[k] for k in keys], device=device, dtype=torch.float32))
        return out[0], out[1]

    def freeze(self) -> None:
        """The policy has taken an optimizer step: from now on every sequence must be in the table."""
        self.frozen = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The table as two tensors: (N, 16) uint8 keys and (N,) float64 log-probs."""
        keys = list(self.logps)
        return {CKPT_KEYS: torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(-1, 16),
                CKPT_LOGPS: torch.tensor([self.logps[k] for k in keys], dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the table of ``state_dict`` (a checkpoint holding its entries)."""
        keys = [bytes(row) for row in state[CKPT_KEYS].tolist()]
        self.logps = dict(zip(keys, state[CKPT_LOGPS].tolist()))
