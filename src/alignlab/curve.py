"""A run's learning curve as a Markdown table, read back from its TensorBoard events.

    python -m alignlab.curve logs/smollm2/grpo/version_0 [--json out.json]

One row per validation: the step, the wall time since the run's first logged value, ``val/accuracy``, and
the mean ``train/reward`` over the steps since the previous validation (what TensorBoard's curves show,
without TensorBoard). Lightning logs a validation that follows step ``n`` at step ``n - 1``; the table
says "after step n".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """{tag: [(step, wall_time, value), ...]} of a run directory's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def curve(run_dir: str | Path, val: str = "val/accuracy", train: str = "train/reward") -> list[dict]:
    """The rows of the table; ``train`` falls back to ``train/loss`` for runs without rewards (SFT, DPO)."""
    s = read_scalars(run_dir)
    if train not in s and "train/loss" in s:
        train = "train/loss"
    if val not in s:
        raise ValueError(f"{run_dir}: no {val} in its TensorBoard events")
    t0 = min(w for values in s.values() for _, w, _ in values)
    first_train = min((w for tag, values in s.items() if tag.startswith("train/") for _, w, _ in values),
                      default=float("inf"))
    rows, prev = [], -1
    for step, wall, value in s[val]:
        done = 0 if wall < first_train else step + 1  # a validation before any training: the start
        window = [v for st, _, v in s.get(train, []) if prev < st <= step] if done else []
        rows.append({"after_step": done, "minutes": round((wall - t0) / 60, 1), val: round(value, 4),
                     f"mean {train}": round(sum(window) / len(window), 3) if window else None})
        prev = step if done else prev
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        sys.exit(f"error: {args.run_dir}: no such run directory")
    try:
        rows = curve(args.run_dir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
