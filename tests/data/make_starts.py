"""Regenerate the committed SFT starts of the learning tests (``tests/data/sft_start*/``).

    .venv/bin/python tests/data/make_starts.py

Why committed: where 800 SFT steps of the tiny model land depends on the seed and on the last bits of the
CPU's float results (0.19-0.70 greedy accuracy over seeds 0-9), so a start trained inside the test run is
a different start on every machine. The DPO, RM, PPO, GRPO and DAPO learning tests start from these files
instead -- the same bits everywhere -- and assert margins that hold over seeds 0-4 and 1 and 2 threads.
The recipe is the one the session fixtures used (seed 0, 1 thread, 800 steps).
"""

import shutil
import sys
from pathlib import Path

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import SCRATCHPAD, datamodule, fit, tiny_arch, val_accuracy  # noqa: E402

from alignlab.algorithms import SFT  # noqa: E402


def make(name: str, **data) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    pad = bool(data)
    module = SFT(arch=tiny_arch(), lr=3e-3, warmup_steps=20, lr_schedule="cosine",
                 **({"val_max_new_tokens": 24} if pad else {}))
    fit(module, datamodule("sft", **data), max_steps=800)
    out = HERE / name
    if out.exists():
        shutil.rmtree(out)
    module.export(out)
    acc = val_accuracy(SFT(init_from=str(out), **({"val_max_new_tokens": 24} if pad else {})),
                       datamodule("sft", tokenizer=str(out), **data))
    print(f"{out}: greedy validation accuracy {acc:.3f}")


if __name__ == "__main__":
    make("sft_start")
    make("sft_scratchpad_start", **SCRATCHPAD)
