"""GRPO training steps per second: our GRPO (Lightning) vs TRL's ``GRPOTrainer``, same model, same prompts.

    .venv/bin/pip install -e ".[bench]" "torch==2.13.0"       # TRL is a benchmark extra, never a dependency
    python benchmarks/bench_grpo_trl.py [--model default|6m] [--bf16] [--steps 20] [--warmup 3] [--init-from DIR]

``--model default`` is the model ``make train ALGO=grpo`` trained until issue 17 (dim 64, 2 layers, 0.1M parameters: per-operation
overhead dominates a step); ``--model 6m`` is dim 256, 6 layers, 4.9M parameters (the step is bound by matmul
throughput). Unless ``--init-from`` names an HF export, the model is first SFT-trained in process on the
scratchpad addition task (``--sft-steps``, 0 = random init), then exported once with ``save_hf``: ours loads it
with ``GRPO(init_from=...)``, TRL with ``AutoModelForCausalLM.from_pretrained`` -- identical weights and
tokenizer on both sides.

Both sides run the same ``warmup + steps`` GRPO steps, in the same order of prompts (TRL with
``shuffle_dataset=False`` on the prompts our DataLoader serves), with the same G, prompts per step, max
completion length, temperature, beta (k3 KL to a frozen reference), epsilon, learning rate (constant,
AdamW betas (0.9, 0.95), no weight decay, grad-norm clip 1.0), one update per rollout, group-scaled
advantages, seq-mean-token-mean aggregation (TRL ``loss_type="grpo"``), no gradient checkpointing, the same
precision (fp32, or ``--bf16``: bf16 autocast with fp32 weights on both sides, TRL's own default), the same
reward function (``alignlab.rewards.rules.accuracy_reward``: our reward contract is TRL's, so it is passed
unchanged) and the same number of torch threads. A step is timed end to end, from the end of the previous
step to the end of this one (Lightning ``on_train_batch_end`` / HF ``on_step_end``): generation, reward,
the reference forward, the policy forward + backward and the optimizer step, plus each framework's own
overhead. The first ``--warmup`` steps are not timed. The reward of each step is its batch mean.

Where the difference comes from (all exact: same samples distribution, same loss and gradients): each
prompt is prefilled once for its G samples and goes through the policy and the reference once per group
(its keys/values shared by the G completions, ``PrefixCache``); padding is never computed outside
attention (``Packing``); short sequences use eager attention on the CPU. ``--micro-batch-size`` (default
0 = one pass) splits our forward/backward into micro-batches whose gradients add up to the same step.

Each side runs ``--repeats`` times, alternating (ours, TRL, ours, TRL, ...), and the median run of each side
is reported (every run is kept in the JSON): this machine's speed drifts by 10-20% from minute to minute.
``speedup_paired`` divides each of our runs by the TRL run right after it (the median of those ratios is
less sensitive to a drift over the whole benchmark than the ratio of the two medians).
``--seeds 0 1 2`` runs each side once per seed instead (the same prompts; the seed sets the samples) and adds
``reward_curve`` to the JSON: each step's mean reward +- std over the seeds, each seed's mean over its last
``--last-k`` steps, and ours - TRL in pooled stds -- whether the two follow the same reward curve.
The machine's load average before and after each run is recorded, since other processes slow both sides.
Each step's process CPU time is recorded as well: on a shared machine it measures the work done, where wall
time also counts the wait for a core (and, with 2+ threads on an oversubscribed machine, every OpenMP
barrier: use --threads 1).
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
    print('bench_grpo_trl: skipped, trl is not installed (pip install -e ".[bench]" "torch==2.13.0")')
    sys.exit(0)

import lightning as L
import torch
from common import StepTimes, cpu_id, cpu_model, median_runs, quiet_libraries, quiet_trainer  # benchmarks/common.py (run as python benchmarks/x.py)

from alignlab.ablation import mean_std
from alignlab.algorithms import GRPO, SFT
from alignlab.data.datamodule import AlignDataModule
from alignlab.model.int8 import int8_matmul_speedup
from alignlab.model.lora import LORA_TARGETS, LoRAConfig
from alignlab.model.transformer import TransformerConfig
from alignlab.rewards.rules import accuracy_reward, answer_accuracy_reward

MODELS = {  # --model: architecture, SFT learning rate and default SFT steps
    # the 0.1M laptop model (width 64: configs/algo/sft.yaml before it became width 128), small enough that
    # per-operation overhead dominates
    "default": (dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, max_seq_len=64), 3e-3, 800),
    # 4.9M parameters: the step is bound by matmul throughput
    "6m": (dict(vocab_size=128, dim=256, n_layers=6, n_heads=8, max_seq_len=64), 1e-3, 300),
}
TASK = dict(task="addition", task_args={"min_digits": 1, "max_digits": 2, "scratchpad_prob": 0.5},
            max_prompt_length=16, max_completion_length=24)  # configs/base.yaml
# --chat: the task of `make train ALGO=grpo RECIPE=smollm2` (configs/recipes/smollm2/grpo.yaml), for an instruct model
CHAT_TASK = dict(task="addition", chat=True, answer_format="hash", task_args={"min_digits": 1, "max_digits": 2},
                 max_prompt_length=96, max_completion_length=32)
REWARDS = {False: accuracy_reward, True: answer_accuracy_reward}


# ------------------------------------------------------------------------------------------ the model
def sft_export(out: Path, model: str, steps: int | None, seed: int) -> dict:
    """SFT of ``model`` on the scratchpad addition task (steps=0: random init) -> HF dir."""
    arch, lr, default_steps = MODELS[model]
    steps = default_steps if steps is None else steps
    L.seed_everything(seed, verbose=False)
    module = SFT(arch=TransformerConfig(**arch), lr=lr, warmup_steps=min(50, steps // 5), lr_schedule="cosine")
    t0 = time.perf_counter()
    if steps > 0:
        dm = AlignDataModule(kind="sft", batch_size=64, num_train=20000, num_val=200, **TASK)
        quiet_trainer(steps).fit(module, dm)
    module.export(out)
    return {"init": "sft" if steps > 0 else "random", "sft_steps": steps, "sft_seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------- timing
def summary(steps: StepTimes, warmup: int, last_k: int) -> dict:
    """Per-step wall (and process CPU) seconds, steps/s over the timed steps, rewards."""
    out = steps.summary(warmup)
    rewards, lengths = steps.values[steps.keys[0]], steps.values[steps.keys[1]]
    return {
        **{k: out[k] for k in ("step_seconds", "step_cpu_seconds", "median_step_s", "steps_per_s", "median_step_cpu_s")},
        "rewards": [round(r, 4) for r in rewards],
        f"mean_reward_last_{last_k}": round(statistics.mean(rewards[-last_k:]), 4),
        "mean_reward_first_5": round(statistics.mean(rewards[:5]), 4),
        "mean_completion_length": [round(x, 2) for x in lengths],
    }


def reward_curves(results: dict[str, dict], last_k: int) -> dict:
    """Over the runs of each side (one per ``--seeds`` seed): each step's mean reward +- std over seeds, and each
    seed's mean over its last ``last_k`` steps, with their mean +- std; then ours - TRL in units of the pooled std."""
    out: dict[str, dict] = {}
    last_mean_std = {}
    for side, r in results.items():
        curves = [run["rewards"] for run in r["repeats"]]
        last = [statistics.fmean(c[-last_k:]) for c in curves]
        per_step = [mean_std(x) for x in zip(*curves)]
        last_mean_std[side] = mean_std(last)
        out[side] = {
            "seeds": [run["seed"] for run in r["repeats"]],
            "per_step_mean": [round(m, 4) for m, _ in per_step],
            "per_step_std": [round(sd, 4) for _, sd in per_step],
            f"last_{last_k}_per_seed": [round(x, 4) for x in last],
            f"last_{last_k}_mean": round(last_mean_std[side][0], 4),
            f"last_{last_k}_std": round(last_mean_std[side][1], 4),
        }
    if "ours" in out and "trl" in out:
        (o, o_sd), (t, t_sd) = last_mean_std["ours"], last_mean_std["trl"]
        pooled = ((o_sd ** 2 + t_sd ** 2) / 2) ** 0.5
        out["ours_minus_trl"] = {f"last_{last_k}": round(o - t, 4), "pooled_std": round(pooled, 4),
                                 "in_pooled_stds": round((o - t) / pooled, 2) if pooled > 0 else None}
    return out


