"""``python -m alignlab.train ALGO [CLI args ...]`` -- what ``make train ALGO=...`` runs.

Runs ``fit`` with ``configs/base.yaml`` + ``configs/algo/ALGO.yaml`` and the extra arguments, after first
running every earlier stage whose export is missing. A stage's prerequisites are read from its config:
each ``logs/<stage>/latest_hf`` path it mentions (``init_from: logs/sft/latest_hf``) names a stage that must
have finished, unless the command line sets that key itself (``--model.init_args.init_from my/hf``).
Prerequisites run with their own default configs; a recipe's ``logs/RECIPE/ALGO/latest_hf`` (PPO's reward
model in ``configs/recipes/smollm2/ppo.yaml``) names that recipe's stage, which runs with its recipe.

``--recipe NAME`` (``make train ALGO=grpo RECIPE=smollm2``) layers ``configs/recipes/NAME/ALGO.yaml`` on the
algorithm's config; keys the recipe sets (its ``init_from``) are not prerequisites.

When earlier stages have to run, the whole command is checked first (``check``): a typo, a wrong type, a bad
value, a bad ``--ckpt_path`` or a missing data file is reported at once, not after a prerequisite has
trained. Errors are one line and an exit code (the child's, or this process's); this process adds no
traceback.

Working directory: the project's ``configs/`` are found next to the package (``src/alignlab`` ->
``configs/`` of the repository; a copy of the package outside a checkout falls back to ``./configs``), so
``python -m alignlab.train grpo`` works from any directory. Every relative path INSIDE a config --
``logs/`` (runs and exports), ``init_from: logs/sft/latest_hf``, ``models/smollm2-135m-instruct``,
``--config my.yaml`` on the command line -- is relative to the working directory, as in any Lightning
(``default_root_dir``) or TRL (``output_dir``) run: the stage chain stays within one directory (SFT writes
``./logs/sft/latest_hf``, GRPO reads it there), and a recipe's ``models/`` directory must be in the working
directory (else its one-line "run make model" error). Config paths are shown relative to the working
directory when they are inside it (``configs/algo/grpo.yaml`` from the repository), else absolute.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PROJECT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # src/alignlab/train.py -> configs/
CONFIGS = PROJECT_CONFIGS if PROJECT_CONFIGS.is_dir() else Path("configs")


def shown(path: Path) -> Path:
    """``path`` relative to the working directory if it is inside it, else as it is (absolute)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def algo_config(algo: str) -> Path:
    path = shown(CONFIGS / "algo" / f"{algo}.yaml")
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / "algo").glob("*.yaml"))
        raise SystemExit(f"error: ALGO={algo!r} has no config {path}; known: {', '.join(known)}")
    return path


def recipe_config(recipe: str, algo: str) -> Path:
    path = shown(CONFIGS / "recipes" / recipe / f"{algo}.yaml")
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


EXPORT = re.compile(r"logs/((?:\w+/)?\w+)/latest_hf")  # a stage's newest export (HFExport's link)


def split_stage(stage: str) -> tuple[str, str | None]:
    """A stage is an algorithm, or ``RECIPE/ALGO`` for a recipe's run (``logs/smollm2/rm/latest_hf``)."""
    recipe, _, algo = stage.rpartition("/")
    return algo, recipe or None


def stage_name(algo: str, recipe: str | None = None) -> str:
    """The inverse of ``split_stage``: ``ALGO`` or ``RECIPE/ALGO``."""
    return f"{recipe}/{algo}" if recipe else algo


def config_stage(path: str | Path) -> str | None:
    """The stage whose config ``path`` is, by its place under a ``configs/`` directory (the inverse of
    ``algo_config`` / ``recipe_config``): ``configs/algo/ALGO.yaml`` -> ``ALGO``,
    ``configs/recipes/RECIPE/ALGO.yaml`` -> ``RECIPE/ALGO``, any other file -> None. The CLI names the run
    after it (logs/<stage>/version_N, alignlab.cli)."""
    parts = Path(os.path.abspath(path)).parts  # normalised, symlinks kept: the path the user gave
    if not parts[-1].endswith((".yaml", ".yml")):
        return None
    stem = Path(parts[-1]).stem
    if len(parts) >= 3 and parts[-3:-1] == ("configs", "algo"):
        return stem
    if len(parts) >= 4 and parts[-4:-2] == ("configs", "recipes"):
        return stage_name(stem, parts[-2])
    return None


def stage_values(algo: str, recipe: str | None = None) -> list[tuple[str, object]]:
    """(dotted key, leaf value) of the algorithm's config, with the recipe's config layered on it."""
    values = dict(config_values(yaml.safe_load(algo_config(algo).read_text())))
    if recipe is not None:
        values |= dict(config_values(yaml.safe_load(recipe_config(recipe, algo).read_text())))
    return list(values.items())


def exports_named(algo: str, recipe: str | None = None) -> list[tuple[str, str]]:
    """(dotted key, value) of the stage's config values that name a ``logs/<stage>/latest_hf`` export."""
    return [(key, value) for key, value in stage_values(algo, recipe) if EXPORT.search(str(value))]


