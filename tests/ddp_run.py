"""DDP scenarios for tests/test_ddp.py, run by ``torchrun --nproc_per_node 2 tests/ddp_run.py OUT`` (gloo, CPU).

Lightning sees torchrun's environment and joins its process group (no launcher of its own), so one torchrun
job runs every scenario in sequence:

- equivalence: GRPO/DAPO on a fixed rollout of 2b prompts; each of the 2 ranks trains on its b prompts
  (whole groups). Rank 0 saves the policy after the update; the test compares it with one process on all
  2b (``equivalence_run(..., devices=1)`` in the test process).
- smoke: every algorithm, 2 steps under DDP; each rank saves the policy and the prompts it trained on;
  SFT also logs and writes its HF export (a collective in the export once hung rank 0).
- resume: DAPO (dynamic sampling: per-rank generators and refill iterators) 4 steps with a checkpoint at
  step 2, and a run resumed from that checkpoint; each rank saves both final states.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).parent))
from conftest import datamodule, tiny_arch  # noqa: E402

from alignlab.algorithms import DAPO, DPO, GRPO, PPO, SFT, RewardModel  # noqa: E402
from alignlab.callbacks import HFExport  # noqa: E402
from alignlab.data.datamodule import Collator  # noqa: E402

PROMPTS = 4  # 2b: the whole rollout's prompts; each of 2 ranks trains on 2
VARIANTS = {
    "grpo": (GRPO, dict(beta=0.04, loss_agg_mode="seq-mean-token-mean", num_iterations=2)),
    "grpo_token_mean_batch_std": (GRPO, dict(beta=0.04, loss_agg_mode="token-mean", scale_rewards="batch",
                                             num_iterations=2)),
    # token-mean, clip-higher, overlong shaping (an untrained model rarely stops: keep truncated samples)
    "dapo": (DAPO, dict(num_iterations=2, overlong_buffer_len=2, mask_truncated_completions=False)),
}


class FixedRollout:
    """``make_rollout`` ignores the loader's batch: every setup generates the same completions for the same
    2b prompts (seeded generator, same weights); rank r keeps its b prompts' groups."""

    def make_rollout(self, batch):
        full = Collator("prompt", self.pad_id)(self.trainer.datamodule.train_rows[:PROMPTS])
        self.generator.manual_seed(123)
        r = self.rollout(full)
        self.score(r)
        n = len(r) // self.world_size
        return r.select(torch.arange(self.global_rank * n, (self.global_rank + 1) * n))

    def configure_optimizers(self):
        """SGD: the update is lr x gradient, so a wrong scale (world size, token counts) shows (Adam hides it)."""
        return torch.optim.SGD(self.policy.parameters(), lr=self.hparams.lr)


def trainer(devices: int, max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(**t_kwargs(devices, max_steps, callbacks))


def t_kwargs(devices: int, max_steps: int, callbacks=()) -> dict:
    kw = dict(accelerator="cpu", devices=devices, max_steps=max_steps, logger=False,
              enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
              callbacks=list(callbacks), enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0)
    if devices > 1:
        kw["strategy"] = "ddp"
    return kw


def equivalence_run(name: str, devices: int) -> dict[str, torch.Tensor]:
    """One training step (num_iterations optimizer steps) on the fixed rollout; the policy afterwards."""
    cls, kw = VARIANTS[name]
    L.seed_everything(0)
    module = type(cls.__name__, (FixedRollout, cls), {})(
        arch=tiny_arch(), num_generations=4, max_new_tokens=6, lr=1.0, max_grad_norm=0.0,
        reward_funcs=["resume_helpers.length_parity_reward"], **kw)
    dm = datamodule("prompt", batch_size=PROMPTS // devices, num_train=64, num_val=4)
    trainer(devices, kw["num_iterations"]).fit(module, dm)
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


class RecordPrompts(L.Callback):
    def __init__(self):
        self.prompts = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompts += batch["prompt"]


def smoke(algo: str, devices: int, ckpt_dir: Path | None = None, resume: str | None = None, max_steps: int = 2,
          export_dir: Path | None = None):
    """2 steps of ``algo``; returns (module state, prompts this rank trained on)."""
    L.seed_everything(0)
    arch = tiny_arch()
    module, kind = {
        "sft": (lambda: SFT(arch=arch), "sft"),
        "rm": (lambda: RewardModel(arch=arch), "preference"),
        "dpo": (lambda: DPO(arch=arch), "preference"),
        "ppo": (lambda: PPO(arch=arch, num_generations=2, max_new_tokens=6, num_iterations=1), "prompt"),
        "grpo": (lambda: GRPO(arch=arch, num_generations=4, max_new_tokens=6), "prompt"),
        "dapo": (lambda: DAPO(arch=arch, num_generations=4, max_new_tokens=6,
                              reward_funcs=["resume_helpers.length_parity_reward"]), "prompt"),
    }[algo]
    module = module()
    record = RecordPrompts()
    ckpt = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)] if ckpt_dir else []
    t = trainer(devices, max_steps, [record, *ckpt])
    if algo == "sft" and export_dir is not None:  # the HF export at the end of a DDP run (rank 0 writes it)
        t = L.Trainer(**{**t_kwargs(devices, max_steps, [record, HFExport()]),
                         "logger": TensorBoardLogger(export_dir, name="sft")})
    t.fit(module, datamodule(kind, batch_size=4, num_train=200, num_val=4, max_completion_length=24,
                             task_args={"max_digits": 2, "scratchpad_prob": 0.5}), ckpt_path=resume)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, record.prompts


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for name in VARIANTS:
        state = equivalence_run(name, devices=2)
        if rank == 0:
            torch.save(state, out / f"equiv_{name}.pt")
    for algo in ("sft", "rm", "dpo", "ppo", "grpo", "dapo"):
        state, prompts = smoke(algo, devices=2, export_dir=out / "logs")
        torch.save({"state": state, "prompts": prompts}, out / f"smoke_{algo}_rank{rank}.pt")
    # resume under DDP: DAPO 4 steps with a checkpoint at step 2, and a run resumed from it
    full, _ = smoke("dapo", devices=2, ckpt_dir=out / "ckpt", max_steps=4)
    resumed, _ = smoke("dapo", devices=2, resume=str(out / "ckpt" / "epoch=0-step=2.ckpt"), max_steps=4)
    torch.save({"full": full, "resumed": resumed}, out / f"resume_dapo_rank{rank}.pt")
