"""The DAPO ablation in miniature (Yu et al. 2025, Table 1): GRPO, then each DAPO technique added in turn.

    python -m alignlab.ablation run [--seeds 0 1 2] [--steps 100] [--dry-run]   (= make ablation [DRY=1])
    python -m alignlab.ablation summarize [--logs logs/ablation] [--out results]

``run`` trains the ablation's SFT start once (configs/ablation/sft.yaml -> logs/ablation/sft/latest_hf),
then every variant x seed from that same export with the same budget, each an ordinary run of
``python -m alignlab fit`` (configs/base.yaml + configs/algo/dapo.yaml + configs/ablation/rl.yaml + the
variant's switches) logged to ``logs/ablation/<variant>/seed<k>`` (``tensorboard --logdir logs/ablation``
shows them together). Then ``summarize`` reads the TensorBoard event files and writes
``results/ablation.md`` and, with matplotlib, ``results/ablation.png``.

The variants are cumulative, as in the paper's table (``model.*`` switches of ``alignlab.algorithms.DAPO``):

| variant              | adds                                                                           |
|----------------------|--------------------------------------------------------------------------------|
| 1-grpo               | GRPO: clip [0.8, 1.2], seq-mean-token-mean, no length shaping or filtering      |
| 2-overlong_filter    | mask_truncated_completions: truncated completions get zero loss weight         |
| 3-clip_higher        | epsilon_high 0.28: clip range [0.8, 1.28]                                      |
| 4-soft_overlong      | overlong_buffer_len 4 (L_cache): reward penalty 0 at L_max - 4, -1 at L_max     |
| 5-token_loss         | loss_agg_mode token-mean: every token of the batch weighs the same             |
| 6-dynamic_sampling   | dynamic_sampling: only groups with mixed rewards (= DAPO)                      |

Every variant runs without the KL term (beta 0): the paper drops the KL term up front, not as a row of its
table. Budgets count rollout batches (16 prompts x 8 samples); each is split into 2 minibatches
(configs/ablation/rl.yaml), so ``trainer.max_steps`` = 2 x steps, and the second minibatch sees ratios
away from 1: with one update per rollout the ratio is exactly 1 and no clip range could matter
(docs/grpo_dapo.md, "Why the GRPO loss starts at 0"). Results, which effects reproduce: docs/ablation.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import yaml

from alignlab.train import CONFIGS  # the repository's configs/, wherever this runs from


# cumulative switches on top of configs/algo/dapo.yaml: the first row turns DAPO back into GRPO (beta 0)
GRPO = {"beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.2, "mask_truncated_completions": False,
        "overlong_buffer_len": 0, "loss_agg_mode": "seq-mean-token-mean", "dynamic_sampling": False}
STEPS = [
    ("1-grpo", {}),
    ("2-overlong_filter", {"mask_truncated_completions": True}),
    ("3-clip_higher", {"epsilon_high": 0.28}),
    ("4-soft_overlong", {"overlong_buffer_len": 4}),
    ("5-token_loss", {"loss_agg_mode": "token-mean"}),
    ("6-dynamic_sampling", {"dynamic_sampling": True}),
]
LABELS = {"1-grpo": "GRPO", "2-overlong_filter": "+ overlong filtering", "3-clip_higher": "+ clip-higher",
          "4-soft_overlong": "+ soft overlong punishment", "5-token_loss": "+ token-level loss",
          "6-dynamic_sampling": "+ dynamic sampling (= DAPO)"}


def variants() -> dict[str, dict]:
    """variant name -> its full set of DAPO switches (each row adds one change to the row above)."""
    out, switches = {}, dict(GRPO)
    for name, change in STEPS:
        switches = {**switches, **change}
        out[name] = switches
    return out


# ------------------------------------------------------------------------------------------- run
# --dry-run: every stage for 2 steps on a tiny batch (the plumbing, not the learning); used by the tests
DRY_SFT = ["--trainer.max_steps", "60", "--trainer.val_check_interval", "60", "--data.num_val", "16",
           "--data.num_train", "2000"]
DRY_RL = ["--model.init_args.num_generations", "4", "--data.batch_size", "4", "--data.num_val", "16",
          "--data.num_train", "2000", "--model.init_args.max_gen_rounds", "64",
          "--model.init_args.minibatches", "2", "--trainer.log_every_n_steps", "1"]


def fit(args: list[str]) -> None:
    """One ordinary ``python -m alignlab fit`` run, in this process."""
    from alignlab.cli import main

    print("+ python -m alignlab fit " + " ".join(args), flush=True)
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # LightningCLI reads args only
        main(["fit", *args])


def finished(run_dir: Path) -> bool:
    return (run_dir / "hf" / "config.json").is_file()


def ensure_sft(logs: Path, dry_run: bool) -> Path:
    """The ablation's SFT export (trained once, shared by every variant and seed)."""
    export = logs / "sft" / "latest_hf"
    if not (export / "config.json").is_file():
        print(f"[ablation] {export} is missing: training the SFT start (configs/ablation/sft.yaml)",
              flush=True)
        fit(["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "algo" / "sft.yaml"),
             "--config", str(CONFIGS / "ablation" / "sft.yaml"), "--trainer.logger.init_args.save_dir",
             str(logs.parent), "--trainer.logger.init_args.name", f"{logs.name}/sft",
             *(DRY_SFT if dry_run else [])])
    return export


