"""make results: every stage per seed in its own directory, start and end measured, the table over seeds."""

import json

import pytest

from alignlab import results


def test_results_runs_each_seed_in_its_own_logs_and_tabulates_start_and_end(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "baselines.md"
    argv = ["run", "--seeds", "0", "1", "--stages", "sft", "--root", str(root), "--out", str(out),
            "--extra", "--trainer.max_steps=2", "--data.num_train=128", "--data.num_val=8"]
    results.main(argv)
    for seed in (0, 1):  # a fresh logs/ per seed, the stage's export where the next stage looks for it
        assert (root / f"seed_{seed}" / "logs" / "sft" / "latest_hf" / "config.json").is_file()
    table = out.read_text()
    assert "| sft | 2 | 2 |" in table  # 2 seeds, 2 steps
    summary = json.loads(out.with_suffix(".json").read_text())
    runs = summary["sft"]["runs"]
    assert len(runs) == 2 and all(r["start"] is not None and r["steps"] == 2 and r["seconds"] > 0 for r in runs)
    assert summary["sft"]["gain_mean"] == sum(r["end"] - r["start"] for r in runs) / 2
    results.main(argv)  # finished stages are kept: no second run directory
    assert [p.name for p in (root / "seed_0" / "logs" / "sft").glob("version_*")] == ["version_0"]


def test_a_sweep_elsewhere_writes_its_table_beside_its_runs(tmp_path, monkeypatch):
    """--root other than make results' own, no --out: the table goes to ROOT/baselines.md, and the committed
    results/baselines.md is not touched (only make results' root writes there)."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "sweep"
    results.main(["summarize", "--seeds", "0", "--stages", "sft", "--root", str(root)])
    assert (root / "baselines.md").is_file() and (root / "baselines.json").is_file()
    assert not (tmp_path / results.OUT).exists()
    results.main(["summarize", "--seeds", "0", "--stages", "sft"])  # make results' root: the committed file
    assert (tmp_path / results.OUT).is_file()


def test_the_table_comes_with_a_plot_of_the_rl_curves(tmp_path):
    """With matplotlib, summarize draws results/baselines.png beside the table: the RL stages' val/accuracy
    curves over seeds (here from synthetic event files: two seeds, one stage)."""
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path / "runs"
    for seed in (0, 1):
        for stage, values in (("sft", [0.5 + seed / 10]), ("grpo", [0.5 + seed / 10, 0.6, 0.7 + seed / 10])):
            writer = SummaryWriter(str(root / f"seed_{seed}" / "logs" / stage / "version_0"))
            writer.add_scalar("train/reward", 0.1, 0)
            for i, v in enumerate(values):
                writer.add_scalar("val/accuracy", v, 10 * i + 9)
            writer.close()
    results.main(["summarize", "--seeds", "0", "1", "--stages", "sft", "grpo", "--root", str(root)])
    assert (root / "baselines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results.plot(root, [0, 1], ["sft"], tmp_path / "none.png") is False  # no RL stage: nothing drawn
