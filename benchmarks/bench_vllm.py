"""alignlab's sampler vs the vLLM rollout engine on SmolLM2-135M-Instruct, side by side, and the log-prob mismatch.

    make bench-vllm        # = .venv-vllm/bin/python benchmarks/bench_vllm.py  -> benchmarks/results/vllm.json

Two parts, each in its own process (one vLLM engine per process): the colocated engine
(``model.engines.VLLMEngine``) at fp32, then at bf16, each beside alignlab's sampler (``model.generate.generate``
on the fp32 policy) in the same process. The two samplers are timed interleaved -- alignlab, vLLM, alignlab,
vLLM -- so that both see the same load on a shared machine. Workloads, each timed ``--repeats`` times after
``--warmup`` runs (median):
  fixed    32 random prompts (8..16 tokens) x 32 new tokens, no EOS (every row makes exactly 32 tokens): raw
           decoding speed, as in bench_generate.py
  rollout  the GRPO recipe's rollout: 4 chat prompts x 8 samples, <= 32 new tokens, stops at <|im_end|>
           (through ``OnPolicyModule.rollout``: engine seam, vLLM's weight sync before each rollout included)
Mismatch (vLLM parts): the trainer's fp32 log-probs of vLLM's sampled tokens vs the log-probs vLLM reported
(``sampling/logp_difference/{mean,max}`` as GRPO logs them), over 16 prompts x 8 samples at T = 1.
Also recorded: engine start-up time, the memory the engine took, a weight sync's time, the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m-instruct"


def make_prompts(batch: int, max_len: int, vocab: int, pad: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_len // 2, max_len + 1, (batch,), generator=g)
    ids = torch.randint(3, vocab, (batch, max_len), generator=g)
    mask = (torch.arange(max_len)[None, :] >= max_len - lengths[:, None]).long()  # left padding
    return ids.masked_fill(mask == 0, pad), mask


def timed(fn, warmup: int, repeats: int) -> tuple[list[float], object]:
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def module_and_batches(dtype: str, args):
    from alignlab.algorithms import GRPO
    from alignlab.data.datamodule import AlignDataModule

    m = GRPO(init_from=str(MODEL), num_generations=8, max_new_tokens=32, beta=0.0, logits_chunk_size=256,
             reward_funcs=["alignlab.rewards.rules.answer_accuracy_reward"], rollout_engine="vllm",
             vllm={"dtype": dtype, "kv_cache_memory_gb": 1.0},
             val_reward="alignlab.rewards.rules.answer_accuracy_reward")
    dm = AlignDataModule(kind="prompt", task="addition", task_args={"min_digits": 1, "max_digits": 2},
                         tokenizer=str(MODEL), chat=True, answer_format="hash", batch_size=4, val_batch_size=16,
                         num_train=64, num_val=16, max_prompt_length=96, max_completion_length=32, seed=args.seed)
    dm.setup("fit")
    return m, next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))


def part(dtype: str, args) -> dict:
    """One vLLM engine at ``dtype`` and alignlab's sampler on the fp32 policy, in this process, timed
    interleaved (alignlab, vLLM, alignlab, vLLM, ...) so that both see the same machine load."""
    torch.set_num_threads(args.threads)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from alignlab.model.engines import AlignlabEngine
    from alignlab.model.generate import generate

    out: dict = {"vllm_dtype": dtype}
    t0 = time.perf_counter()
    m, batch, many = module_and_batches(dtype, args)
    vllm_engine, ours = m.engine, AlignlabEngine(m)
    vllm_engine.maybe_sync(0)
    out["vllm_start_s"] = round(time.perf_counter() - t0, 2)
    out["vllm_engine_memory_mb"] = round(vllm_engine.memory_mb)

    # fixed: 32 x 32 tokens, no EOS
    ids, mask = make_prompts(args.batch, 16, m.policy.config.vocab_size, m.pad_id, args.seed)
    prompts = [TokensPrompt(prompt_token_ids=r[k.bool()].tolist()) for r, k in zip(ids, mask)]
    params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True, logprobs=0, seed=0,
                            detokenize=False)
    fixed = {"alignlab": lambda: generate(m.policy, ids, mask, args.new_tokens, eos_token_id=-1,
                                          pad_token_id=m.pad_id, generator=torch.Generator().manual_seed(0)),
             "vllm": lambda: vllm_engine.llm.generate(prompts, params, use_tqdm=False)}

    # rollout: the recipe's 4 prompts x 8 samples through the engine seam (vLLM: a weight sync each time)
    tokens: dict[str, list[int]] = {"alignlab": [], "vllm": []}
    syncs: list[float] = []

    def rollout(name):
        def run():
            m.engine = ours if name == "alignlab" else vllm_engine
            if name == "vllm":
                vllm_engine.synced_step = None  # as after an optimizer step: sync before sampling
            r = m.rollout(batch)
            tokens[name].append(int(r.completion_mask.sum()))
            if name == "vllm":
                syncs.append(vllm_engine.last_sync_s)
        return run

    work = {"fixed": fixed, "rollout": {n: rollout(n) for n in ("alignlab", "vllm")}}
    times = {w: {n: [] for n in ("alignlab", "vllm")} for w in work}
    for i in range(args.warmup + args.repeats):
        for w, fns in work.items():
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                if i >= args.warmup:
                    times[w][name].append(round(time.perf_counter() - t, 3))
    for name in ("alignlab", "vllm"):
        tok = tokens[name][args.warmup:]
        out[name] = {
            "fixed": {"tokens": args.batch * args.new_tokens, "seconds": times["fixed"][name],
                      "tok_per_s": round(args.batch * args.new_tokens / statistics.median(times["fixed"][name]), 1)},
            "rollout": {"completions": 32, "tokens": tok, "seconds": times["rollout"][name],
                        "tok_per_s": round(statistics.median(n / t for n, t in zip(tok, times["rollout"][name])), 1)},
        }
    out["vllm"]["weight_sync_s"] = [round(x, 3) for x in syncs[args.warmup:]]
    out["vllm_vs_alignlab"] = {w: round(out["vllm"][w]["tok_per_s"] / out["alignlab"][w]["tok_per_s"], 2)
                               for w in work}

    # the mismatch, as GRPO's prepare measures it (trainer fp32 vs the engine's reported log-probs)
    from alignlab.losses.policy import truncated_importance_weights
    m.engine = vllm_engine
    r = m.rollout(many)
    m.prepare(r)
    out["mismatch"] = {"completions": len(r), "tokens": int(r.completion_mask.sum()),
                       "logp_difference_mean": float(r.stats["sampling/logp_difference/mean"]),
                       "logp_difference_max": float(r.stats["sampling/logp_difference/max"])}
    for level in ("token", "sequence"):  # what the correction would weigh these samples by (cap 3)
        _, w = truncated_importance_weights(r.logp_old, r.sampler_logp, r.completion_mask, level, 3.0)
        out["mismatch"][f"{level}_is_weight"] = {k.rsplit("/", 1)[1]: round(float(v), 4) for k, v in w.items()}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", default="benchmarks/results/vllm.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", help="internal: run one part (float32 | bfloat16), print JSON")
    args = p.parse_args(argv)
    if args.part:
        print("RESULT " + json.dumps(part(args.part, args)), flush=True)
        return {}

    import transformers
    import vllm

    result = {"machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "vllm": vllm.__version__,
                          "threads": args.threads, "cpus": os.cpu_count(),
                          "load_avg_1min_before": round(os.getloadavg()[0], 2)},
              "command": "make bench-vllm  (.venv-vllm/bin/python benchmarks/bench_vllm.py)",
              "workload": {"fixed": f"{args.batch} random prompts (8..16 tokens) x {args.new_tokens} new tokens, "
                                    "no EOS, temperature 1",
                           "rollout": "GRPO recipe: 4 chat prompts x 8 samples, <= 32 new tokens, EOS <|im_end|>",
                           "mismatch": "16 chat prompts x 8 samples at T=1: trainer fp32 vs vLLM's log-probs",
                           "warmup": args.warmup, "repeats": args.repeats},
              "parts": []}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
    for name in ("float32", "bfloat16"):
        load = round(os.getloadavg()[0], 2)
        cmd = [sys.executable, __file__, "--part", name, "--threads", str(args.threads), "--warmup",
               str(args.warmup), "--repeats", str(args.repeats), "--batch", str(args.batch), "--new-tokens",
               str(args.new_tokens), "--seed", str(args.seed)]
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
            if proc.returncode:
                log.seek(0)
                sys.exit(f"{name} failed:\n{log.read()[-3000:]}")
        res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
        res["load_avg_1min_before"], res["load_avg_1min_after"] = load, round(os.getloadavg()[0], 2)
        print(json.dumps(res), flush=True)
        result["parts"].append(res)
    result["machine"]["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
