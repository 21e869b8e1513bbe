"""What the benchmark scripts share: the machine's description, a quiet Lightning Trainer, per-step timing."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import lightning as L


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux; {} elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    return cpuinfo().get("model name") or platform.processor() or "unknown"


def cpu_id() -> str:
    """'family F model M' and the int8 dot-product flags from /proc/cpuinfo (Linux), e.g. 'family 25 model 1,
    int8 dot: none' (AMD Zen 3): one "AMD EPYC" model name covers CPUs whose int8 matmuls differ 20-30x."""
    info = cpuinfo()
    if not info:
        return "unknown"
    dot = [f for f in ("avx_vnni", "avx512_vnni", "amx_int8") if f in info.get("flags", "").split()]
    return f"family {info.get('cpu family', '?')} model {info.get('model', '?')}, int8 dot: {' '.join(dot) or 'none'}"


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matmul peak on the current threads, FLOP/s: the best of several n x n products."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / min(seconds(lambda: a @ b) for _ in range(repeats))


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """The machine's memory bandwidth on the current threads, bytes/s: the best of several copies of a
    ``megabytes`` fp32 tensor (each reads and writes it once)."""
    import torch

    src = torch.randn(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * 4 / min(seconds(lambda: dst.copy_(src)) for _ in range(repeats))


def seconds(fn) -> float:
    """Wall seconds of one call of fn."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def quiet_libraries(threads: int) -> None:
    """No progress bars, warnings or tokenizer threads from the libraries; ``threads`` torch threads."""
    import os
    import warnings

    import torch
    import transformers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)


def median_runs(results: dict[str, dict]) -> None:
    """Each side's median run (by steps/s) is its result; every run stays under "repeats"."""
    for r in results.values():
        runs_sorted = sorted(r["repeats"], key=lambda x: x["steps_per_s"])
        r.update(runs_sorted[len(runs_sorted) // 2])
        r["steps_per_s_all"] = [x["steps_per_s"] for x in r["repeats"]]


def quiet_trainer(max_steps: int, callbacks=(), precision: str = "32-true") -> L.Trainer:
    """A Lightning Trainer on one CPU that only trains: no logger, checkpoints, progress bar or validation."""
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks))


class StepTimes(L.Callback):
    """Wall and process-CPU time at the end of every training step, and the logged values of ``keys``: a
    Lightning callback itself (``callback_metrics``), and ``hf_callback()`` for a transformers Trainer
    (``on_step_end`` / ``on_log``). ``start()`` right before training."""

    def __init__(self, *keys: str):
        self.keys = keys
        self.values: dict[str, list[float]] = {k: [] for k in keys}
        self.start()

    def start(self) -> None:
        self.ends, self.cpu = [time.perf_counter()], [time.process_time()]

    def _step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._step_end()
        for k in self.keys:
            self.values[k].append(float(trainer.callback_metrics[k]))

    def hf_callback(self):
        from transformers import TrainerCallback

        times = self

        class HFStepTimes(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                times._step_end()

            def on_log(self, args, state, control, logs=None, **kwargs):
                for k in times.keys:
                    if logs and k in logs:
                        times.values[k].append(float(logs[k]))

        return HFStepTimes()

    def summary(self, warmup: int) -> dict:
        """Per-step wall and CPU seconds, the median and steps/s over the steps after ``warmup``, the values."""
        secs = [b - a for a, b in zip(self.ends[:-1], self.ends[1:])]
        cpu = [b - a for a, b in zip(self.cpu[:-1], self.cpu[1:])]
        return {
            "step_seconds": [round(s, 4) for s in secs],
            "step_cpu_seconds": [round(s, 4) for s in cpu],
            "median_step_s": round(statistics.median(secs[warmup:]), 4),
            "steps_per_s": round(len(secs[warmup:]) / sum(secs[warmup:]), 4),
            "median_step_cpu_s": round(statistics.median(cpu[warmup:]), 4),
            **{k.replace("/", "_"): [round(v, 4) for v in vals] for k, vals in self.values.items()},
        }
