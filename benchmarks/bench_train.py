"""SFT training throughput (tokens/s) and model-FLOPs utilisation against the machine's fp32 matmul peak.

    python benchmarks/bench_train.py [--threads 2] [--init-from DIR] [--fused-optimizer] [--out FILE.json]

Peak: the best of several large fp32 matmuls (2 n^3 FLOPs each) on the same threads, before and after the runs. Model FLOPs per
trained token follow the PaLM appendix: 6 N (N = non-embedding parameters plus the LM head) + 12 L T C for
attention (forward + backward). The step is the real one: SFT loss, backward, gradient clipping, the trainer's AdamW (``--fused-optimizer``:
the fused one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from common import cpu_model, matmul_peak, seconds  # benchmarks/common.py (run as python benchmarks/x.py)

from alignlab.algorithms import SFT
from alignlab.model.transformer import TransformerConfig


def model_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    per_layer = (cfg.dim * cfg.head_dim * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)) + 3 * cfg.dim * cfg.hidden_dim
    n = cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size  # matmul parameters incl. the LM head
    return 6 * n + 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


def bench(cfg: TransformerConfig, batch: int, seq_len: int, steps: int, init_from: str | None = None,
          fused_optimizer: bool = False) -> dict:
    torch.manual_seed(0)
    kw = dict(lr=1e-4, lr_schedule="constant", fused_optimizer=fused_optimizer)
    module = SFT(init_from=init_from, **kw) if init_from else SFT(arch=cfg, **kw)
    opt = module.configure_optimizers()["optimizer"]  # the trainer's AdamW (its groups, foreach or fused)
    ids = torch.randint(4, cfg.vocab_size, (batch, seq_len + 1))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}

    def step():
        loss, _ = module.loss(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = [seconds(step) for _ in range(steps)]
    t = statistics.median(times)
    tokens = batch * seq_len
    return {"batch": batch, "seq_len": seq_len, "step_s": t, "tokens_per_s": tokens / t,
            "model_flops_per_s": tokens * model_flops_per_token(cfg, seq_len) / t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/train[_smollm2].json")
    ap.add_argument("--init-from", default=None, help="a local HF Llama/Qwen directory (default: a 4.9M model)")
    ap.add_argument("--fused-optimizer", action="store_true", help="model.fused_optimizer: torch's fused AdamW")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    if args.init_from:
        from alignlab.model.hf import load_hf

        cfg, shapes = load_hf(args.init_from).config, ((16, 64), (8, 128), (4, 256))
    else:
        cfg, shapes = TransformerConfig(vocab_size=128, dim=256, n_layers=6, n_heads=8, max_seq_len=512), \
            ((64, 16), (16, 128), (8, 512))
    peaks = [matmul_peak()]  # before and after the runs; the best is the peak (a noisy neighbour during one
    runs = [bench(cfg, b, t, args.steps, args.init_from, args.fused_optimizer) for b, t in shapes]
    peaks.append(matmul_peak())  # reading would lower it and inflate the MFU)
    peak = max(peaks)
    for r in runs:
        r["mfu"] = r["model_flops_per_s"] / peak
    params = sum(p.numel() for p in SFT(arch=cfg).policy.parameters())
    out = {"torch": torch.__version__, "threads": args.threads, "cpu": cpu_model(), "params": params,
           "init_from": args.init_from, "fused_optimizer": args.fused_optimizer, "fp32_matmul_peak_flops": peak,
           "fp32_matmul_peak_flops_before_after": peaks,
           "load_avg_1min_before": round(load_before, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2),
           "runs": runs}
    args.out = args.out or \
        f"benchmarks/results/train{'_smollm2' if args.init_from else ''}{'_fused' if args.fused_optimizer else ''}.json"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s on {args.threads} threads; model {params / 1e6:.2f}M params")
    for r in runs:
        print(f"  batch {r['batch']:3d} x {r['seq_len']:3d} tokens: {r['tokens_per_s']:9.0f} tokens/s, "
              f"{r['model_flops_per_s'] / 1e9:6.1f} GFLOP/s, MFU {100 * r['mfu']:.0f}%")


if __name__ == "__main__":
    main()
