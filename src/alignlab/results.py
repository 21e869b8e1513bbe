"""``make results``: every default stage for several seeds, from a fresh ``logs/``, and the table of them.

    python -m alignlab.results run [--seeds 0 1 2 3 4] [--stages sft rm dpo ppo grpo dapo] [--root logs/results]
    python -m alignlab.results summarize [--root logs/results] [--out results/baselines.md]

``run`` gives each seed a directory of its own, ``<root>/seed_<k>``, and runs there, in order, what
``make train ALGO=<stage>`` runs (``python -m alignlab.train <stage>``, the stage's default config) with
``--seed_everything=k --model.init_args.sampling_seed=k`` and a validation before the first step
(``alignlab.callbacks.ValidateAtStart``), so each stage's start is measured by the same validation as its
end. Later stages start from that seed's earlier exports (``logs/sft/latest_hf``, ``logs/rm/latest_hf``), as
in ``make train``. Stages already finished (their export exists) are kept, so ``run`` resumes a partial
sweep; ``--fresh`` deletes ``<root>`` first.

``summarize`` reads every run's TensorBoard events (``alignlab.curve``) and writes a Markdown table: for each
stage the start and end ``val/accuracy`` mean +- std over the seeds (greedy accuracy on held-out prompts;
for the reward model, pairwise accuracy on held-out pairs), the gain, the smallest gain, whether the gain
exceeds the seeds' std of it, steps and wall time; JSON beside it. A stage learns "over seeds" here when its
mean gain exceeds the std of its gains and its smallest gain is > 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from alignlab import ablation, train

STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "dapo")
DEMOS = ("hacking/rm", "hacking/ppo")  # the reward-hacking demonstration (configs/recipes/hacking/)
START = "--trainer.callbacks+=alignlab.callbacks.ValidateAtStart"


ROOT, OUT = Path("logs/results"), Path("results/baselines.md")  # make results: the runs, the committed table
REWARD_MODELS = ("rm", "hacking/rm")  # their val/accuracy is pairwise accuracy, not drawn with the policies'


def commit() -> str:
    """The checkout's commit (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def seed_dir(root: Path, seed: int) -> Path:
    return root / f"seed_{seed}"


