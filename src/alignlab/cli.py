"""The command line: LightningCLI over every algorithm and the shared DataModule.

    python -m alignlab fit --config configs/base.yaml --config configs/algo/sft.yaml [--key value ...]
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from alignlab.data.datamodule import AlignDataModule


class AlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # the tokenizer comes from the same directory as the weights
        parser.link_arguments("model.init_args.init_from", "data.tokenizer", apply_on="parse")


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