def prerequisites(algo: str, extra: list[str] = (), recipe: str | None = None) -> list[str]:
    """Stages named by ``logs/<stage>/latest_hf`` in the algorithm's config (and its recipe's), in order of
    appearance, except where ``extra`` (command-line arguments) sets that key: ``--model.init_args.init_from
    X`` or ``...=X``. A recipe's ``logs/RECIPE/ALGO/latest_hf`` names the stage ``RECIPE/ALGO``."""
    overridden = {a[2:].split("=", 1)[0].removesuffix("+") for a in extra if a.startswith("--")}
    this = stage_name(algo, recipe)
    stages = [s for key, value in exports_named(algo, recipe) if key not in overridden
              for s in EXPORT.findall(str(value))]
    return list(dict.fromkeys(s for s in stages if s != this))


def exported(stage: str) -> bool:
    return (Path("logs") / stage / "latest_hf" / "config.json").is_file()


def missing_stages(algo: str, extra: list[str] = (), seen: tuple[str, ...] = (),
                   recipe: str | None = None) -> list[str]:
    """The earlier stages to run before ``algo``, in order: each prerequisite whose export is missing, after
    its own missing prerequisites."""
    this = stage_name(algo, recipe)
    if this in seen:
        raise SystemExit(f"error: configs: circular prerequisites {' -> '.join(seen + (this,))}")
    order: list[str] = []
    for dep in prerequisites(algo, extra, recipe):
        if not exported(dep):
            dep_algo, dep_recipe = split_stage(dep)
            before = missing_stages(dep_algo, (), seen + (this,), recipe=dep_recipe)
            order += [s for s in [*before, dep] if s not in order]
    return order


def config_args(algo: str, extra: list[str], recipe: str | None = None) -> list[str]:
    layers = [shown(CONFIGS / "base.yaml"), algo_config(algo), *([recipe_config(recipe, algo)] if recipe else [])]
    return [*(a for c in layers for a in ("--config", str(c))), *extra]


def fit(algo: str, extra: list[str], recipe: str | None = None) -> None:
    cmd = [sys.executable, "-m", "alignlab", "fit", *config_args(algo, extra, recipe)]
    print("+ " + " ".join(cmd[1:]), flush=True)
    code = subprocess.call(cmd)
    if code:
        raise SystemExit(code)


# keys whose export is not stood in by check: an untrained stand-in's samples would be no pairs at all
NOT_STOOD_IN = {"data.pairs_from": "null"}  # the task's own pairs are checked instead; sampling runs with the stage


def stand_in_args(stage: str, stand_ins: dict[str, str]) -> list[str]:
    """``--key=value`` for each key of the stage's config that names an export of ``stand_ins``, with that
    ``logs/<stage>/latest_hf`` replaced by its stand-in directory (or, for ``NOT_STOOD_IN`` keys, its value
    there)."""
    return [f"--{key}={NOT_STOOD_IN.get(key) or EXPORT.sub(lambda m: stand_ins.get(m[1], m[0]), value)}"
            for key, value in exports_named(*split_stage(stage)) if set(EXPORT.findall(value)) & stand_ins.keys()]


def check(algo: str, extra: list[str], stages: list[str], recipe: str | None = None) -> None:
    """Check the command as its run would check it (``alignlab.cli.check``: keys, types, values, files,
    ``--ckpt_path``, data), training and writing nothing; the first error is one line and exit code 2.

    An export that an earlier stage (of ``stages``) has yet to write is stood in for by that stage's model as
    its config builds it, untrained, exported to a temporary directory: the same architecture and tokenizer,
    so the checks that need the model (lengths against ``max_seq_len``, checkpoint shapes) run as well."""
    from alignlab.cli import check as check_fit, instantiate, one_line_errors  # torch, Lightning: only here

    with tempfile.TemporaryDirectory(prefix="alignlab-check-") as tmp, one_line_errors():
        stand_ins: dict[str, str] = {}
        for stage in stages:
            stage_algo, stage_recipe = split_stage(stage)
            args = config_args(stage_algo, stand_in_args(stage, stand_ins), stage_recipe)
            instantiate(args).model.export(Path(tmp, stage))
            stand_ins[stage] = str(Path(tmp, stage))
        this = stage_name(algo, recipe)
        check_fit(["fit", *config_args(algo, [*stand_in_args(this, stand_ins), *extra], recipe)])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m alignlab.train ALGO [--key value ...]")
    algo, (recipe, extra) = argv[0], split_recipe(argv[1:])
    if any(a in ("-h", "--help") or a.startswith("--print_config") for a in extra):
        return fit(algo, extra, recipe)  # the config or the help: no stage needs to run for it
    stages = missing_stages(algo, extra, recipe=recipe)
    if stages:  # without them the run itself checks everything first
        check(algo, extra, stages, recipe)
    for stage in stages:
        print(f"[alignlab] logs/{stage}/latest_hf is missing: running stage {stage!r} first", flush=True)
        stage_algo, stage_recipe = split_stage(stage)
        fit(stage_algo, [], stage_recipe)
    fit(algo, extra, recipe)


if __name__ == "__main__":
    main()
