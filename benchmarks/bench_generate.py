"""Sampling throughput: our ``generate`` vs transformers' ``generate`` on the SAME weights.

    python benchmarks/bench_generate.py [--out benchmarks/results/generate.json] [--repeats 5]
    python benchmarks/bench_generate.py --init-from models/smollm2-135m-instruct --batch 32 --num-samples 8 \
        --new-tokens 64 --repeats 3 --out benchmarks/results/generate_smollm2.json

The default TransformerConfig (the ~5M-parameter model of the built-in tasks) is exported with ``save_hf``
and loaded back as a ``LlamaForCausalLM``, so both sides run identical weights. Batch of 32 left-padded
prompts (lengths 8..16), 32 new tokens, plain sampling (temperature 1, no top-k / top-p), an EOS id
outside the vocabulary so every row produces exactly 32 tokens, 2 threads. After a warm-up each side is
timed ``--repeats`` times (interleaved) and the median is reported as generated tokens per second.
``--int8`` also times our sampler on the int8 copy (``model/int8.py``, the ``int8`` rollout engine: not exact,
calibrated on the prompts; the copy's making is timed apart and the next-token KL to fp32 recorded), in
the same interleaved loop. ``--init-from DIR`` runs a real checkpoint instead (both sides load DIR); ``--num-samples G`` samples G
completions per prompt (ours: one shared prefill, ``num_samples``; transformers: ``num_return_sequences``).

Fairness: transformers runs with its KV cache (``use_cache=True``), no streamer, no scores or
logits kept, top_k=0 so no logits processor is added; ours additionally computes the log-prob of every
sampled token (the trainers need them), which transformers does not.
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

import torch
from common import cpu_id, cpu_model, matmul_peak, memory_bandwidth  # benchmarks/common.py (run as python benchmarks/x.py)

from alignlab.model.generate import generate
from alignlab.model.hf import load_hf, save_hf
from alignlab.model.int8 import int8_matmul_speedup
from alignlab.model.transformer import Transformer, TransformerConfig


def make_prompts(batch: int, max_len: int, vocab: int, pad: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_len // 2, max_len + 1, (batch,), generator=g)
    ids = torch.randint(1, vocab, (batch, max_len), generator=g)
    mask = (torch.arange(max_len)[None, :] >= max_len - lengths[:, None]).long()  # left padding
    return ids.masked_fill(mask == 0, pad), mask


def roofline_seconds(cfg: TransformerConfig, prompt_lengths: list[int], num_samples: int, new_tokens: int,
                     peak_flops: float, bandwidth: float) -> dict:
    """The least time the workload can take on this machine: each forward (the prefill, then one per new
    token) takes at least max(its matmul FLOPs / the fp32 matmul peak, the bytes it must read / the memory
    bandwidth). FLOPs: 2 per weight per token (the projections and the LM head) plus attention's
    4 x heads x head_dim per (query, key) pair. Bytes: every fp32 weight once per forward, plus the keys and
    values in the cache for every row."""
    per_layer = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.hidden_dim
    weights = cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size
    attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim  # FLOPs per (query, key) pair
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4  # per cached position per row
    P, rows = max(prompt_lengths), len(prompt_lengths) * num_samples
    prefill_tokens = sum(prompt_lengths)
    steps = [(2 * cfg.n_layers * per_layer * prefill_tokens + 2 * cfg.dim * cfg.vocab_size * len(prompt_lengths)
              + attn * sum(n * n for n in prompt_lengths) / 2, 4 * weights)]
    for t in range(1, new_tokens):  # the forward that produces token t + 1 sees P + t keys
        steps.append((rows * (2 * weights + attn * (P + t)), 4 * weights + rows * (P + t) * kv_bytes))
    compute, memory = sum(f for f, _ in steps) / peak_flops, sum(b for _, b in steps) / bandwidth
    bound = sum(max(f / peak_flops, b / bandwidth) for f, b in steps)
    return {"seconds": bound, "matmul_seconds": compute, "memory_seconds": memory,
            "gflop": sum(f for f, _ in steps) / 1e9, "gbytes": sum(b for _, b in steps) / 1e9}


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", default="benchmarks/results/generate.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", help="a local HF Llama/Qwen directory (default: the built-in ~5M model)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--int8", action="store_true", help="also time the int8 copy's sampler (not exact)")
    args = p.parse_args(argv)

    import transformers
    from transformers import LlamaForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.init_from:
        from transformers import AutoModelForCausalLM

        ours = load_hf(args.init_from).float().eval()
        cfg = ours.config
        hf = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).eval()
    else:
        cfg = TransformerConfig()
        ours = Transformer(cfg).eval()
        with tempfile.TemporaryDirectory() as d:
            save_hf(ours, d)
            hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    G = args.num_samples

    pad, eos = 0, cfg.vocab_size  # an id outside the vocabulary: never sampled, so no row stops early
    ids, mask = make_prompts(args.batch, args.prompt_len, cfg.vocab_size, pad, args.seed)
    with torch.no_grad():  # same weights -> same logits
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        diff = (ours(ids, mask) - ref)[mask.bool()].abs().max().item()
    tol = 1e-3 if args.init_from else 1e-4  # a real model's logits reach ~40: float32 rounding at that scale
    assert diff < tol, f"ours and transformers disagree on the logits (max |diff| = {diff})"

    int8 = {}
    if args.int8:
        from alignlab.model.int8 import int8_copy

        t0 = time.perf_counter()
        copy = int8_copy(ours, calibration=(ids, mask))
        int8["copy_seconds"] = round(time.perf_counter() - t0, 3)
        with torch.no_grad():
            la, lb = ours(ids, mask)[mask.bool()].log_softmax(-1), copy(ids, mask)[mask.bool()].log_softmax(-1)
        int8["next_token_kl_mean"] = round(float((la.exp() * (la - lb)).sum(-1).mean()), 4)

    def run_ours(model=ours):
        out = generate(
            model,
            ids,
            mask,
            args.new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_samples=G,
        )
        assert out.completion_ids.shape == (args.batch * G, args.new_tokens)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=0,
                eos_token_id=eos,
                pad_token_id=pad,
                use_cache=True,
                num_beams=1,
                num_return_sequences=G,
                return_dict_in_generate=False,
                output_scores=False,
            )
        assert out.shape == (args.batch * G, args.prompt_len + args.new_tokens)

    load_before = os.getloadavg()[0]  # other processes on the machine skew both sides; recorded below
    sides = {"ours": run_ours, "hf": run_hf}
    if args.int8:
        sides["int8"] = lambda: run_ours(copy)
    for _ in range(args.warmup):
        for fn in sides.values():
            fn()
    times = {k: [] for k in sides}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every side alike
        for k, fn in sides.items():
            times[k] += timed(fn, 1)
    ours_t, hf_t = times["ours"], times["hf"]
    n_tokens = args.batch * G * args.new_tokens
    ours_tps, hf_tps = n_tokens / statistics.median(ours_t), n_tokens / statistics.median(hf_t)
    peak, bandwidth = matmul_peak(), memory_bandwidth()
    roof = roofline_seconds(cfg, mask.sum(-1).tolist(), G, args.new_tokens, peak, bandwidth)

    result = {
        "machine": {
            "cpu": cpu_model(),
            "cpu_id": cpu_id(), "int8_matmul_speedup": round(int8_matmul_speedup(), 3),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_avg_1min_before": round(load_before, 2),
            "load_avg_1min_after": round(os.getloadavg()[0], 2),
        },
        "config": {**cfg.to_dict(), "parameters": ours.num_parameters()},
        "workload": {
            "batch": args.batch,
            "num_samples": G,
            "init_from": args.init_from,
            "prompt_len": args.prompt_len,
            "prompt_lengths": mask.sum(-1).tolist(),
            "new_tokens": args.new_tokens,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "dtype": "float32",
        },
        "ours_seconds": ours_t,
        "hf_seconds": hf_t,
        "ours_tokens_per_s": round(ours_tps, 1),
        "hf_tokens_per_s": round(hf_tps, 1),
        "speedup": round(ours_tps / hf_tps, 2),
        "roofline": {
            "fp32_matmul_peak_gflops": round(peak / 1e9, 1),
            "memory_bandwidth_gbytes_s": round(bandwidth / 1e9, 1),
            **{k: round(v, 3) for k, v in roof.items()},
            "ours_fraction": round(roof["seconds"] / statistics.median(ours_t), 3),
            "hf_fraction": round(roof["seconds"] / statistics.median(hf_t), 3),
        },
    }
    if args.int8:
        int8_tps = n_tokens / statistics.median(times["int8"])
        result["int8"] = {**int8, "seconds": times["int8"], "tokens_per_s": round(int8_tps, 1),
                          "speedup_vs_hf": round(int8_tps / hf_tps, 2), "vs_ours_fp32": round(int8_tps / ours_tps, 2)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"generate B={args.batch}x{G} new={args.new_tokens} threads={args.threads}: ours {ours_tps:,.0f} tok/s, "
        f"transformers {hf_tps:,.0f} tok/s, speedup {ours_tps / hf_tps:.2f}x; roofline {roof['seconds']:.2f} s "
        f"(ours at {result['roofline']['ours_fraction']:.0%} of it, transformers at "
        f"{result['roofline']['hf_fraction']:.0%})"
        + (f"; int8 copy {result['int8']['tokens_per_s']:,.0f} tok/s ({result['int8']['speedup_vs_hf']:.2f}x "
           f"transformers, next-token KL {int8['next_token_kl_mean']})" if args.int8 else "") + f" -> {out}"
    )
    return result


if __name__ == "__main__":
    main()
