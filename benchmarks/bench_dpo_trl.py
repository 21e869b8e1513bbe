"""DPO training steps per second: our DPO (Lightning) vs TRL's ``DPOTrainer``, same model, same pairs.

    .venv/bin/pip install -e ".[bench]" "torch==2.13.0"       # TRL is a benchmark extra, never a dependency
    python benchmarks/bench_dpo_trl.py --init-from models/smollm2-135m-instruct [--pairs-per-step 16] [--steps 8]

The pairs are those of ``make train ALGO=dpo RECIPE=smollm2`` (configs/recipes/smollm2/dpo.yaml): chat-format
1-2 digit addition, chosen = the worked answer ending in "#### 95", rejected = the same with one digit of the
answer changed. Our DataModule renders and tokenizes them; TRL gets the same rendered texts (prompt with the
chat template applied, chosen/rejected followed by the EOS token) as a standard (non-conversational) dataset,
so both sides train on the same token ids.

Both sides: the same ``--pairs-per-step`` pairs per optimizer step, sigmoid loss, beta 0.1, a frozen
reference model scored on every step (TRL's default; ours ``precompute_ref_logps=False``), AdamW betas
(0.9, 0.95), constant learning rate, no weight decay, grad-norm clip 1.0, fp32, no gradient checkpointing,
the same number of threads. A step is timed end to end (the end of the previous step to the end of this one:
Lightning ``on_train_batch_end`` / HF ``on_step_end``). Runs alternate (ours, TRL, ...); the median run of
each side is reported, every run kept in the JSON, with the load average before and after.

Where the difference comes from (exact: same loss and gradients): the chosen and rejected sequences of a
pair share one prompt computation (their keys/values, ``PrefixCache``); padding is never computed outside
attention (``Packing``); the head's log-softmax is taken on completion tokens only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import trl
except ImportError:
    print('bench_dpo_trl: skipped, trl is not installed (pip install -e ".[bench]" "torch==2.13.0")')
    sys.exit(0)

import lightning as L
import torch
from common import StepTimes, cpu_model, median_runs, quiet_libraries, quiet_trainer  # benchmarks/common.py

from alignlab.algorithms import DPO
from alignlab.data.datamodule import AlignDataModule

TASK = dict(chat=True, answer_format="hash", task_args={"min_digits": 1, "max_digits": 2},
            max_prompt_length=96, max_completion_length=64)  # configs/recipes/smollm2/dpo.yaml


def run_ours(model_dir: str, cfg: dict, dm: AlignDataModule, max_steps: int) -> tuple[StepTimes, dict]:
    L.seed_everything(cfg["seed"], verbose=False)
    module = DPO(init_from=model_dir, beta=cfg["beta"], loss_type="sigmoid", lr=cfg["learning_rate"],
                 warmup_steps=0, lr_schedule="constant", weight_decay=0.0, max_grad_norm=1.0)
    steps = StepTimes("train/loss")
    load = os.getloadavg()[0]
    steps.start()
    quiet_trainer(max_steps, [steps]).fit(module, dm)
    return steps, {"load_avg_1min_before": round(load, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2)}


def run_trl(model_dir: str, cfg: dict, rows: list[dict], max_steps: int, out_dir: str) -> tuple[StepTimes, dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=cfg["seed"],
        max_steps=max_steps, per_device_train_batch_size=cfg["pairs_per_step"], gradient_accumulation_steps=1,
        beta=cfg["beta"], loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False,
        learning_rate=cfg["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    steps = StepTimes("loss")
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                         callbacks=[steps.hf_callback()])
    trainer.remove_callback(PrinterCallback)
    load = os.getloadavg()[0]
    steps.start()
    trainer.train()
    return steps, {"load_avg_1min_before": round(load, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--init-from", required=True, help="a local HF Llama/Qwen directory")
    p.add_argument("--out", default="benchmarks/results/dpo_vs_trl_smollm2.json")
    p.add_argument("--pairs-per-step", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; the median run is reported")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)  # configs/recipes/smollm2/dpo.yaml
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only (profiling)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")

    import transformers

    quiet_libraries(args.threads)
    max_steps = args.warmup + args.steps
    cfg = {"pairs_per_step": args.pairs_per_step, "beta": args.beta, "learning_rate": args.lr, "seed": args.seed}

    dm = AlignDataModule(kind="preference", tokenizer=args.init_from, batch_size=args.pairs_per_step,
                         num_train=max(200, max_steps * args.pairs_per_step), num_val=1, seed=args.seed, **TASK)
    dm.setup("fit")
    eos = dm.tokenizer.eos_token
    rows, tokens = [], []
    for _, batch in zip(range(max_steps), dm.train_dataloader()):  # the pairs of every step, in our order
        for i, prompt in enumerate(batch["prompt"]):
            side = {}
            for name in ("chosen", "rejected"):
                mask = batch[f"{name}_loss_mask"][i].bool()
                side[name] = dm.tokenizer.decode(batch[f"{name}_input_ids"][i][mask][:-1]) + eos
            rows.append({"prompt": prompt, **side})
        tokens.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"ours": lambda: run_ours(args.init_from, cfg, dm, max_steps),
                "trl": lambda: run_trl(args.init_from, cfg, rows, max_steps, str(Path(tmp) / "trl"))}
        for rep in range(args.repeats):
            for side in [s for s in runs if args.only in (None, s)]:
                steps, load = runs[side]()
                run = {**steps.summary(args.warmup), **load}
                results.setdefault(side, {"repeats": []})["repeats"].append(run)
                print(f"{side:5} run {rep + 1}/{args.repeats}: {run['steps_per_s']:.3f} steps/s", flush=True)
    median_runs(results)

    result = {
        "machine": {"cpu": cpu_model(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                    "lightning": L.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "model": args.init_from,
        "config": {**cfg, "warmup_steps": args.warmup, "timed_steps": args.steps, "loss": "sigmoid",
                   "reference": "frozen model, scored every step", "precision": "fp32", "task": TASK,
                   "real_tokens_per_step (chosen + rejected, prompts counted in both)": tokens},
        **results,
    }
    if "ours" in results and "trl" in results:
        o, t = results["ours"], results["trl"]
        result["speedup"] = round(o["steps_per_s"] / t["steps_per_s"], 2)
        paired = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(o["repeats"], t["repeats"])]
        result["speedup_paired"] = {"median": round(statistics.median(paired), 2), "all": [round(x, 2) for x in paired]}
        print(f"ours {o['median_step_s']:.3f} s/step, TRL {t['median_step_s']:.3f} s/step: "
              f"speedup {result['speedup']:.2f}x (run by run {result['speedup_paired']['all']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
