"""The two CPU kernel choices of the model, timed at the shapes of a GRPO step (16 prompts x 8 samples).

    python benchmarks/bench_kernels.py [--out benchmarks/results/kernels.json] [--threads 2]

1. Attention: ``F.scaled_dot_product_attention`` (PyTorch's fused CPU kernel) vs the eager
   ``softmax(q k^T / sqrt(D)) v`` that ``speed.attention`` uses below 128 keys. Training shape: B=128 rows,
   H=8 heads, T=27 queries, S=33 keys, D=32, a padding mask, forward and forward + backward, fp32 and bf16;
   decoding shape: T=1 query over S=30 cached keys, forward, fp32 and bf16.
2. Sampling one token per row from (128, 128) probabilities: ``torch.multinomial`` vs ``generate.sample``
   (inverse CDF, one uniform per row).

Each case is timed as the median of 5 runs of ``--iters`` calls after a warm-up; microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_model  # benchmarks/common.py (scripts run as python benchmarks/x.py)

import alignlab.model.speed as speed
from alignlab.model.generate import sample


def per_call_us(fn, iters: int) -> float:
    for _ in range(max(3, iters // 10)):
        fn()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - t) / iters * 1e6)
    return round(statistics.median(runs), 1)


def attention_cases(iters: int) -> list[dict]:
    B, H, D = 128, 8, 32
    g = torch.Generator().manual_seed(0)
    kernels = {"sdpa": lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
               "eager": lambda q, k, v, mask: speed.attention(q, k, v, mask)}
    cases = [(kind, dtype, T, S) for dtype in (torch.float32, torch.bfloat16)
             for kind, T, S in (("fwd", 27, 33), ("fwd+bwd", 27, 33), ("decode", 1, 30))]
    out = []
    for kind, dtype, T, S in cases:
        mask = torch.rand(B, 1, T, S, generator=g) > 0.2
        mask |= torch.eye(T, S, dtype=torch.bool)  # every query sees a key
        q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype).requires_grad_() for n in (T, S, S))
        backward = kind == "fwd+bwd"
        row = {"case": f"attention {str(dtype).split('.')[1]} {kind}"}
        for name, fn in kernels.items():
            def call(fn=fn):
                with torch.set_grad_enabled(backward):
                    y = fn(q, k, v, mask)
                    if backward:
                        y.float().sum().backward()
            row[name + "_us"] = per_call_us(call, iters)
        row["speedup"] = round(row["sdpa_us"] / row["eager_us"], 2)
        out.append(row)
    return out


def sampling_case(iters: int) -> dict:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(128, 128, generator=g).softmax(-1)
    row = {"case": "sample 128 rows x 128 tokens",
           "multinomial_us": per_call_us(lambda: torch.multinomial(probs, 1, generator=g), iters),
           "inverse_cdf_us": per_call_us(lambda: sample(probs, g), iters)}
    row["speedup"] = round(row["multinomial_us"] / row["inverse_cdf_us"], 2)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", default="benchmarks/results/kernels.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = attention_cases(args.iters) + [sampling_case(args.iters * 10)]
    for r in rows:
        times = ", ".join(f"{k[:-3]} {v} us" for k, v in r.items() if k.endswith("_us"))
        print(f"{r['case']:32} {times}: {r['speedup']}x")
    result = {"cpu": cpu_model(), "torch": torch.__version__, "threads": args.threads, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