# ------------------------------------------------------------------------------------------- ours
def run_ours(model_dir: str, cfg: dict, dm: AlignDataModule, max_steps: int, int8: bool = False) -> tuple[dict, dict]:
    """Our GRPO; ``int8``: rollouts by the int8 copy, corrected by token-level truncated importance sampling."""
    L.seed_everything(cfg["seed"], verbose=False)
    engine = dict(rollout_engine="int8", rollout_correction="token_tis") if int8 else {}
    module = GRPO(init_from=model_dir, num_generations=cfg["num_generations"], max_new_tokens=cfg["max_completion_length"],
                  temperature=cfg["temperature"], beta=cfg["beta"], epsilon=cfg["epsilon"], kl_estimator="k3",
                  scale_rewards="group", loss_agg_mode="seq-mean-token-mean", num_iterations=1, minibatches=1,
                  reward_funcs=[f"alignlab.rewards.rules.{REWARDS[cfg['chat']].__name__}"], lr=cfg["learning_rate"], warmup_steps=0,
                  lr_schedule="constant", weight_decay=0.0, max_grad_norm=1.0, sampling_seed=cfg["seed"],
                  micro_batch_size=cfg["ours_micro_batch_size"],
                  lora=LoRAConfig(r=cfg["lora_r"], alpha=2.0 * cfg["lora_r"]) if cfg["lora_r"] else None, **engine)
    steps = StepTimes("train/reward", "completions/mean_length")
    load = os.getloadavg()[0]
    steps.start()
    quiet_trainer(max_steps, [steps], "bf16-mixed" if cfg["bf16"] else "32-true").fit(module, dm)
    return steps, {"load_avg_1min_before": round(load, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2)}


