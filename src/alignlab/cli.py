"""The command line: LightningCLI over every algorithm and the shared DataModule.

    python -m alignlab fit --config configs/base.yaml --config configs/algo/sft.yaml [--key value ...]

Bad input is one line on stderr, ``error: <what is wrong, naming the key, file or argument>``, exit code 2,
and nothing written: config and argument errors come from the parser or from the modules' ``__init__``;
data, data-vs-model, ``--ckpt_path`` and run-directory checks run in ``before_fit``, before Lightning
creates the run directory. ``check(args)`` runs all of that and stops there: no training, nothing written
(``alignlab.train`` checks the whole command with it before running any stage). A run stopped by a NaN
(``model.nonfinite=stop``) is one line and exit code 1. ``ALIGNLAB_DEBUG=1`` restores the full messages and
tracebacks.

Run names: a run is logged in ``logs/<stage>/version_N``, its stage named by the config file's place
(``alignlab.train.config_stage``): ``configs/algo/ALGO.yaml`` -> ``ALGO``, ``configs/recipes/RECIPE/ALGO.yaml``
-> ``RECIPE/ALGO``; the last such file wins (a recipe after its algorithm's config). It is set right after that
file, as ``--trainer.logger.init_args.name=<stage>`` would be, so a later config or an explicit
``--trainer.logger.init_args.name`` wins; other runs keep ``base.yaml``'s ``logs/run``.

Resume::

    ... --ckpt_path last        resume the newest logs/<name>/version_*/checkpoints/last.ckpt, logging on
                                into that run's directory (its config is kept; this one goes to
                                config.resume.yaml); an error if there is none
    ... --ckpt_path FILE        resume FILE: it must be a checkpoint of this algorithm and model shape

Either way the run goes on with the checkpoint's model hyper-parameters (``model.init_args``: learning rate,
temperature, ...), as Lightning restores them, so that a resumed run is the run it continues; a configured
``--model.*`` value that differs is not used, and a warning names each one with the checkpoint's value.
The data and trainer settings are the configured ones (``--trainer.max_steps`` extends a run).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import lightning as L
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

import alignlab
from alignlab.algorithms.base import NonFiniteError
from alignlab.checkpoint import check_weights, find_last_checkpoint, read_checkpoint, resolve
from alignlab.data.datamodule import AlignDataModule
from alignlab.train import config_stage

# Errors our own checks raise (check(), DataError, hf.py, the tokenizer, the checks below).
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError)
PACKAGE_DIR = Path(alignlab.__file__).resolve().parent
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # Lightning's special ckpt_path values


def debug() -> bool:
    return os.environ.get("ALIGNLAB_DEBUG", "") not in ("", "0")


def one_line(message: str) -> str:
    """jsonargparse's nested union report -> one line: the class path, the key and the problem."""
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
             "Expected a <class 'NoneType'>", "Given value type:", "Given value:")
    lines = [ln.strip().removeprefix("- ") for ln in message.splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith(noise))


# model arguments renamed to one name per concept across algorithms: old name -> new name
RENAMED = {"epsilon_low": "epsilon", "cliprange": "epsilon", "kl_coef": "beta", "ppo_epochs": "num_iterations"}


def renamed_hint(message: str) -> str:
    """`` (renamed: ...)`` when the rejected option of a parse error is an argument's old name."""
    m = re.search(r"Option '(\w+)' is not accepted", message)
    if m is None or m[1] not in RENAMED:
        return ""
    return f" (model.init_args.{m[1]} is now model.init_args.{RENAMED[m[1]]})"


class AlignParser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        """A parse error (unknown key, wrong type) is one line without the usage text."""
        if debug() or not self.exit_on_error:
            super().error(message, ex)
        if "--> data.tokenizer" in message:  # the user set the target of the init_from link
            message = ("data.tokenizer: the tokenizer comes from model.init_args.init_from (the directory of the "
                       "weights; a fresh model uses the built-in char tokenizer): do not set data.tokenizer")
        sys.stderr.write(f"error: {one_line(message)}{renamed_hint(message)} (see --help)\n")
        self.exit(2)


RUN_NAME = "--trainer.logger.init_args.name"
NO_LOGGER = ("false", "true", "null", "none", "")  # --trainer.logger values that are no logger class
UNSET = object()


