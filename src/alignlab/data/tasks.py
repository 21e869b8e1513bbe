"""Built-in verifiable tasks, generated offline from a seed.

Each example is a prompt, the reference answer, and the SFT target completion; ``verify`` checks a
model's completion against the answer (the same check the accuracy reward uses). Train and validation
splits are deterministic and disjoint: every distinct prompt belongs to exactly one split, chosen by a
hash of its text, so no validation problem is ever seen in training whatever the seeds.

Every task also renders as a conversation for instruct models (``chat_prompt`` / ``chat_completion``, used
by the DataModule with ``data.chat: true``): the problem in words plus an instruction on the answer format
(``\\boxed{95}`` or a final ``#### 95``), checked by the free-text verifiers of ``alignlab.rewards.rules``.

Tasks: ``addition`` and ``arithmetic`` (multi-digit, multi-operand, + - *), ``word_problems`` (templated
GSM8K-style problems of one to three steps), ``countdown`` (reach a target with given numbers, as TinyZero),
``reverse`` and ``sort``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from alignlab.rewards.rules import countdown_solves, evaluate_expression, extract_answer

ANSWER_FORMATS = ("boxed", "hash")


@dataclass(frozen=True)
class Example:
    prompt: str  # the built-in (char) prompt, e.g. "37+58="; also what the train/val split hashes
    answer: str
    completion: str  # the SFT target (without EOS)
    question: str = ""  # the problem in words for chat prompts ("What is 37 + 58?"); "" = the prompt
    solution: str = ""  # worked solution in words for chat SFT targets, ending with the answer
    columns: dict[str, Any] = field(default_factory=dict)  # extra row columns for the verifier (countdown)


class Task:
    """Base class: subclasses implement ``sample`` (one random problem) and may override ``near_miss``."""

    name = "task"
    val_fraction = 0.1
    answer_noun = "answer"  # what the chat instruction asks to box

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def verify(self, completion: str, answer: str, **columns) -> bool:
        return extract_answer(completion) == answer.strip()

    def wrong_final(self, example: Example, rng: random.Random) -> str:
        """A plausible wrong final answer: one digit of the answer changed (never a leading 0)."""
        ans = example.answer
        i = rng.choice([j for j, ch in enumerate(ans) if ch.isdigit()])
        lead = i == 0 or ans[:i] == "-"
        digits = [d for d in "0123456789" if d != ans[i] and not (lead and d == "0" and len(ans) - i > 1)]
        return ans[:i] + rng.choice(digits) + ans[i + 1 :]

    def near_miss(self, example: Example, rng: random.Random) -> str:
        """A plausible wrong completion (for preference pairs): one digit of the answer changed."""
        ans = example.answer
        return example.completion[: len(example.completion) - len(ans)] + self.wrong_final(example, rng)

    # -- chat format
    def final(self, example: Example) -> str:
        """What goes into the box of a chat answer: the answer (Countdown: the expression)."""
        return example.answer

    def chat_prompt(self, example: Example, answer_format: str = "boxed") -> str:
        """The user turn: the problem in words and the answer-format instruction."""
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"data.answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        noun = self.answer_noun
        instruction = (f"Put the final {noun} in \\boxed{{}}." if answer_format == "boxed"
                       else f"Write the final {noun} on the last line after '#### '.")
        return f"{example.question or example.prompt}\n{instruction}"

    def chat_completion(self, example: Example, answer_format: str = "boxed", final: str | None = None) -> str:
        """The assistant turn of an SFT target: the worked solution, then the marked final answer. With
        ``final`` (a wrong one, for preference pairs) the solution's trailing answer is replaced by it too."""
        right = self.final(example)
        final = right if final is None else final
        solution = example.solution
        if solution.endswith(right):
            solution = solution[: len(solution) - len(right)] + final
        marked = f"The answer is \\boxed{{{final}}}." if answer_format == "boxed" else f"#### {final}"
        return f"{solution}\n{marked}" if solution else marked

    def chat_near_miss(self, example: Example, rng: random.Random, answer_format: str = "boxed") -> str:
        return self.chat_completion(example, answer_format, final=self.wrong_final(example, rng))

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
        expr = " + ".join(map(str, nums))
        return Example(prompt="+".join(map(str, nums)) + "=", answer=answer, completion=completion,
                       question=f"What is {expr}?", solution=f"{expr} = {answer}")

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


class Arithmetic(Task):
    """``37*4+12-58=`` -> ``102``: ``n_operands`` numbers of ``min_digits..max_digits`` digits joined by
    operators drawn from ``ops`` (``+ - *``, usual precedence); answers may be negative."""

    name = "arithmetic"

    def __init__(self, min_digits: int = 1, max_digits: int = 2, n_operands: int = 3, ops: str = "+-*"):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if n_operands < 2:
            raise ValueError(f"n_operands must be >= 2, got {n_operands}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty string of + - *, got {ops!r}")
        self.min_digits, self.max_digits, self.n_operands, self.ops = min_digits, max_digits, n_operands, ops

    def sample(self, rng: random.Random) -> Example:
        nums = []
        for _ in range(self.n_operands):
            d = rng.randint(self.min_digits, self.max_digits)
            nums.append(rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1))
        ops = [rng.choice(self.ops) for _ in range(self.n_operands - 1)]
        expr = str(nums[0]) + "".join(f"{o}{n}" for o, n in zip(ops, nums[1:]))
        answer = str(int(evaluate_expression(expr)[0]))
        spaced = str(nums[0]) + "".join(f" {o} {n}" for o, n in zip(ops, nums[1:]))
        return Example(prompt=expr + "=", answer=answer, completion=answer, question=f"What is {spaced}?",
                       solution=f"{spaced} = {answer}")


NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam", "Mia",
         "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells", "cards", "eggs")


class WordProblems(Task):
    """GSM8K-style word problems from templates: one to three steps of + - * / on small numbers, with
    names and items drawn at random; the answer is a non-negative integer (``max_value`` bounds the
    operands: larger = harder)."""

    name = "word_problems"

    def __init__(self, max_value: int = 50):
        if max_value < 5:
            raise ValueError(f"max_value must be >= 5, got {max_value}")
        self.max_value = max_value

    def sample(self, rng: random.Random) -> Example:
        n, name, item = self.max_value, rng.choice(NAMES), rng.choice(ITEMS)
        kind = rng.randrange(5)
        if kind == 0:
            a, b = rng.randint(2, n), rng.randint(2, n)
            c = rng.randint(1, a + b - 1)
            q = (f"{name} has {a} {item}. {name} gets {b} more and then gives {c} away. "
                 f"How many {item} does {name} have now?")
            ans, sol = a + b - c, f"{a} + {b} - {c} = {a + b - c}"
        elif kind == 1:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q = f"{name} buys {a} boxes of {item} with {b} {item} in each box. How many {item} is that?"
            ans, sol = a * b, f"{a} * {b} = {a * b}"
        elif kind == 2:
            price, count = rng.randint(2, 12), rng.randint(2, 9)
            paid = price * count + rng.randint(1, n)
            q = (f"{item.capitalize()} cost {price} dollars each. {name} buys {count} of them and pays with "
                 f"{paid} dollars. How many dollars of change does {name} get?")
            ans, sol = paid - price * count, f"{paid} - {price} * {count} = {paid - price * count}"
        elif kind == 3:
            a, days, extra = rng.randint(2, 20), rng.randint(2, 9), rng.randint(1, n)
            q = (f"{name} reads {a} pages a day for {days} days, then {extra} more pages. "
                 f"How many pages does {name} read in total?")
            ans, sol = a * days + extra, f"{a} * {days} + {extra} = {a * days + extra}"
        else:
            friends, each = rng.randint(2, 9), rng.randint(2, 12)
            total = friends * each
            q = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
            ans, sol = each, f"{total} / {friends} = {each}"
        return Example(prompt=q + "\n", answer=str(ans), completion=str(ans), question=q, solution=sol)


class Countdown(Task):
    """Countdown, as TinyZero: reach the target with each of ``n_numbers`` numbers (1..``max_number``)
    exactly once and ``+ - * /`` (``3,5,7,4->26=`` -> ``3*5+7+4``). The target is the value of a random
    expression of the numbers (a positive integer <= ``max_target``), so every problem has a solution; any
    correct expression verifies (``rewards.rules.countdown_reward``), not only the generated one."""

    name = "countdown"
    answer_noun = "expression"

    def __init__(self, n_numbers: int = 4, max_number: int = 20, max_target: int = 100):
        if not 2 <= n_numbers <= 6:
            raise ValueError(f"n_numbers must be in 2..6, got {n_numbers}")
        if max_number < 2 or max_target < 1:
            raise ValueError(f"need max_number >= 2 and max_target >= 1, got {max_number}, {max_target}")
        self.n_numbers, self.max_number, self.max_target = n_numbers, max_number, max_target

    def random_expression(self, nums: list[int], rng: random.Random) -> str:
        """Combine the numbers pairwise in random order with random operators, fully parenthesised."""
        parts = [str(x) for x in nums]
        rng.shuffle(parts)
        while len(parts) > 1:
            a, b = parts.pop(rng.randrange(len(parts))), parts.pop(rng.randrange(len(parts)))
            parts.append(f"({a}{rng.choice('+-*/')}{b})")
        return parts[0][1:-1]

    def sample(self, rng: random.Random) -> Example:
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            expr = self.random_expression(nums, rng)
            result = evaluate_expression(expr)
            if result is None:
                continue
            value = result[0]
            if value.denominator == 1 and 1 <= value <= self.max_target:
                break
        target = int(value)
        listed = ", ".join(map(str, nums))
        q = (f"Using the numbers {listed}, each exactly once, and + - * / (with parentheses), "
             f"write an expression that equals {target}.")
        return Example(prompt=f"{','.join(map(str, nums))}->{target}=", answer=str(target), completion=expr,
                       question=q, solution="", columns={"numbers": nums})

    def verify(self, completion: str, answer: str, numbers: list[int] | None = None, **columns) -> bool:
        return numbers is not None and countdown_solves(completion, list(numbers), int(answer))

    def final(self, example: Example) -> str:
        return example.completion

    def wrong_final(self, example: Example, rng: random.Random) -> str:
        """The expression with one operator changed so that it misses the target (or a number dropped)."""
        expr, nums, target = example.completion, example.columns["numbers"], int(example.answer)
        positions = [i for i, ch in enumerate(expr) if ch in "+-*/"]
        rng.shuffle(positions)
        for i in positions:
            for op in rng.sample("+-*/", 4):
                wrong = expr[:i] + op + expr[i + 1 :]
                if op != expr[i] and not countdown_solves(wrong, nums, target):
                    return wrong
        return expr.rsplit(expr[positions[0]], 1)[0] if positions else "0"

    def near_miss(self, example: Example, rng: random.Random) -> str:
        return self.wrong_final(example, rng)


TASKS: dict[str, type[Task]] = {"addition": Addition, "arithmetic": Arithmetic, "word_problems": WordProblems,
                                "countdown": Countdown, "reverse": Reverse, "sort": Sort}


def get_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)
