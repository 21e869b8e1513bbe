"""algorithms/reference_table.py on its own: content keys, build/lookup, freeze, the checkpoint entries."""

import pytest
import torch
from conftest import datamodule

from alignlab.algorithms.reference_table import ReferenceTable, sequence_keys


def scorer(calls):
    """A stand-in for the starting policy: a sequence's 'log-prob' is minus the sum of its scored token ids."""
    def score(batch):
        calls.append(batch["chosen_input_ids"].shape[0])
        return tuple(-(batch[f"{s}_input_ids"] * batch[f"{s}_loss_mask"]).sum(-1).double() for s in ("chosen", "rejected"))
    return score


def first_batch(seed):
    dm = datamodule("preference", num_train=40, num_val=10, batch_size=16, seed=seed)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_keys_are_the_content_not_the_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    loss = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]])
    keys = sequence_keys(ids, mask, loss)
    assert len(keys[0]) == 16 and keys[0] != keys[1]
    wider = sequence_keys(torch.cat([ids, torch.full((2, 3), 9)], 1), torch.cat([mask, torch.zeros(2, 3, dtype=int)], 1),
                          torch.cat([loss, torch.zeros(2, 3, dtype=int)], 1))
    assert wider == keys  # other padding length and pad ids: the same keys
    assert sequence_keys(ids, mask, torch.tensor([[0, 0, 1, 0, 0]] * 2)) != keys  # the loss mask is part of it


def test_build_lookup_freeze_and_checkpoint_entries():
    dm = datamodule("preference", num_train=40, num_val=10, batch_size=16)
    dm.setup("fit")
    calls = []
    table = ReferenceTable(scorer(calls))
    new = table.build([dm.train_dataloader(), dm.val_dataloader()])
    assert new == len(table) > 0 and sum(calls) == 50  # every row once, the last partial batch too
    batch = next(iter(dm.train_dataloader()))
    chosen, rejected = table.lookup(batch, "cpu")
    expected = scorer([])(batch)
    assert chosen.dtype == torch.float32 and torch.equal(chosen, expected[0].float())
    assert torch.equal(rejected, expected[1].float()) and sum(calls) == 50  # looked up, not scored again
    table.lookup(first_batch(seed=99), "cpu")  # not frozen: a missing row is scored on the fly
    assert sum(calls) == 66
    state = table.state_dict()
    assert sorted(state) == ["dpo_ref_keys", "dpo_ref_logps"]
    assert state["dpo_ref_keys"].dtype == torch.uint8 and state["dpo_ref_keys"].shape == (len(table), 16)
    assert state["dpo_ref_logps"].dtype == torch.float64 and state["dpo_ref_logps"].shape == (len(table),)
    again = ReferenceTable(scorer([]))
    again.load_state_dict(state)
    assert again.logps == table.logps
    table.freeze()
    with pytest.raises(RuntimeError, match="not precomputed"):
        table.lookup(first_batch(seed=7), "cpu")