def logger_of(path: str):
    """``trainer.logger`` as the config file ``path`` sets it; UNSET when it does not (or cannot be read: the
    parser reports that)."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return UNSET
    trainer = config.get("trainer") if isinstance(config, dict) else None
    return trainer.get("logger", UNSET) if isinstance(trainer, dict) else UNSET


def with_run_names(args: list[str]) -> list[str]:
    """``args`` with ``--trainer.logger.init_args.name=<stage>`` right after each stage config that does not
    configure the logger itself (see the module docstring), when an earlier config or argument has set a
    logger class to name (base.yaml's TensorBoardLogger)."""
    out, has_class = [], False
    i = 0
    while i < len(args):
        arg, path, n = args[i], None, 1
        if arg in ("-c", "--config") and i + 1 < len(args):
            path, n = args[i + 1], 2
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--trainer.logger" or arg.startswith("--trainer.logger="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            has_class = value.strip().lower() not in NO_LOGGER
        out += args[i:i + n]
        i += n
        if path is None:
            continue
        logger = logger_of(path)
        if logger is not UNSET:
            has_class = isinstance(logger, dict) and ("class_path" in logger or has_class)
        elif has_class and (stage := config_stage(path)):
            out.append(f"{RUN_NAME}={stage}")
    return out


def warn_ignored_hparams(ckpt_path, model_config, hparams: dict) -> None:
    """Resuming restores the checkpoint's model hyper-parameters (Lightning's ``_parse_ckpt_path``) over the
    configured ones: warn, naming each configured ``model.init_args`` value that the checkpoint's replaces."""
    configured = model_config.init_args.as_dict()
    canonical = lambda v: json.dumps(v, sort_keys=True, default=str)  # tuples as lists, nested dicts in order
    ignored = [f"model.init_args.{k}={configured[k]!r} (checkpoint: {hparams[k]!r})"
               for k in sorted(configured.keys() & hparams.keys())
               if not k.startswith("_") and canonical(configured[k]) != canonical(hparams[k])]
    if ignored:
        rank_zero_warn(f"ckpt_path: {ckpt_path}: a resumed run keeps its checkpoint's hyper-parameters, so these "
                       f"configured values are not used: {', '.join(ignored)} (to train with them, start a new run)")


class AlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # the tokenizer comes from the same directory as the weights
        parser.link_arguments("model.init_args.init_from", "data.tokenizer", apply_on="parse")

    def parse_arguments(self, parser, args) -> None:
        """The run named after its stage config (``with_run_names``). A ``--ckpt_path`` file must be a readable
        checkpoint of the configured algorithm before Lightning reads it next (``_parse_ckpt_path``: a plain
        ``torch.load``, whose hyper-parameters, class included, then replace the configured model's)."""
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, (list, tuple)) and (named := with_run_names(list(argv))) != list(argv):
            # the command line's arguments, named: passed as args, without Lightning's "args and sys.argv" warning
            with mock.patch.object(sys, "argv", sys.argv[:1]) if args is None else nullcontext():
                super().parse_arguments(parser, named)
        else:
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if subcommand == "fit" and config.get("ckpt_path") == "last":
            self.resolve_last(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            ckpt = read_checkpoint(ckpt_path, resolve(config.model.class_path))
            warn_ignored_hparams(ckpt_path, config.model, ckpt.get("hyper_parameters") or {})

    def resolve_last(self, config) -> None:
        """``--ckpt_path last``: Lightning looks only in the new run's directory (a new version_N, empty), so
        find the previous run's last.ckpt and continue that run (same version directory). Resolved here, before
        Lightning's ``_parse_ckpt_path``, so that ``last`` restores the checkpoint's hyper-parameters as a
        file path does."""
        logger = config.trainer.get("logger")
        if not logger or isinstance(logger, (bool, list)) or "init_args" not in logger:
            return  # no TensorBoard run directory: Lightning's own lookup
        args = logger.init_args
        save_dir = args.get("save_dir") or config.trainer.get("default_root_dir") or "."
        name = args.get("name") or "lightning_logs"
        last = find_last_checkpoint(save_dir, name)
        if last is None:  # Lightning would warn and start a fresh run
            raise FileNotFoundError(f"--ckpt_path last: no {Path(save_dir, name)}/version_*/checkpoints/"
                                    f"last.ckpt to resume (leave --ckpt_path out to start a new run)")
        config.ckpt_path = str(last)
        args.version = last.parent.parent.name
        self.save_config_kwargs.update(config_filename="config.resume.yaml", overwrite=True)

    def before_fit(self) -> None:
        """Every check that can fail on bad input, before Lightning writes the run directory."""
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path is not None and str(ckpt_path) not in CKPT_KEYWORDS and "://" not in str(ckpt_path) \
                and not str(ckpt_path).startswith("registry:"):
            if not Path(ckpt_path).is_file():
                raise FileNotFoundError(f"ckpt_path: {ckpt_path}: no such checkpoint file")
            check_weights(ckpt_path, self.model)
        if ckpt_path is None:
            self.refuse_existing_run()
        self.datamodule.setup("fit")  # reads and checks every row; the trainer's own call reuses them
        if hasattr(self.model, "check_data"):
            self.model.check_data(self.datamodule)

    def refuse_existing_run(self) -> None:
        """A new run never writes into a run directory that holds checkpoints, an export or a config.yaml.

        Only a pinned ``trainer.logger.init_args.version`` (or a ModelCheckpoint ``dirpath``) can point at one:
        by default the logger picks a fresh ``version_N``. Resuming (``--ckpt_path``) continues in place.
        """
        dirs = []
        logger = self.trainer.logger
        if logger is not None and getattr(logger, "_version", None) is not None:  # pinned by the user
            dirs.append(("trainer.logger.init_args.version", Path(logger.log_dir)))
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                dirs.append(("ModelCheckpoint dirpath", Path(cb.dirpath)))
        for arg, d in dirs:
            found = [p for p in (d / "checkpoints", d / "hf") if p.is_dir() and any(p.iterdir())]
            found += sorted(d.glob("*.ckpt"))[:1] + [p for p in [d / "config.yaml"] if p.is_file()]
            if found:
                raise FileExistsError(f"{arg}: {d} already holds a run ({found[0]}); not overwriting it: pick "
                                      f"another version, or resume that run with --ckpt_path")


class CheckCLI(AlignCLI):
    """``fit`` up to its last check: parse, instantiate, ``before_fit``; then stop instead of training."""

    def fit(self, **kwargs) -> None:
        pass


def main(args: list[str] | None = None, run: bool = True, cli_class: type[AlignCLI] = AlignCLI) -> AlignCLI:
    # Lightning warns at every checkpoint of a manually optimised module (GRPO, DAPO, PPO) that it holds the
    # weights after the optimizer step, with a code sample for keeping the ones before. After the step is
    # what we save on purpose: weights, optimizer state and step counter agree, and resuming from it is
    # exact (tests/test_resume.py).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    return cli_class(
        L.LightningModule,
        AlignDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": False},
        parser_kwargs={"allow_abbrev": False},
        parser_class=AlignParser,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


@contextmanager
def quietly():
    """Without Lightning's info lines and without warnings (the run itself shows them), and ``sys.argv`` out
    of sight (LightningCLI warns when it sees both ``args`` and command-line arguments)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), mock.patch.object(sys, "argv", sys.argv[:1]):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def check(args: list[str]) -> AlignCLI:
    """Every check ``main(args)`` runs before it writes anything (keys, types, values, files, ``--ckpt_path``,
    data, run directory), quietly, without training or writing; the same errors."""
    with quietly():
        return main(args, cli_class=CheckCLI)


def instantiate(args: list[str]) -> AlignCLI:
    """Model, data and trainer of a config (``args`` without ``fit``), quietly; no checks beyond those."""
    with quietly():
        return main(args, run=False)


def root_cause(e: BaseException) -> BaseException:
    """The innermost ``raise ... from`` cause: jsonargparse wraps errors raised while instantiating classes."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def raised_by_alignlab(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


@contextmanager
def one_line_errors():
    """Our own input errors, Lightning's configuration errors (bad Trainer arguments) and non-finite stops
    -> ``error: ...`` on stderr and exit 2 (input) or 1 (stop). Anything else keeps its traceback."""
    try:
        yield
    except Exception as e:
        cause = root_cause(e)
        ours = isinstance(cause, INPUT_ERRORS) and raised_by_alignlab(cause)
        if debug() or not (ours or isinstance(cause, (NonFiniteError, MisconfigurationException))):
            raise
        message = re.sub(r"\s*\n\s*", " ", str(cause)).strip()
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(1 if isinstance(cause, NonFiniteError) else 2) from None


def cli(args: list[str] | None = None) -> None:
    """``python -m alignlab``."""
    with one_line_errors():
        main(args)
