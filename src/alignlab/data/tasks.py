"""Built-in verifiable tasks, generated offline from a seed.

Each example is a prompt, the reference answer, and the SFT target completion; ``verify`` checks a
model's completion against the answer (the same check the accuracy reward uses). Train and validation
splits are deterministic and disjoint: every distinct prompt belongs to exactly one split, chosen by a
hash of its text, so no validation problem is ever seen in training whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from alignlab.rewards.rules import extract_answer


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    completion: str  # the SFT target (without EOS)


class Task:
    """Base class: subclasses implement ``sample`` (one random problem) and may override ``near_miss``."""

    name = "task"
    val_fraction = 0.1

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def verify(self, completion: str, answer: str) -> bool:
        return extract_answer(completion) == answer.strip()

    def near_miss(self, example: Example, rng: random.Random) -> str:
        """A plausible wrong completion (for preference pairs): one digit of the answer changed."""
        ans = example.answer
        i = rng.randrange(len(ans))
        digits = [d for d in "0123456789" if d != ans[i] and not (i == 0 and d == "0" and len(ans) > 1)]
        wrong = ans[:i] + rng.choice(digits) + ans[i + 1 :]
        return example.completion[: len(example.completion) - len(ans)] + wrong

    def split_of(self, prompt: str) -> str:
        h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        return "val" if (h % 1000) < self.val_fraction * 1000 else "train"

    def examples(self, n: int, split: str, seed: int) -> list[Example]:
        """``n`` examples of ``split`` ('train' may repeat problems; 'val' is unique where possible)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        rng = random.Random(f"{self.name}-{split}-{seed}")
        out, seen = [], set()
        for _ in range(200 * n + 1000):
            if len(out) == n:
                break
            ex = self.sample(rng)
            if self.split_of(ex.prompt) != split or (split == "val" and ex.prompt in seen):
                continue
            seen.add(ex.prompt)
            out.append(ex)
        if len(out) < n:
            raise ValueError(f"task {self.name!r} has fewer than {n} distinct {split} problems; lower num_{split}")
        return out


def scratchpad(nums: list[int], slip: tuple[int, int] | None = None) -> str:
    """Column addition written out, ones digit first: 97+58 -> ``7+8=15,9+5+1=15=155``.

    ``slip=(column, delta)`` makes the sum of that column off by ``delta`` and carries the mistake through
    consistently (later carries and the answer follow the wrong total): the kind of wrong completion a
    policy that has learned the scratchpad actually writes.
    """
    width = max(len(str(n)) for n in nums)
    cols = [[int(str(n).zfill(width)[-1 - i]) for n in nums] for i in range(width)]
    steps, digits, carry = [], [], 0
    for i, col in enumerate(cols):
        total = sum(col) + carry + (slip[1] if slip and slip[0] == i else 0)
        steps.append("+".join(map(str, col + ([carry] if carry else []))) + f"={total}")
        digits.append(total % 10)
        carry = total // 10
    answer = int(str(carry) + "".join(map(str, reversed(digits))))
    return ",".join(steps) + f"={answer}"


class Addition(Task):
    """``a+b=`` -> ``c``: multi-digit addition with ``min_digits..max_digits`` digits per operand.

    With ``scratchpad_prob > 0`` that share of the SFT completions works the sum out column by column
    before the answer (``37+58=`` -> ``7+8=15,3+5+1=9=95``); the rest give the answer directly. The answer is
    the text after the last ``=``, so both styles verify the same way. The SFT policy then knows two
    strategies of different reliability and lengths: what RL (and DAPO's length techniques) act on.
    """

    name = "addition"

    def __init__(self, min_digits: int = 1, max_digits: int = 2, n_operands: int = 2, scratchpad_prob: float = 0.0):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if n_operands < 2:
            raise ValueError(f"n_operands must be >= 2, got {n_operands}")
        if not 0.0 <= scratchpad_prob <= 1.0:
            raise ValueError(f"scratchpad_prob must be in [0, 1], got {scratchpad_prob}")
        self.min_digits, self.max_digits, self.n_operands = min_digits, max_digits, n_operands
        self.scratchpad_prob = scratchpad_prob

    def sample(self, rng: random.Random) -> Example:
        nums = []
        for _ in range(self.n_operands):
            d = rng.randint(self.min_digits, self.max_digits)
            nums.append(rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1))
        answer = str(sum(nums))
        # draw only when scratchpads are on, so the plain task's examples stay the same for a given seed
        use_pad = self.scratchpad_prob > 0 and rng.random() < self.scratchpad_prob
        completion = scratchpad(nums) if use_pad else answer
        return Example(prompt="+".join(map(str, nums)) + "=", answer=answer, completion=completion)

    def near_miss(self, example: Example, rng: random.Random) -> str:
        """A direct answer: one digit changed. A scratchpad: one column summed wrong, carried through."""
        if example.completion == example.answer:
            return super().near_miss(example, rng)
        nums = [int(x) for x in example.prompt.rstrip("=").split("+")]
        width = max(len(str(n)) for n in nums)
        while True:
            column, delta = rng.randrange(width), rng.choice([-2, -1, 1, 2])
            wrong = scratchpad(nums, slip=(column, delta))
            if "-" not in wrong and wrong.rsplit("=", 1)[1] != example.answer:
                return wrong


class Reverse(Task):
    """``reverse 4821=`` -> ``1284``: reverse a digit string of ``min_len..max_len`` digits."""

    name = "reverse"

    def __init__(self, min_len: int = 3, max_len: int = 8):
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        self.min_len, self.max_len = min_len, max_len

    def digits(self, rng: random.Random) -> str:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(self.min_len, self.max_len)))

    def sample(self, rng: random.Random) -> Example:
        s = self.digits(rng)
        return Example(prompt=f"reverse {s}=", answer=s[::-1], completion=s[::-1])


class Sort(Reverse):
    """``sort 4821=`` -> ``1248``: sort the digits ascending."""

    name = "sort"

    def sample(self, rng: random.Random) -> Example:
        s = self.digits(rng)
        ans = "".join(sorted(s))
        return Example(prompt=f"sort {s}=", answer=ans, completion=ans)


TASKS: dict[str, type[Task]] = {"addition": Addition, "reverse": Reverse, "sort": Sort}


def get_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)
