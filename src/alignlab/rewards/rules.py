"""Rule rewards for verifiable tasks (GRPO / DAPO), and DAPO's soft overlong punishment.

Reward-function contract (as TRL's GRPOTrainer):

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

`columns` holds the dataset's other columns, one list per column aligned with `completions`; it
includes at least `answer: list[str]`. Functions accept unknown columns through **kwargs.
"""

from __future__ import annotations

import re

import torch

_INTEGER = re.compile(r"-?\d+")


def extract_answer(text: str) -> str:
    """The text after the last "=" (the whole text if there is none), stripped of whitespace."""
    return text.rsplit("=", 1)[-1].strip()


def accuracy_reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the extracted answer equals the reference answer exactly, else 0.0."""
    return [float(extract_answer(c) == a.strip()) for c, a in zip(completions, answer, strict=True)]


def format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when the extracted answer is an integer literal (`-?\\d+`, whole string), else 0.0."""
    return [float(_INTEGER.fullmatch(extract_answer(c)) is not None) for c in completions]


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the task reward.

        R(L) = 0                                    if L <= max_len - cache_len
               ((max_len - cache_len) - L) / cache_len   if max_len - cache_len < L <= max_len
               -1                                   if L > max_len

    i.e. 0 up to the start of the cache window, then linear down to -1 at max_len.

    Args:
        lengths: (N,) int completion lengths.
        max_len: L_max, the maximum completion length.
        cache_len: L_cache, the width of the soft-punishment window (0 < cache_len <= max_len).
    Returns:
        (N,) float penalties in [-1, 0].
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len must satisfy 0 < cache_len <= max_len ({max_len}), got {cache_len}")
    soft_start = max_len - cache_len
    penalty = (soft_start - lengths.to(torch.get_default_dtype())) / cache_len
    return penalty.clamp(min=-1.0, max=0.0)
