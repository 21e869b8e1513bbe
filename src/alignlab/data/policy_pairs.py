"""Preference pairs from the policy itself (InstructGPT's recipe, with the task's verifier as the labeller).

For each prompt, sample ``G`` completions from the policy, score them with the verifier, and pair a correct
one (chosen) with an incorrect one (rejected) of the same prompt: ``min(#right, #wrong)`` pairs per prompt,
in sampling order. A prompt whose samples are all right or all wrong gives no pair (counted), nor does an
empty wrong sample. The rows carry TRL's preference columns (``prompt``, ``chosen``, ``rejected``) plus the
prompt row's own (``answer``, ...), so they can be written to JSONL, inspected and read back as
``data.train_file``.

    AlignDataModule(kind="preference", pairs_from="logs/sft/latest_hf", pairs_samples=4, ...)

samples the task's training (and validation) prompts once and keeps the pairs in ``data.pairs_dir``
(``<split>-<digest>.jsonl``, the digest covering the policy's weights and every setting that changes the
rows): the same command reuses them, and a changed policy or setting samples anew.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignlab.model.generate import generate


def pair_groups(prompt_rows: list[dict], completions: list[str], correct: list[float], G: int) -> list[dict]:
    """Rows (prompt, chosen, rejected, + the prompt row's columns) from G scored completions per prompt."""
    rows = []
    for j, row in enumerate(prompt_rows):
        group, ok = completions[j * G : (j + 1) * G], correct[j * G : (j + 1) * G]
        good = [c for c, a in zip(group, ok) if a]
        bad = [c for c, a in zip(group, ok) if not a and c.strip()]  # an empty sample is no pair
        extra = {k: v for k, v in row.items() if k not in ("prompt", "completion", "chosen", "rejected")}
        rows += [{"prompt": row["prompt"], "chosen": c, "rejected": r, **extra} for c, r in zip(good, bad)]
    return rows


@torch.no_grad()
def sample_pairs(model, tokenizer, prompt_rows: list[dict], prompt_ids: list[list[int]], G: int,
                 max_new_tokens: int, reward_fn: Callable, seed: int = 0, batch_size: int = 64,
                 temperature: float = 1.0) -> tuple[list[dict], dict[str, int]]:
    """Pairs of the model's own samples for ``prompt_rows`` (their tokenized prompts: ``prompt_ids``), and
    the counts: prompts, pairs, prompts whose samples were all right / all wrong."""
    from alignlab.data.datamodule import pad  # the module that owns collating; imported here (no cycle)
    from alignlab.data.tokenizer import render_prompt

    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    rows, stats = [], {"prompts": len(prompt_rows), "pairs": 0, "all_right": 0, "all_wrong": 0}
    for i in range(0, len(prompt_rows), batch_size):
        chunk, ids = prompt_rows[i : i + batch_size], prompt_ids[i : i + batch_size]
        p_ids, p_mask = pad(ids, tokenizer.pad_token_id, "left")
        out = generate(model, p_ids.repeat_interleave(G, 0), p_mask.repeat_interleave(G, 0), max_new_tokens,
                       tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=temperature, generator=g)
        texts = tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(out.completion_ids, out.completion_mask)],
                                       skip_special_tokens=True)
        prompts = [render_prompt(tokenizer, r["prompt"]) for r in chunk for _ in range(G)]
        columns = {k: [r[k] for r in chunk for _ in range(G)] for k in chunk[0] if k not in ("prompt", "completion")}
        correct = [float(c) for c in reward_fn(prompts, texts, **columns)]
        for j in range(len(chunk)):
            n_right = sum(1 for c in correct[j * G : (j + 1) * G] if c)
            stats["all_right"] += n_right == G
            stats["all_wrong"] += n_right == 0
        rows += pair_groups(chunk, texts, correct, G)
    model.train(was_training)
    stats["pairs"] = len(rows)
    return rows, stats
