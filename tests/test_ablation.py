"""The DAPO ablation driver: cumulative variants, the summary of event files, the dry run of every variant."""

import math
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from alignlab import ablation

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ variants
def test_variants_add_one_technique_each_from_grpo_to_dapo():
    import inspect

    from alignlab.algorithms import DAPO

    v = list(ablation.variants().values())
    assert len(v) == 6
    assert v[0] == ablation.GRPO  # beta 0, symmetric clip, seq-mean-token-mean, no shaping/filtering/sampling
    for before, after, (_, change) in zip(v, v[1:], ablation.STEPS[1:]):
        assert {k for k in after if after[k] != before[k]} == set(change)  # exactly one switch changes
    defaults = {k: p.default for k, p in inspect.signature(DAPO.__init__).parameters.items()}
    assert all(v[-1][k] == defaults[k] for k in v[-1]), v[-1]  # the last row is DAPO's defaults


# ------------------------------------------------------------------------------------ summarize
def write_run(path: Path, val: dict[int, float], lengths: list[float], entropy: list[float], t0: float,
              t1: float, gen_rounds: float | None = None):
    """One synthetic run: val/accuracy at the given steps, one length/entropy point per step from 0."""
    w = SummaryWriter(str(path))
    for step, (n, h) in enumerate(zip(lengths, entropy)):
        w.add_scalar("completions/mean_length", n, step, walltime=t0 + step)
        w.add_scalar("train/clip_ratio/high", 0.001 * (step % 2), step, walltime=t0 + step)  # mean 0.05%
        if gen_rounds is not None:
            w.add_scalar("train/gen_rounds", gen_rounds + (step % 2 - 0.5), step, walltime=t0 + step)
        w.add_scalar("completions/clipped_ratio", 0.1 if n >= 8 else 0.0, step, walltime=t0 + step)
        w.add_scalar("train/entropy", h, step, walltime=t0 + step)
    for step, acc in val.items():
        w.add_scalar("val/accuracy", acc, step, walltime=t1 if step == max(val) else t0 + step)
    w.close()


@pytest.fixture
def synthetic(tmp_path):
    """Two variants: GRPO with 2 seeds, DAPO with 3; 8 training steps (0..7), validation at steps 3 and 7."""
    logs = tmp_path / "ablation"
    write_run(logs / "1-grpo" / "seed0", {3: 0.40, 7: 0.50}, [1, 2, 3, 4, 5, 6, 7, 8], [2.0] * 8, 100, 160)
    write_run(logs / "1-grpo" / "seed1", {3: 0.60, 7: 0.70}, [2, 3, 4, 5, 6, 7, 8, 9], [1.0] * 8, 100, 140)
    for seed, final in enumerate([0.6, 0.7, 0.8]):
        write_run(logs / "6-dynamic_sampling" / f"seed{seed}", {3: 0.5, 7: final}, [10] * 8, [0.5] * 8, 0, 30,
                  gen_rounds=2.0 + seed)  # mean 3.0 over seeds
    (logs / "sft" / "version_0").mkdir(parents=True)  # the SFT start is not a variant
    return logs


def test_load_run_reads_the_event_files(synthetic):
    run = ablation.load_run(synthetic / "1-grpo" / "seed0")
    assert run.val == {4: pytest.approx(0.40), 8: pytest.approx(0.50)}  # step k = k + 1 batches trained
    assert run.steps == 8
    assert run.wall_time == pytest.approx(60.0)
    assert run.length == pytest.approx(7.5)  # the last quarter: steps 6 and 7 -> (7 + 8) / 2
    assert run.truncated == pytest.approx(0.05)  # lengths 7, 8 -> truncated 0.0, 0.1
    assert run.entropy == pytest.approx(2.0)
    assert run.clip_high == pytest.approx(0.0005) and run.gen_rounds == 1.0  # no dynamic sampling: 1 round


def test_summary_table_has_means_and_sample_std_over_seeds(synthetic, tmp_path):
    text = ablation.summarize(synthetic, tmp_path / "results")
    assert (tmp_path / "results" / "ablation.md").read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows[0] == ("| variant | seeds | steps | final val accuracy | completion length | truncated "
                       "| entropy | upper-clipped tokens | generation rounds / step | wall time / run |")
    assert len(rows) == 4  # header, separator, one row per variant (not the sft directory)
    # GRPO: final accuracies 0.5, 0.7 -> mean 0.6, sample std 0.1414; lengths 7.5, 8.5 -> 8.0; entropy 1.5
    # truncated: (0.05 + 0.1) / 2
    assert rows[2] == "| GRPO | 2 | 8 | 0.600 ± 0.141 | 8.0 | 7.5% | 1.500 | 0.0500% | 1.00 | 50 s |"
    # DAPO: 0.6, 0.7, 0.8 -> 0.7 +- 0.1
    assert rows[3] == ("| + dynamic sampling (= DAPO) | 3 | 8 | 0.700 ± 0.100 | 10.0 | 10.0% | 0.500 "
                       "| 0.0500% | 3.00 | 30 s |")


def test_mean_std_is_the_sample_std():
    assert ablation.mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert ablation.mean_std([0.3]) == (0.3, 0.0)


def test_plot_is_written_with_matplotlib(synthetic, tmp_path):
    pytest.importorskip("matplotlib")
    ablation.summarize(synthetic, tmp_path)
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "ablation.md").is_file()


def test_plot_is_skipped_with_one_line_without_matplotlib(synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    ablation.summarize(synthetic, tmp_path)
    assert not (tmp_path / "ablation.png").exists()
    assert (tmp_path / "ablation.md").is_file()  # the table is still written
    out = capsys.readouterr().out
    assert "plot skipped: matplotlib is not installed (pip install -e '.[plot]')" in out


def test_summarize_without_runs_is_one_clear_error(tmp_path):
    (tmp_path / "ablation").mkdir()
    with pytest.raises(SystemExit, match="no runs with event files"):
        ablation.summarize(tmp_path / "ablation", tmp_path / "results")


# ------------------------------------------------------------------------------------ dry run
def test_dry_run_trains_every_variant_from_one_sft_export(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/ is read relative to the repository, as by make
    logs, out = tmp_path / "ablation", tmp_path / "results"
    ablation.main(["run", "--dry-run", "--seeds", "0", "--logs", str(logs), "--out", str(out)])
    export = (logs / "sft" / "latest_hf").resolve()
    names = list(ablation.variants())
    for name in names:
        run = logs / name / "seed0"
        assert (run / "hf" / "config.json").is_file()  # an ordinary run: events, config.yaml, export
        config = (run / "config.yaml").read_text()
        assert f"init_from: {logs / 'sft' / 'latest_hf'}" in config and "max_steps: 4" in config
        assert ablation.load_run(run).steps == 2
    assert export.is_dir()
    rows = [line for line in (out / "ablation.md").read_text().splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == [ablation.LABELS[n] for n in names]
    # a second run keeps the finished runs, and a different budget is refused
    ablation.main(["run", "--dry-run", "--seeds", "0", "--logs", str(logs), "--out", str(out),
                   "--only", "1-grpo"])
    with pytest.raises(SystemExit, match="ran max_steps=4, this ablation wants 10"):
        ablation.run(logs, [0], 5, 1, False, ["1-grpo"])  # 5 rollouts x 2 minibatches