def max_steps(steps: int, dry_run: bool) -> int:
    """trainer.max_steps counts optimizer steps: ``minibatches`` (ablation/rl.yaml) per rollout batch."""
    rl = yaml.safe_load((CONFIGS / "ablation" / "rl.yaml").read_text())
    return steps * (2 if dry_run else rl["model"]["init_args"]["minibatches"])


def run_args(logs: Path, variant: str, seed: int, steps: int, val_every: int, export: Path,
             dry_run: bool) -> list[str]:
    """The CLI arguments of one variant x seed; ``steps`` and ``val_every`` count rollout batches."""
    args = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "algo" / "dapo.yaml"),
            "--config", str(CONFIGS / "ablation" / "rl.yaml"),
            "--seed_everything", str(seed), "--model.init_args.sampling_seed", str(seed),
            "--model.init_args.init_from", str(export),
            "--trainer.max_steps", str(max_steps(steps, dry_run)),
            "--trainer.val_check_interval", str(val_every),
            "--trainer.logger.init_args.save_dir", str(logs.parent),
            "--trainer.logger.init_args.name", f"{logs.name}/{variant}",
            "--trainer.logger.init_args.version", f"seed{seed}"]
    for key, value in variants()[variant].items():
        args += [f"--model.init_args.{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args + (DRY_RL if dry_run else [])


def run(logs: Path, seeds: list[int], steps: int, val_every: int, dry_run: bool,
        only: list[str] | None = None) -> None:
    """Every variant x seed (finished runs with the same budget are kept: rerunning resumes the ablation)."""
    if dry_run:
        steps, val_every = 2, 2
    export = ensure_sft(logs, dry_run)
    names = only or list(variants())
    for name in names:
        if name not in variants():
            raise SystemExit(f"error: --only: unknown variant {name!r}; known: {', '.join(variants())}")
    for seed in seeds:  # seed-major: an interrupted ablation still has every variant for the first seeds
        for name in names:
            run_dir = logs / name / f"seed{seed}"
            if finished(run_dir):
                done = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"]
                wanted = max_steps(steps, dry_run)
                if done != wanted:
                    raise SystemExit(f"error: {run_dir} ran max_steps={done}, this ablation wants {wanted}: "
                                     f"remove {logs} or pass another --logs")
                print(f"[ablation] {run_dir} is done: kept", flush=True)
                continue
            if run_dir.exists():  # an interrupted run: start it again
                shutil.rmtree(run_dir)
            t0 = time.time()
            fit(run_args(logs, name, seed, steps, val_every, export, dry_run))
            print(f"[ablation] {run_dir}: {time.time() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------- summarize
@dataclass
class Run:
    """What the summary needs from one run's event files."""

    val: dict[int, float]  # rollout batches trained -> val/accuracy
    steps: int  # rollout batches trained
    wall_time: float  # seconds from the first to the last event
    length: float  # completions/mean_length, mean over the last quarter of training
    truncated: float  # completions/clipped_ratio (no EOS within L_max), mean over the last quarter
    entropy: float  # train/entropy, mean over the last quarter of training
    clip_high: float  # train/clip_ratio/high: share of tokens held by the upper clip, mean over training
    gen_rounds: float  # train/gen_rounds (dynamic sampling; 1 without), mean over training


def tail_mean(events, frac: float = 0.25) -> float:
    """The mean of the last ``frac`` of a scalar's values (nan if it was never logged)."""
    values = [e.value for e in events]
    k = max(1, round(len(values) * frac))
    return statistics.fmean(values[-k:]) if values else float("nan")


def load_run(run_dir: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0 = keep every event
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    if "val/accuracy" not in tags:
        raise ValueError(f"{run_dir}: no val/accuracy in its event files")
    scalars = {t: acc.Scalars(t) for t in tags}
    walls = [e.wall_time for evs in scalars.values() for e in evs]
    get = lambda tag: scalars.get(tag, [])  # noqa: E731
    # TensorBoard's step is the 0-based index of the rollout batch: step k = k + 1 batches trained
    return Run(val={e.step + 1: e.value for e in get("val/accuracy")},
               steps=max(e.step for evs in scalars.values() for e in evs) + 1,
               wall_time=max(walls) - min(walls),
               length=tail_mean(get("completions/mean_length")),
               truncated=tail_mean(get("completions/clipped_ratio")), entropy=tail_mean(get("train/entropy")),
               clip_high=tail_mean(get("train/clip_ratio/high"), 1.0),
               gen_rounds=tail_mean(get("train/gen_rounds"), 1.0) if "train/gen_rounds" in tags else 1.0)


def load(logs: Path) -> dict[str, list[Run]]:
    """variant -> its runs (one per ``seed*`` directory), variants in the order of the table."""
    out = {}
    for vdir in sorted(p for p in logs.iterdir() if p.is_dir() and p.name != "sft"):
        runs = [load_run(s) for s in sorted(vdir.glob("seed*")) if any(s.glob("events.out.tfevents.*"))]
        if runs:
            out[vdir.name] = runs
    if not out:
        raise SystemExit(f"error: no runs with event files under {logs}/<variant>/seed*/")
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std 0 for a single value."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(results: dict[str, list[Run]]) -> str:
    """The markdown table: one row per variant, final validation accuracy as mean +- std over seeds."""
    rows = ["| variant | seeds | steps | final val accuracy | completion length | truncated | entropy "
            "| upper-clipped tokens | generation rounds / step | wall time / run |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        acc = mean_std([r.val[max(r.val)] for r in runs])
        steps = sorted({r.steps for r in runs})
        rows.append(f"| {LABELS.get(name, name)} | {len(runs)} | {'/'.join(map(str, steps))} "
                    f"| {acc[0]:.3f} ± {acc[1]:.3f} | {statistics.fmean(r.length for r in runs):.1f} "
                    f"| {statistics.fmean(r.truncated for r in runs):.1%} "
                    f"| {statistics.fmean(r.entropy for r in runs):.3f} "
                    f"| {statistics.fmean(r.clip_high for r in runs):.4%} "
                    f"| {statistics.fmean(r.gen_rounds for r in runs):.2f} "
                    f"| {statistics.fmean(r.wall_time for r in runs):.0f} s |")
    return "\n".join(rows) + "\n"


def plot(results: dict[str, list[Run]], path: Path, sft: float | None = None, title: str = "DAPO ablation") -> bool:
    """Validation accuracy against step, mean over seeds with a +-1 std band; False without matplotlib.
    (``results.py`` draws ``make results``' curves with it too: anything with a ``val`` {step: accuracy}.)"""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        steps = sorted(set.intersection(*(set(r.val) for r in runs)))  # steps every seed has
        stats = [mean_std([r.val[s] for r in runs]) for s in steps]
        if sft is not None:  # step 0: every variant is the SFT export
            steps, stats = [0, *steps], [(sft, 0.0), *stats]
        mean = [m for m, _ in stats]
        line, = ax.plot(steps, mean, marker=".", label=LABELS.get(name, name))
        ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], color=line.get_color(),
                        alpha=0.15, linewidth=0)
    if sft is not None:
        ax.axhline(sft, color="gray", linestyle="--", linewidth=1, label="SFT start")
    n = sorted({len(runs) for runs in results.values()})
    ax.set(xlabel="training step (rollout batches)", ylabel="validation accuracy (greedy)",
           title=f"{title}: mean ± std over {'/'.join(map(str, n))} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def sft_accuracy(logs: Path) -> float | None:
    """The last validation accuracy of the shared SFT start, if its event files are there."""
    run = (logs / "sft" / "latest_hf").resolve().parent
    if not any(run.glob("events.out.tfevents.*")):
        return None
    val = load_run(run).val
    return val[max(val)]


def summarize(logs: Path, out: Path) -> str:
    results, sft = load(logs), sft_accuracy(logs)
    start = "" if sft is None else f"Every variant starts from one SFT export (val accuracy {sft:.3f}). "
    text = (f"# DAPO ablation ({logs})\n\n{start}Cumulative: each row adds one technique to the "
            "row above. Final validation accuracy: greedy, at the last validation, mean ± sample std over "
            "seeds. Completion length (tokens, EOS included), truncated share (no EOS within L_max) and "
            "entropy: training rollouts, mean over the last quarter of training and over seeds. "
            "Upper-clipped tokens (ratio > 1 + eps_high with A > 0) and generation rounds per step "
            "(dynamic sampling): mean over training. Wall time: first to last logged event of a run.\n\n"
            + table(results))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text)
    print(text, end="")
    print(f"[ablation] wrote {out / 'ablation.md'}")
    if plot(results, out / "ablation.png", sft):
        print(f"[ablation] wrote {out / 'ablation.png'}")
    else:
        print("[ablation] plot skipped: matplotlib is not installed (pip install -e '.[plot]')")
    return text


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alignlab.ablation", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train every variant x seed, then summarize")
    p_run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p_run.add_argument("--steps", type=int, default=100, help="rollout batches per run (the same for all)")
    p_run.add_argument("--val-every", type=int, default=10, help="validate every N rollout batches")
    p_run.add_argument("--only", nargs="+", help="run only these variants")
    p_run.add_argument("--dry-run", action="store_true", help="every stage for 2 steps on tiny batches")
    p_sum = sub.add_parser("summarize", help="read the event files: results/ablation.md and .png")
    for p in (p_run, p_sum):
        p.add_argument("--logs", type=Path, help="log root (logs/ablation; dry run: logs/ablation-dry)")
        p.add_argument("--out", type=Path, help="where ablation.md/.png go (results; dry run: the log root)")
    a = parser.parse_args(sys.argv[1:] if argv is None else argv)
    dry = getattr(a, "dry_run", False)  # a dry run never touches the real runs or results/
    a.logs = a.logs or Path("logs/ablation-dry" if dry else "logs/ablation")
    a.out = a.out or (a.logs if dry else Path("results"))
    if a.command == "run":
        if a.steps < 1 or a.val_every < 1:
            parser.error("--steps and --val-every must be >= 1")
        run(a.logs, a.seeds, a.steps, a.val_every, a.dry_run, a.only)
    summarize(a.logs, a.out)


if __name__ == "__main__":
    main()