def run_stage(root: Path, seed: int, stage: str, extra: list[str]) -> float:
    """Run one stage for one seed in its directory; the wall time in seconds (0 if it was already done)."""
    cwd = seed_dir(root, seed)
    if (cwd / "logs" / stage / "latest_hf" / "config.json").is_file():
        return 0.0
    cwd.mkdir(parents=True, exist_ok=True)
    algo, recipe = train.split_stage(stage)
    cmd = [sys.executable, "-m", "alignlab.train", algo, *(["--recipe", recipe] if recipe else []), f"--seed_everything={seed}",
           f"--model.init_args.sampling_seed={seed}", START, "--trainer.enable_progress_bar=false", *extra]
    print(f"[results] seed {seed}: {stage} ({cwd})", flush=True)
    t0 = time.time()
    log_file = cwd / f"{stage.replace('/', '_')}.log"
    with open(log_file, "w") as log:
        code = subprocess.call(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"error: seed {seed} stage {stage} failed (exit {code}); see {log_file}")
    seconds = time.time() - t0
    (cwd / "logs" / stage / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


def stage_curve(root: Path, seed: int, stage: str) -> list[dict] | None:
    """alignlab.curve of the stage's last run for that seed (None if it has not run)."""
    from alignlab.curve import curve

    runs = sorted((seed_dir(root, seed) / "logs" / stage).glob("version_*"), key=lambda p: int(p.name[8:]))
    return curve(runs[-1]) if runs else None


def stage_result(root: Path, seed: int, stage: str) -> dict | None:
    """start/end val/accuracy, steps and wall time of one finished run (None if it has not run)."""
    rows = stage_curve(root, seed, stage)
    if rows is None:
        return None
    wall = seed_dir(root, seed) / "logs" / stage / "wall_seconds.txt"
    return {"start": rows[0]["val/accuracy"] if rows[0]["after_step"] == 0 else None,
            "end": rows[-1]["val/accuracy"], "steps": rows[-1]["after_step"],
            "seconds": float(wall.read_text()) if wall.is_file() else None}


def mean_std(xs: list[float]) -> str:
    return "{:.3f} ± {:.3f}".format(*ablation.mean_std(xs)) if xs else "-"


def summarize(root: Path, seeds: list[int], stages: list[str]) -> tuple[str, dict]:
    table = {s: [r for k in seeds if (r := stage_result(root, k, s)) is not None] for s in stages}
    lines = ["| stage | seeds | steps | start | end | gain | smallest gain | learns over seeds | wall time |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    summary = {}
    for stage, rs in table.items():
        if not rs:
            continue
        gains = [r["end"] - r["start"] for r in rs if r["start"] is not None]
        learns = (len(gains) > 1 and statistics.mean(gains) > statistics.stdev(gains) and min(gains) > 0)
        secs = [r["seconds"] for r in rs if r["seconds"]]
        summary[stage] = {"runs": rs, "gain_mean": statistics.mean(gains) if gains else None,
                          "gain_std": statistics.stdev(gains) if len(gains) > 1 else None, "learns": learns}
        if not gains:
            continue
        starts = [r["start"] for r in rs if r["start"] is not None]
        lines.append(f"| {stage} | {len(rs)} | {rs[0]['steps']} | {mean_std(starts)} | "
                     f"{mean_std([r['end'] for r in rs])} | {mean_std(gains)} | {min(gains):+.3f} | "
                     f"{'yes' if learns else '**no**'} | "
                     f"{statistics.mean(secs) / 60 if secs else float('nan'):.1f} min |")
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("run", "summarize"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES + DEMOS,
                    help="default: every default stage; add hacking/rm hacking/ppo for the reward-hacking demo")
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"the table (and .json beside it); default: {OUT} for --root {ROOT}, else ROOT/baselines.md "
                         "(a sweep elsewhere never overwrites the committed results)")
    ap.add_argument("--fresh", action="store_true", help="delete --root first")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for every stage")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = OUT if args.root == ROOT else args.root / "baselines.md"
    if args.command == "run":
        if args.fresh and args.root.exists():
            shutil.rmtree(args.root)
        for seed in args.seeds:  # a whole chain per seed: a partial sweep has complete seeds
            for stage in args.stages:
                run_stage(args.root, seed, stage, args.extra)
    table, summary = summarize(args.root, args.seeds, args.stages)
    header = (f"# Baselines over seeds {' '.join(map(str, args.seeds))}\n\n"
              f"`python -m alignlab.results run --seeds {' '.join(map(str, args.seeds))}` (what `make results` "
              f"runs) at commit {commit()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}: each "
              f"default stage, from a fresh `logs/` per seed; `val/accuracy` before the first step (start) and "
              f"after the last (end), mean ± std over seeds. A stage learns over seeds when its mean gain exceeds "
              f"the std of its gains and its smallest gain is > 0.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    if plot(args.root, args.seeds, args.stages, args.out.with_suffix(".png")) is None:
        print("[results] plot skipped: matplotlib is not installed (pip install -e '.[plot]')")
    print(table)


def plot(root: Path, seeds: list[int], stages: list[str], path: Path) -> bool | None:
    """The stages that generate (not sft, not the reward models): greedy val/accuracy against step, mean ±
    std over seeds, the SFT end dashed (ablation.plot); True when written, False with nothing to draw, None
    without matplotlib."""
    import importlib.util
    from types import SimpleNamespace

    if importlib.util.find_spec("matplotlib") is None:
        return None
    runs = {}
    for stage in (s for s in stages if s not in ("sft", *REWARD_MODELS)):
        curves = [c for k in seeds if (c := stage_curve(root, k, stage)) is not None]
        if curves:  # step 0 is the SFT end, drawn by ablation.plot
            runs[stage] = [SimpleNamespace(val={r["after_step"]: r["val/accuracy"] for r in c if r["after_step"]})
                           for c in curves]
    if not runs:
        return False
    sft = [r["end"] for k in seeds if (r := stage_result(root, k, "sft")) is not None]
    return ablation.plot(runs, path, sft=statistics.mean(sft) if sft else None,
                         title="make results: greedy val accuracy")


if __name__ == "__main__":
    main()
