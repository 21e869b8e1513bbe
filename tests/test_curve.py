"""alignlab.curve: a run's val/accuracy and windowed train/reward, read back from TensorBoard events."""

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from alignlab.curve import curve, main, markdown


def test_curve_rows_are_validations_with_the_mean_reward_since_the_last(tmp_path, capsys):
    w = SummaryWriter(str(tmp_path))
    w.add_scalar("val/accuracy", 0.25, 0, walltime=100.0)  # ValidateAtStart, before any step
    for step in range(6):
        w.add_scalar("train/reward", float(step), step, walltime=110.0 + step)
    w.add_scalar("val/accuracy", 0.5, 2, walltime=120.0)   # after step 3 (Lightning logs it at 2)
    w.add_scalar("val/accuracy", 0.75, 5, walltime=160.0)  # after step 6
    w.close()
    rows = curve(tmp_path)
    assert [r["after_step"] for r in rows] == [0, 3, 6]
    assert [r["val/accuracy"] for r in rows] == [0.25, 0.5, 0.75]
    assert [r["mean train/reward"] for r in rows] == [None, 1.0, 4.0]  # steps 0-2, then 3-5
    assert [r["minutes"] for r in rows] == [0.0, 0.3, 1.0]
    assert markdown(rows).splitlines()[2] == "| 0 | 0.0 | 0.25 |  |"
    main([str(tmp_path), "--json", str(tmp_path / "c.json")])
    assert capsys.readouterr().out.splitlines()[3] == "| 3 | 0.3 | 0.5 | 1.0 |"
    assert json.loads((tmp_path / "c.json").read_text()) == rows


def test_curve_of_a_missing_or_empty_run_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no such run directory"):
        main([str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no val/accuracy"):
        main([str(tmp_path)])


def test_a_run_without_rewards_shows_its_training_loss(tmp_path):
    w = SummaryWriter(str(tmp_path))
    w.add_scalar("val/accuracy", 0.1, 0, walltime=100.0)
    for step in range(4):
        w.add_scalar("train/loss", 4.0 - step, step, walltime=110.0 + step)
    w.add_scalar("val/accuracy", 0.9, 3, walltime=120.0)
    w.close()
    rows = curve(tmp_path)
    assert [r["after_step"] for r in rows] == [0, 4] and rows[1]["mean train/loss"] == 2.5
