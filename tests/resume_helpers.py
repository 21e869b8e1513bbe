"""Callbacks for the resume tests (imported by the test runs, also in subprocesses via PYTHONPATH=tests)."""

import json
import os
import signal

import lightning as L


class StepMetrics(L.Callback):
    """Append {"step": global_step, metric: value, ...} to a JSON-lines file after every training batch
    (flushed at once, so a killed run's lines survive)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {"step": trainer.global_step, "batch_idx": batch_idx}
        groups = ("train/", "rewards/", "completions/", "logps/")
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(groups)})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class KillAfterStep(L.Callback):
    """SIGKILL this process at the end of the training batch that reaches global_step == step
    (before a checkpoint of that step could be written: ModelCheckpoint runs after other callbacks)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def read_metrics(path) -> dict[int, dict]:
    """step -> metrics of the last line written for that step (a resumed run rewrites the steps it redoes)."""
    out = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row
    return out


def length_parity_reward(prompts, completions, **kwargs) -> list[float]:
    """1 for completions of even length: mixed rewards within groups even for an untrained policy."""
    return [float(len(c) % 2 == 0) for c in completions]
