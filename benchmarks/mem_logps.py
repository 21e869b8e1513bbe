"""Peak memory of scoring completion tokens with a real vocabulary: the full (N, T, V) logits vs chunks.

    python benchmarks/mem_logps.py

One policy-gradient forward + backward of ``completion_logps`` (with entropies) on 32 completions x 64 tokens
after 32-token prompts, through a 2-layer model with SmolLM2-135M's head (vocab 49152, dim 576, 9 / 3 heads,
tied embeddings), 1 thread; each setting of ``logits_chunk_size`` in a fresh process. Prints the peak RSS and
the part of it the step added (Linux ``ru_maxrss``).
"""

from __future__ import annotations

import resource
import subprocess
import sys

import torch


def measure(chunk: int | None) -> str:
    from alignlab.algorithms import GRPO
    from alignlab.model.transformer import TransformerConfig

    torch.set_num_threads(1)
    arch = TransformerConfig(vocab_size=49152, dim=576, n_layers=2, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                             max_seq_len=256)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 (MB)
    N, P, C = 32, 32, 64
    g = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask = torch.randint(4, 100, (N, P), generator=g), torch.ones(N, P, dtype=torch.long)
    ids, mask = torch.randint(4, 100, (N, C), generator=g), torch.ones(N, C, dtype=torch.long)
    module = GRPO(arch=arch, logits_chunk_size=chunk, beta=0.0)
    before = rss()
    logps, _ = module.completion_logps(module.policy, prompt_ids, prompt_mask, ids, mask, with_entropy=True)
    logps.sum().backward()
    return f"logits_chunk_size={chunk}: peak RSS {rss():.0f} MB, of which the step {rss() - before:.0f} MB"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(measure(None if sys.argv[1] == "None" else int(sys.argv[1])))
    else:
        for chunk in ("None", "1024", "256"):
            out = subprocess.run([sys.executable, __file__, chunk], capture_output=True, text=True, check=True)
            print(out.stdout.strip())
