"""``python -m alignlab.train ALGO [CLI args ...]`` -- what ``make train ALGO=...`` runs.

Runs ``fit`` with ``configs/base.yaml`` + ``configs/algo/ALGO.yaml`` and the extra arguments, after first
running every earlier stage whose export is missing. A stage's prerequisites are read from its config:
each ``logs/<stage>/latest`` path it mentions (``init_from: logs/sft/latest/hf``) names a stage that must
have finished, unless the command line sets that key itself (``--model.init_args.init_from my/hf``).
Prerequisites run with their own default configs. The child's bad-input errors are its one line and exit
code; this process adds no traceback.

``--recipe NAME`` (``make train ALGO=grpo RECIPE=smollm2``) layers ``configs/recipes/NAME/ALGO.yaml`` on the
algorithm's config; keys the recipe sets (its ``init_from``) are not prerequisites.
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


def recipe_config(recipe: str, algo: str) -> Path:
    path = CONFIGS / "recipes" / recipe / f"{algo}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / "recipes" / recipe).glob("*.yaml"))
        raise SystemExit(f"error: RECIPE={recipe!r} has no config {path}; "
                         + (f"its algorithms: {', '.join(known)}" if known else "no such recipe"))
    return path


def split_recipe(extra: list[str]) -> tuple[str | None, list[str]]:
    """``[..., "--recipe", "NAME", ...]`` or ``--recipe=NAME`` -> ("NAME", the other arguments)."""
    rest, recipe, i = [], None, 0
    while i < len(extra):
        if extra[i] == "--recipe" and i + 1 < len(extra):
            recipe, i = extra[i + 1], i + 2
            continue
        if extra[i].startswith("--recipe="):
            recipe = extra[i].split("=", 1)[1]
        else:
            rest.append(extra[i])
        i += 1
    return recipe, rest


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


def prerequisites(algo: str, extra: list[str] = (), recipe: str | None = None) -> list[str]:
    """Stages named by ``logs/<stage>/latest`` in the algorithm's config, in order of appearance, except
    where ``extra`` (command-line arguments) sets that key: ``--model.init_args.init_from X`` or ``...=X``,
    or the recipe's config does."""
    overridden = {a[2:].split("=", 1)[0].removesuffix("+") for a in extra if a.startswith("--")}
    if recipe is not None:
        overridden |= {k for k, _ in config_values(yaml.safe_load(recipe_config(recipe, algo).read_text()))}
    stages = [s for key, value in config_values(yaml.safe_load(algo_config(algo).read_text()))
              if key not in overridden for s in re.findall(r"logs/(\w+)/latest", str(value))]
    return list(dict.fromkeys(s for s in stages if s != algo))


def exported(stage: str) -> bool:
    return (Path("logs") / stage / "latest" / "hf" / "config.json").is_file()


def fit(algo: str, extra: list[str], recipe: str | None = None) -> None:
    layers = [str(CONFIGS / "base.yaml"), str(algo_config(algo))]
    layers += [str(recipe_config(recipe, algo))] if recipe is not None else []
    cmd = [sys.executable, "-m", "alignlab", "fit", *(a for c in layers for a in ("--config", c)), *extra]
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
    algo, (recipe, extra) = argv[0], split_recipe(argv[1:])
    for dep in prerequisites(algo, extra, recipe):
        ensure(dep, (algo,))
    fit(algo, extra, recipe)


if __name__ == "__main__":
    main()
