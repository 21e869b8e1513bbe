"""ScalarModel: per-token values, the score at the last real token under both paddings, save/load."""

import pytest
import torch
from conftest import tiny_arch

from alignlab.data.datamodule import pad
from alignlab.model.heads import HEAD_WEIGHTS, MARKER, ScalarModel, last_token_index
from alignlab.model.hf import save_hf
from alignlab.model.transformer import Transformer

SEQS = [[5, 6, 7, 8, 9, 2], [10, 11, 2], [12, 13, 14, 2]]


def model() -> ScalarModel:
    torch.manual_seed(0)
    m = ScalarModel(Transformer(tiny_arch())).eval()
    torch.nn.init.normal_(m.head.linear.weight, std=1.0)  # spread the values so positions differ clearly
    return m


def test_last_token_index_hand_case():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_score_is_value_at_last_real_token_for_right_and_left_padding():
    m = model()
    single = torch.stack([m.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in SEQS])
    with torch.no_grad():
        for side in ("right", "left"):
            ids, mask = pad(SEQS, 0, side)
            scores = m.score(ids, mask)
            torch.testing.assert_close(scores, single, atol=1e-5, rtol=0)
            values = m(ids, mask)  # (B, T)
            assert values.shape == ids.shape
            last = [len(s) - 1 if side == "right" else ids.shape[1] - 1 for s in SEQS]
            torch.testing.assert_close(scores, values[torch.arange(3), last])
    # and it is NOT the value at the last column for the right-padded short rows
    ids, mask = pad(SEQS, 0, "right")
    assert (m(ids, mask)[1:, -1] - single[1:]).abs().min() > 1e-3


def test_save_load_round_trip(tmp_path):
    m = model()
    m.save(tmp_path / "rm")
    assert (tmp_path / "rm" / HEAD_WEIGHTS).is_file() and (tmp_path / "rm" / MARKER).is_file()
    assert ScalarModel.is_scalar_model(tmp_path / "rm")
    back = ScalarModel.load(tmp_path / "rm").eval()
    ids, mask = pad(SEQS, 0, "right")
    with torch.no_grad():
        torch.testing.assert_close(back.score(ids, mask), m.score(ids, mask), atol=0, rtol=0)
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "rm")  # never overwrites silently
    m.save(tmp_path / "rm", overwrite=True)


def test_from_policy_keeps_trunk_and_adds_small_fresh_head(tmp_path):
    torch.manual_seed(0)
    policy = Transformer(tiny_arch())
    save_hf(policy, tmp_path / "policy")
    with pytest.raises(FileNotFoundError, match="not an alignlab reward"):
        ScalarModel.load(tmp_path / "policy")
    m = ScalarModel.from_policy(tmp_path / "policy").eval()
    for (name, a), b in zip(policy.state_dict().items(), m.trunk.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    ids, mask = pad(SEQS, 0, "right")
    with torch.no_grad():
        assert m.score(ids, mask).abs().max() < 1.0  # small init: rewards start near 0