# -------------------------------------------------------------------------------------------- TRL
def run_trl(model_dir: str, cfg: dict, rows: list[dict], max_steps: int, out_dir: str) -> tuple[dict, dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # TRL tokenizes prompts with the tokenizer's special tokens; ours without: they must be the same ids
    assert tokenizer(text=rows[0]["prompt"])["input_ids"] == tokenizer(rows[0]["prompt"], add_special_tokens=False)[
        "input_ids"], "TRL would see different prompt ids than ours"
    G = cfg["num_generations"]
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=cfg["bf16"], fp16=False, gradient_checkpointing=False,
        seed=cfg["seed"], max_steps=max_steps, per_device_train_batch_size=cfg["prompts_per_step"] * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=cfg["max_completion_length"],
        temperature=cfg["temperature"], top_k=0, top_p=1.0, beta=cfg["beta"], epsilon=cfg["epsilon"],
        num_iterations=1, loss_type="grpo", scale_rewards="group", learning_rate=cfg["learning_rate"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, shuffle_dataset=False, use_vllm=False, logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    steps = StepTimes("reward", "completions/mean_length")
    peft_config = None
    if cfg["lora_r"]:  # the same adapters as ours: every projection, alpha = 2 r, no dropout
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], lora_dropout=0.0,
                                 target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[REWARDS[cfg["chat"]]], args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(rows), callbacks=[steps.hf_callback()],
                          peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # it prints every step's log dict
    load = os.getloadavg()[0]
    steps.start()
    trainer.train()
    return steps, {
        "load_avg_1min_before": round(load, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "optim": str(args.optim)}


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", default=None, help="default: benchmarks/results/grpo_vs_trl_<model>[_bf16].json")
    p.add_argument("--model", choices=sorted(MODELS), default="default",
                   help="architecture of the in-process SFT model (ignored with --init-from)")
    p.add_argument("--init-from", default=None, help="an HF export to start from (default: a quick in-process SFT)")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="SFT steps when no --init-from (default: 800 for the default model, 300 for 6m; 0 = random init)")
    p.add_argument("--steps", type=int, default=20, help="timed GRPO steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed GRPO steps before them")
    p.add_argument("--last-k", type=int, default=10, help="mean reward over the last K steps")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; the median run is reported")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=24)  # configs/algo/grpo.yaml
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-4)  # configs/algo/grpo.yaml
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="ours only: completions per forward/backward (0 = one pass); the same update")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="both sides in bf16 mixed precision (autocast; fp32 weights)")
    p.add_argument("--chat", action="store_true",
                   help="the chat-format task and answer_accuracy_reward of the SmolLM2 recipe (for an instruct model)")
    p.add_argument("--lora-r", type=int, default=0,
                   help="LoRA of rank r on every projection (alpha 2r) on both sides (0 = full fine-tuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="one run per side for each of these seeds instead of --repeats runs of --seed: the reward "
                        "curve over seeds ('reward_curve' in the JSON: per-step mean +- std, last-K mean +- std)")
    p.add_argument("--only", choices=["ours", "trl", "int8"], default=None, help="run one side only (profiling)")
    p.add_argument("--int8", action="store_true",
                   help="a third side, ours_int8: our GRPO sampling with the int8 rollout engine + token_tis (not exact)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.last_k < 1 or args.repeats < 1:
        p.error("--steps, --last-k and --repeats must be >= 1, --warmup >= 0")

    import transformers

    quiet_libraries(args.threads)
    max_steps = args.warmup + args.steps
    cfg = {"prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
           "max_completion_length": args.max_completion_length, "temperature": args.temperature,
           "beta": args.beta, "epsilon": args.epsilon, "learning_rate": args.lr, "seed": args.seed,
           "ours_micro_batch_size": args.micro_batch_size or None, "bf16": args.bf16,
           "lora_r": args.lora_r, "chat": args.chat}

    with tempfile.TemporaryDirectory() as tmp:
        if args.init_from is not None:
            model_dir, init = args.init_from, {"init": "init_from", "init_from": args.init_from}
        else:
            model_dir = str(Path(tmp) / "sft")
            init = sft_export(Path(model_dir), args.model, args.sft_steps, args.seed)
            print(f"model: {init}", flush=True)

        # the prompts of every step, in the order our DataLoader serves them (same seed -> same order again)
        dm = AlignDataModule(kind="prompt", tokenizer=model_dir, batch_size=args.prompts_per_step,
                             num_train=max(1000, max_steps * args.prompts_per_step), num_val=1,
                             **(CHAT_TASK if args.chat else TASK))
        dm.setup("fit")
        rows = []
        for i, batch in zip(range(max_steps), dm.train_dataloader()):
            rows += [{"prompt": q, "answer": a} for q, a in zip(batch["prompt"], batch["answer"])]

        results: dict[str, dict] = {}
        runs = {"ours": lambda c: run_ours(model_dir, c, dm, max_steps),
                "trl": lambda c: run_trl(model_dir, c, rows, max_steps, str(Path(tmp) / "trl"))}
        if args.int8 or args.only == "int8":
            runs["ours_int8"] = lambda c: run_ours(model_dir, c, dm, max_steps, int8=True)
        only = {"int8": "ours_int8"}.get(args.only, args.only)
        sides = [side for side in runs if only in (None, side)]
        # the prompts are the same for every seed (their order is the data seed's); the seed sets the
        # initialisation of the random number streams, hence the samples
        seeds = args.seeds or [args.seed] * args.repeats
        for rep, seed in enumerate(seeds):  # alternate the sides: a slow spell of the machine hits both
            for side in sides:
                steps, load = runs[side]({**cfg, "seed": seed})
                run = {"seed": seed, **summary(steps, args.warmup, args.last_k), **load}
                results.setdefault(side, {"repeats": []})["repeats"].append(run)
                print(f"{side:5} run {rep + 1}/{len(seeds)} (seed {seed}): {run['steps_per_s']:.3f} steps/s, "
                      f"mean reward {statistics.mean(run['rewards']):.3f}", flush=True)
        curves = reward_curves(results, args.last_k) if args.seeds else None
        median_runs(results)  # the median run's numbers; every run is kept under "repeats"

    result = {
        "machine": {
            "cpu": cpu_model(), "cpu_id": cpu_id(), "int8_matmul_speedup": round(int8_matmul_speedup(), 3),
            "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "lightning": L.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        },
        "model": {"name": args.model, **MODELS[args.model][0], **init},
        "config": {**cfg, "seeds": seeds, "warmup_steps": args.warmup, "timed_steps": args.steps, "last_k": args.last_k,
                   "completions_per_step": args.prompts_per_step * args.num_generations, "num_iterations": 1,
                   "kl_estimator": "k3", "scale_rewards": "group", "loss": "seq-mean-token-mean (TRL loss_type=grpo)",
                   "lr_schedule": "constant", "adam_betas": [0.9, 0.95], "max_grad_norm": 1.0,
                   "precision": "bf16 autocast, fp32 weights" if args.bf16 else "fp32",
                   "reward": f"alignlab.rewards.rules.{REWARDS[args.chat].__name__}",
                   "task": CHAT_TASK if args.chat else TASK},
        **results,
        **({"reward_curve": curves} if curves else {}),
    }
    if "ours" in results and "trl" in results:
        o, t = results["ours"], results["trl"]
        result["speedup"] = round(o["steps_per_s"] / t["steps_per_s"], 2)
        result["speedup_cpu_time"] = round(t["median_step_cpu_s"] / o["median_step_cpu_s"], 2)
        # run i of ours against run i of TRL, which ran right after it: the machine's drift over the whole
        # benchmark cancels out of each ratio
        paired = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(o["repeats"], t["repeats"])]
        result["speedup_paired"] = {"median": round(statistics.median(paired), 2),
                                    "all": [round(x, 2) for x in paired]}
        k = f"mean_reward_last_{args.last_k}"
        print(f"\n{'':6}{'steps/s':>9}{'median s/step':>15}{'CPU s/step':>12}{'reward first 5':>16}"
              f"{'reward last ' + str(args.last_k):>16}")
        for name, r in (("ours", o), ("TRL", t)):
            print(f"{name:6}{r['steps_per_s']:>9.3f}{r['median_step_s']:>15.3f}{r['median_step_cpu_s']:>12.3f}"
                  f"{r['mean_reward_first_5']:>16.3f}{r[k]:>16.3f}")
        if "ours_int8" in results:
            q = results["ours_int8"]
            result["int8_speedup"] = round(q["steps_per_s"] / t["steps_per_s"], 2)
            result["int8_vs_ours"] = round(q["steps_per_s"] / o["steps_per_s"], 2)
            print(f"{'int8':6}{q['steps_per_s']:>9.3f}{q['median_step_s']:>15.3f}{q['median_step_cpu_s']:>12.3f}"
                  f"{q['mean_reward_first_5']:>16.3f}{q[k]:>16.3f}   ({result['int8_speedup']:.2f}x TRL)")
        print(f"speedup {result['speedup']:.2f}x wall, {result['speedup_cpu_time']:.2f}x CPU time (median of {len(seeds)} "
              f"runs of {args.steps} timed steps after {args.warmup} warm-up, {args.prompts_per_step}x{args.num_generations} completions/step, "
              f"{args.threads} threads); run by run {result['speedup_paired']['all']}, "
              f"median {result['speedup_paired']['median']:.2f}x")
    if curves:
        k = f"last_{args.last_k}"
        for side in sides:
            c = curves[side]
            print(f"reward over seeds {c['seeds']}, {side:9}: mean of the last {args.last_k} steps "
                  f"{c[k + '_mean']:.3f} +- {c[k + '_std']:.3f}; per step {c['per_step_mean']}")
        if "ours_minus_trl" in curves:
            d = curves["ours_minus_trl"]
            print(f"ours - TRL: {d[k]:+.3f} ({d['in_pooled_stds']} pooled stds)")
    out = Path(args.out or f"benchmarks/results/grpo_vs_trl_{args.model}{'_bf16' if args.bf16 else ''}"
                           f"{f'_lora{args.lora_r}' if args.lora_r else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
