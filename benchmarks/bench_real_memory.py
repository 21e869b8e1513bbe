"""Peak memory and seconds per step of GRPO on SmolLM2-135M-Instruct: full fine-tuning vs LoRA, with and
without activation checkpointing, fp32 and bf16-mixed.

    python benchmarks/bench_real_memory.py [--init-from models/smollm2-135m-instruct] [--steps 4] [--threads 2]

Each setting runs in a fresh process (peak RSS is per process: Linux ``ru_maxrss``): the same chat prompts
(1-2 digit addition, 4 prompts x 8 samples, <= 32 new tokens, beta 0.04 so the reference is in memory:
a second copy of the weights for full fine-tuning, the policy with adapters off for LoRA), the same sampling
seed, ``logits_chunk_size`` 256. The first step is a warm-up; the median of the others is reported, with the
load average. Writes benchmarks/results/real_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: (lora, activation_checkpointing, precision)
    "full": (False, False, "32-true"),
    "full+ckpt": (False, True, "32-true"),
    "lora": (True, False, "32-true"),
    "lora+ckpt": (True, True, "32-true"),
    "full bf16-mixed": (False, False, "bf16-mixed"),
}


def run(name: str, init_from: str, steps: int, threads: int) -> dict:
    import lightning as L
    import torch

    from alignlab.algorithms import GRPO
    from alignlab.data.datamodule import AlignDataModule
    from alignlab.model.lora import LoRAConfig

    torch.set_num_threads(threads)
    lora, ckpt, precision = SETTINGS[name]
    L.seed_everything(0)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 (MB)
    dm = AlignDataModule(kind="prompt", task="addition", task_args={"min_digits": 1, "max_digits": 2},
                         tokenizer=init_from, chat=True, answer_format="hash", batch_size=4, val_batch_size=4,
                         num_train=200, num_val=4, max_prompt_length=96, max_completion_length=32)
    module = GRPO(init_from=init_from, num_generations=8, max_new_tokens=32, val_max_new_tokens=32, beta=0.04,
                  lr=1e-5 if not lora else 1e-4, logits_chunk_size=256, activation_checkpointing=ckpt,
                  lora=LoRAConfig(r=16, alpha=32) if lora else None,
                  reward_funcs=["alignlab.rewards.rules.answer_accuracy_reward"],
                  val_reward="alignlab.rewards.rules.answer_accuracy_reward")
    loaded = rss()
    times = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *args):
            times.append(time.perf_counter() - self.t)

    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        precision=precision, callbacks=[Clock()])
    trainer.fit(module, dm)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"setting": name, "lora": lora, "activation_checkpointing": ckpt, "precision": precision,
            "trainable_params": trainable, "rss_after_load_mb": round(loaded), "peak_rss_mb": round(rss()),
            "s_per_step_median": round(statistics.median(times[1:]), 2), "s_per_step": [round(t, 2) for t in times],
            "loadavg_after": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init-from", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=sorted(SETTINGS), help="one setting, in this process (used internally)")
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run(args.only, args.init_from, args.steps, args.threads)))
        return
    if not Path(args.init_from, "config.json").is_file():
        sys.exit(f"error: --init-from {args.init_from}: no HF model directory there (run `make model`)")
    sys.path.insert(0, str(Path(__file__).parent))
    from common import cpu_model

    rows = []
    for name in SETTINGS:
        load = os.getloadavg()
        out = subprocess.run([sys.executable, __file__, "--only", name, "--init-from", args.init_from,
                              "--steps", str(args.steps), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1]) | {"loadavg_before": load}
        rows.append(row)
        print(f"{name:16s} peak RSS {row['peak_rss_mb']:6d} MB  {row['s_per_step_median']:6.2f} s/step  "
              f"trainable {row['trainable_params'] / 1e6:.2f}M  load {load[0]:.2f}", flush=True)
    result = {"model": args.init_from, "cpu": cpu_model(), "threads": args.threads, "steps": args.steps,
              "batch": "4 prompts x 8 samples, <= 32 new tokens, beta 0.04, logits_chunk_size 256", "rows": rows}
    out = ROOT / "benchmarks" / "results" / "real_memory.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
