"""``python -m alignlab.train ALGO [CLI args ...]`` -- what ``make train ALGO=...`` runs.

Runs ``fit`` with ``configs/base.yaml`` + ``configs/algo/ALGO.yaml`` and the extra arguments, after first
running every earlier stage whose export is missing. A stage's prerequisites are read from its config:
each ``logs/<stage>/latest`` path it mentions (``init_from: logs/sft/latest/hf``) names a stage that must
have finished, unless the command line sets that key itself (``--model.init_args.init_from my/hf``).
Prerequisites run with their own default configs. The child's bad-input errors are its one line and exit
code; this process adds no traceback.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

CONFIGS = Path("configs")


def algo_config(algo: str) -> Path:
    path = CONFIGS / "algo" / f"{algo}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / "algo").glob("*.yaml"))
        raise SystemExit(f"error: ALGO={algo!r} has no config {path}; known: {', '.join(known)}")
    return path


def config_values(node, key: str = ""):
    """(dotted key, leaf value) pairs of a parsed YAML config; list items carry the list's key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from config_values(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for v in node:
            yield from config_values(v, key)
    else:
        yield key, node


def prerequisites(algo: str, extra: list[str] = ()) -> list[str]:
    """Stages named by ``logs/<stage>/latest`` in the algorithm's config, in order of appearance, except
    where ``extra`` (command-line arguments) sets that key: ``--model.init_args.init_from X`` or ``...=X``."""
    overridden = {a[2:].split("=", 1)[0].removesuffix("+") for a in extra if a.startswith("--")}
    stages = [s for key, value in config_values(yaml.safe_load(algo_config(algo).read_text()))
              if key not in overridden for s in re.findall(r"logs/(\w+)/latest", str(value))]
    return list(dict.fromkeys(s for s in stages if s != algo))


def exported(stage: str) -> bool:
    return (Path("logs") / stage / "latest" / "hf" / "config.json").is_file()


def fit(algo: str, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "alignlab", "fit", "--config", str(CONFIGS / "base.yaml"),
           "--config", str(algo_config(algo)), *extra]
    print("+ " + " ".join(cmd[1:]), flush=True)
    code = subprocess.call(cmd)
    if code:
        raise SystemExit(code)


def ensure(stage: str, seen: tuple[str, ...] = ()) -> None:
    """Run the stage (after its own prerequisites) unless its export already exists."""
    if stage in seen:
        raise SystemExit(f"error: configs/algo: circular prerequisites {' -> '.join(seen + (stage,))}")
    for dep in prerequisites(stage):
        ensure(dep, seen + (stage,))
    if not exported(stage):
        print(f"[alignlab] logs/{stage}/latest/hf is missing: running stage {stage!r} first", flush=True)
        fit(stage, [])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m alignlab.train ALGO [--key value ...]")
    algo, extra = argv[0], argv[1:]
    for dep in prerequisites(algo, extra):
        ensure(dep, (algo,))
    fit(algo, extra)


if __name__ == "__main__":
    main()
