"""Rule rewards for verifiable tasks (GRPO / DAPO), and DAPO's soft overlong punishment.

Two families: the built-in char tasks' exact answer after the last "=" (``accuracy_reward``,
``format_reward``), and free-text answers of chat models (``answer_accuracy_reward``,
``answer_format_reward``, ``countdown_reward``): the final answer is the content of the last ``\\boxed{...}``
or the rest of the line after the last ``####``. A free-text verifier never raises: a completion it cannot
parse is wrong (0.0).

Reward-function contract (as TRL's GRPOTrainer):

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

`columns` holds the dataset's other columns, one list per column aligned with `completions`; it
includes at least `answer: list[str]`. Functions accept unknown columns through **kwargs.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

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


# ------------------------------------------------------------------------------------ free text
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")  # 95, -3, 1,234, 2.5
_BOXED = "\\boxed{"
MAX_NUMBER_CHARS = 100


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces; None if there is none or it is unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> str | None:
    """The marked final answer of a free-text completion: the content of the last ``\\boxed{...}``, else
    the rest of the line after the last ``####``; None when neither marker is there (or the box is open)."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    return None


def _number(text: str) -> Fraction | None:
    """The last number in ``text`` (thousands separators allowed), None if there is none or it is absurdly
    long (> MAX_NUMBER_CHARS: Python refuses to convert such strings)."""
    found = _NUMBER.findall(text)
    if not found or len(found[-1]) > MAX_NUMBER_CHARS:
        return None
    return Fraction(found[-1].replace(",", ""))


def answer_number(text: str) -> Fraction | None:
    """The number a free-text completion gives as its answer: the last number of the marked final answer
    (``\\boxed{12+35=47}`` -> 47, ``#### 47 apples`` -> 47), else, without a marker, the last number in the
    text. None = unparseable (no number where one must be)."""
    marked = final_answer(text)
    return _number(marked if marked is not None else text)


def _reference(answer: str) -> Fraction | None:
    a = answer.strip().replace(",", "")
    return Fraction(a) if len(a) <= MAX_NUMBER_CHARS and _NUMBER.fullmatch(a) else None


def answer_accuracy_reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion's answer (``answer_number``) equals the reference number, else 0.0."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        got, ref = answer_number(c), _reference(a)
        out.append(float(got is not None and ref is not None and got == ref))
    return out


def answer_format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when the completion marks a final answer (``\\boxed{..}`` or ``####``) that holds a number."""
    return [float((m := final_answer(c)) is not None and _number(m) is not None) for c in completions]


# ------------------------------------------------------------------------------------ countdown
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
_SYMBOLS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "÷": "/", "−": "-", "\\left": "",
            "\\right": "", "$": ""}
MAX_EXPRESSION_CHARS = 200


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]] | None:
    """Value and numbers of an arithmetic expression of non-negative integers, ``+ - * /`` and parentheses,
    computed exactly (fractions), by walking its syntax tree: nothing else is accepted and nothing is
    executed. None when it is anything else, too long, or divides by zero."""
    for k, v in _SYMBOLS.items():
        expr = expr.replace(k, v)
    expr = expr.strip()
    if not expr or len(expr) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
    except (SyntaxError, ValueError):
        return None
    numbers: list[int] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        raise ValueError("not an arithmetic expression of integers")

    try:
        return value(tree), numbers
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def countdown_solves(text: str, numbers: list[int], target: int) -> bool:
    """True when the completion's expression uses each of ``numbers`` exactly once and equals ``target``.

    The expression is the marked final answer (``\\boxed{..}`` / ``####``), else the last non-empty line; an
    ``=`` in it splits it into sides and any side may be the expression (``3*5+11 = 26``, ``26 = 3*5+11``)."""
    marked = final_answer(text)
    if marked is None:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        marked = lines[-1] if lines else ""
    for side in marked.split("="):
        result = evaluate_expression(side)
        if result is not None and result[0] == target and sorted(result[1]) == sorted(numbers):
            return True
    return False


def countdown_reward(prompts: list[str], completions: list[str], answer: list[str], numbers: list[list[int]],
                     **kwargs) -> list[float]:
    """Countdown (as TinyZero): 1.0 when the completion's expression reaches the target ``answer`` using
    each of the row's ``numbers`` exactly once with ``+ - * /``, else 0.0."""
    out = []
    for c, a, nums in zip(completions, answer, numbers, strict=True):
        target = _reference(a)
        out.append(float(target is not None and countdown_solves(c, list(nums), target)))
    return out


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
