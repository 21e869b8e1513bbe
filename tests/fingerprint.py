"""The logged metrics of every trainer's first steps, to check that a refactoring changed no number.

    python tests/fingerprint.py OUT.json [--src SRC_DIR] [--steps 20]
    python tests/fingerprint.py --compare A.json B.json

Runs, in a scratch directory (configs/ linked from the checkout), ``alignlab.train`` for sft (longer, so the
RL stages start from a policy that gets some answers right), then rm, dpo, grpo, dapo, ppo (from that SFT
export and that reward model) and seq2seq, each ``--steps`` steps on one thread with every step logged and a
validation every 10 steps; writes {algo: {tag: [[step, value], ...]}} of their TensorBoard scalars. Compare
two files: every tag, step and value must match (``--rtol``, default 0: bit for bit on one machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "rm", "dpo", "grpo", "dapo", "ppo", "seq2seq")
TIMING = ("epoch",)  # not a metric of the model


def run(src: Path, steps: int, sft_steps: int) -> dict:
    from alignlab.curve import read_scalars  # noqa: F401 (checks the import path works before the runs)

    out = {}
    with tempfile.TemporaryDirectory(prefix="alignlab-fp-") as tmp:
        os.symlink(src.parent / "configs", Path(tmp, "configs"))
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        for algo in STAGES:
            n = sft_steps if algo == "sft" else steps
            cmd = [sys.executable, "-m", "alignlab.train", algo, f"--trainer.max_steps={n}",
                   "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=10",
                   "--data.num_train=2000", "--data.num_val=32", "--trainer.enable_progress_bar=false"]
            subprocess.run(cmd, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
            runs = sorted(p for p in Path(tmp, "logs", algo).glob("version_*"))
            from alignlab.curve import read_scalars
            scalars = read_scalars(runs[-1])
            out[algo] = {tag: [[s, v] for s, _, v in values] for tag, values in sorted(scalars.items())
                         if not any(t in tag for t in TIMING)}
            print(f"{algo}: {len(out[algo])} tags", flush=True)
    return out


def compare(a: dict, b: dict, rtol: float) -> list[str]:
    diffs = []
    for algo in sorted(a.keys() | b.keys()):
        ta, tb = a.get(algo, {}), b.get(algo, {})
        for tag in sorted(ta.keys() ^ tb.keys()):
            diffs.append(f"{algo}: {tag} only in {'A' if tag in ta else 'B'}")
        for tag in sorted(ta.keys() & tb.keys()):
            xa, xb = ta[tag], tb[tag]
            if [s for s, _ in xa] != [s for s, _ in xb]:
                diffs.append(f"{algo}: {tag} logged at other steps")
                continue
            for (s, va), (_, vb) in zip(xa, xb):
                if not (va == vb or (math.isnan(va) and math.isnan(vb))
                        or abs(va - vb) <= rtol * max(abs(va), abs(vb))):
                    diffs.append(f"{algo}: {tag} at step {s}: {va!r} != {vb!r}")
                    break
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?")
    p.add_argument("--src", default=str(ROOT / "src"), help="the alignlab sources to run (a checkout's src/)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="with --compare: a tag of A is called NEW in B (a renamed metric)")
    args = p.parse_args()
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        renames = dict(r.split("=", 1) for r in args.rename)
        a = {algo: {renames.get(t, t): v for t, v in tags.items()} for algo, tags in a.items()}
        diffs = compare(a, b, args.rtol)
        n = sum(len(v) for tags in a.values() for v in tags.values())
        print("\n".join(diffs) if diffs else f"identical: {len(a)} runs, {n} logged values")
        raise SystemExit(1 if diffs else 0)
    if not args.out:
        p.error("OUT.json is required (or --compare A B)")
    result = run(Path(args.src).resolve(), args.steps, args.sft_steps)
    Path(args.out).write_text(json.dumps(result, indent=0))


if __name__ == "__main__":
    main()
