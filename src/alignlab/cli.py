"""The command line: LightningCLI over every algorithm and the shared DataModule.

    python -m alignlab fit --config configs/base.yaml --config configs/algo/sft.yaml [--key value ...]
    ... --ckpt_path last        resume the newest logs/<name>/version_*/checkpoints/last.ckpt, logging on
                                into that run's directory (its config is kept; this one goes to
                                config.resume.yaml)
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from alignlab.checkpoint import find_last_checkpoint
from alignlab.data.datamodule import AlignDataModule


class AlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # the tokenizer comes from the same directory as the weights
        parser.link_arguments("model.init_args.init_from", "data.tokenizer", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last``: Lightning looks only in the new run's directory (a new version_N, empty), so
        find the previous run's last.ckpt here and continue that run (same version directory)."""
        if self.subcommand != "fit" or self.config.fit.get("ckpt_path") != "last":
            return
        logger = self.config.fit.trainer.get("logger")
        if not logger or isinstance(logger, (bool, list)) or "init_args" not in logger:
            return  # no TensorBoard run directory: Lightning's own lookup
        args = logger.init_args
        save_dir = args.get("save_dir") or self.config.fit.trainer.get("default_root_dir") or "."
        last = find_last_checkpoint(save_dir, args.get("name") or "lightning_logs")
        if last is None:
            return  # Lightning warns "no last checkpoint" and starts fresh
        self.config.fit.ckpt_path = str(last)
        args.version = last.parent.parent.name
        self.save_config_kwargs.update(config_filename="config.resume.yaml", overwrite=True)


def main(args: list[str] | None = None, run: bool = True) -> AlignCLI:
    return AlignCLI(
        L.LightningModule,
        AlignDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": False},
        parser_kwargs={"allow_abbrev": False},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )
