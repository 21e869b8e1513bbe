"""Chat-format tasks and the free-text verifiers: a table of hand-written completions, Countdown's
expression checker on hand cases, every task's splits disjoint, chat rows from the DataModule."""

import random

import pytest

from alignlab.data.tasks import TASKS, Countdown, get_task
from alignlab.rewards.rules import (
    answer_accuracy_reward,
    answer_format_reward,
    answer_number,
    countdown_reward,
    countdown_solves,
    evaluate_expression,
    final_answer,
)

# completion, reference answer, accuracy, format
FREE_TEXT = [
    ("12 + 35 = 47\nThe answer is \\boxed{47}.", "47", 1.0, 1.0),  # right, boxed
    ("12 + 35 = 47\n#### 47", "47", 1.0, 1.0),  # right, ####
    ("#### 47 apples", "47", 1.0, 1.0),  # words after the number
    ("12 + 35 = 50\nThe answer is \\boxed{50}.", "47", 0.0, 1.0),  # wrong, well formatted
    ("12 + 35 = 47", "47", 1.0, 0.0),  # no marker: the last number counts, no format reward
    ("First 12, then 35, so 47 and not 50", "47", 0.0, 0.0),  # several numbers, no marker: the last one
    ("\\boxed{47} is wrong, it is \\boxed{48}", "47", 0.0, 1.0),  # several boxes: the last one
    ("\\boxed{12+35=47}", "47", 1.0, 1.0),  # a box holding the working: its last number
    ("the answer is 47 #### 12", "47", 0.0, 1.0),  # the marker wins over earlier numbers
    ("\\boxed{\\frac{94}{2}}", "47", 0.0, 1.0),  # nested braces parse; the last number is 2
    ("\\boxed{47", "47", 1.0, 0.0),  # an unclosed box is no marker: falls back to the last number
    ("#### \nforty-seven", "47", 0.0, 0.0),  # marker without a number: unparseable
    ("The sum is \\boxed{}.", "47", 0.0, 0.0),  # empty box
    ("To solve this problem, we need to add", "47", 0.0, 0.0),  # no number at all
    ("", "47", 0.0, 0.0),  # empty
    ("#### 1,234", "1234", 1.0, 1.0),  # thousands separator
    ("#### -80284", "-80284", 1.0, 1.0),  # negative
    ("\\boxed{47.0}", "47", 1.0, 1.0),  # the same number
    ("\\boxed{4.7}", "47", 0.0, 1.0),
    ("#### 47", "not a number", 0.0, 1.0),  # an unparseable reference is never matched
]


@pytest.mark.parametrize("completion,answer,accuracy,fmt", FREE_TEXT)
def test_free_text_verifier_table(completion, answer, accuracy, fmt):
    assert answer_accuracy_reward(["p"], [completion], answer=[answer], numbers=[None]) == [accuracy]
    assert answer_format_reward(["p"], [completion], answer=[answer]) == [fmt]


def test_final_answer_and_number():
    assert final_answer("so \\boxed{ 95 }.") == "95"
    assert final_answer("work\n#### 95\nextra line") == "95"
    assert final_answer("no marker 95") is None
    assert answer_number("no marker 95") == 95 and answer_number("none") is None


def test_free_text_verifier_never_raises_on_junk():
    junk = ["\\boxed{" * 50, "}" * 10, "####" * 20, "\x00\uffff", "1" * 5000, "\\boxed{}}}{{", "- - -", "1,2,3,,"]
    assert answer_accuracy_reward(["p"] * len(junk), junk, answer=["1"] * len(junk)) == [0.0] * len(junk)
    answer_format_reward(["p"] * len(junk), junk)  # returns, whatever it says


@pytest.mark.parametrize("text,numbers,target,ok", [
    ("\\boxed{(3*5)+7+4}", [3, 5, 7, 4], 26, True),
    ("3*5+7+4=26", [3, 5, 7, 4], 26, True),  # char-task style: expression = target
    ("26 = 4+7+5*3", [3, 5, 7, 4], 26, True),  # either side, any order of the numbers
    ("#### (10-4)/2*3", [10, 4, 2, 3], 9, True),  # exact division
    ("I think:\n(6/4)*4*2", [6, 4, 4, 2], 12, True),  # no marker: the last line
    ("\\boxed{3*5+7}", [3, 5, 7, 4], 22, False),  # a number unused
    ("\\boxed{3*5+7+4+4}", [3, 5, 7, 4], 30, False),  # a number used twice
    ("\\boxed{3*5+7+4}", [3, 5, 7, 4], 27, False),  # wrong value
    ("\\boxed{35+7-4-12}", [3, 5, 7, 4, 12], 26, False),  # digits glued into another number
    ("\\boxed{7/(4-4)+3}", [7, 4, 4, 3], 3, False),  # division by zero
    ("\\boxed{2**3}", [2, 3], 8, False),  # no powers
    ("\\boxed{-3+5}", [3, 5], 2, False),  # no unary minus
    ("\\boxed{__import__('os').system('true')}", [1], 1, False),  # not arithmetic: never executed
    ("\\boxed{3 \\times 4}", [3, 4], 12, True),  # LaTeX operators
    ("", [1, 2], 3, False),
])
def test_countdown_verifier_hand_cases(text, numbers, target, ok):
    assert countdown_solves(text, numbers, target) is ok
    assert countdown_reward(["p"], [text], answer=[str(target)], numbers=[numbers]) == [float(ok)]


def test_evaluate_expression_is_exact():
    assert evaluate_expression("(1/3)*3") == (1, [1, 3, 3])
    assert evaluate_expression("1/0") is None and evaluate_expression("x+1") is None
    assert evaluate_expression("1" + "+1" * 200) is None  # too long


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_disjoint_splits_and_verifies_its_targets(name):
    task = get_task(name)
    train, val = task.examples(400, "train", seed=0), task.examples(50, "val", seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    assert all(task.split_of(e.prompt) == "train" for e in train)
    rng = random.Random(0)
    for e in val[:20]:
        assert task.verify(e.completion, e.answer, **e.columns)
        assert not task.verify(task.near_miss(e, rng), e.answer, **e.columns)


@pytest.mark.parametrize("name", ["addition", "arithmetic", "word_problems", "countdown"])
@pytest.mark.parametrize("fmt", ["boxed", "hash"])
def test_chat_targets_verify_and_near_misses_do_not(name, fmt):
    task = get_task(name)
    reward = countdown_reward if isinstance(task, Countdown) else answer_accuracy_reward
    rng = random.Random(1)
    for e in task.examples(20, "val", seed=0):
        prompt = task.chat_prompt(e, fmt)
        assert ("\\boxed{}" in prompt) == (fmt == "boxed") and ("####" in prompt) == (fmt == "hash")
        cols = {"answer": [e.answer], **{k: [v] for k, v in e.columns.items()}}
        right, wrong = task.chat_completion(e, fmt), task.chat_near_miss(e, rng, fmt)
        assert reward(["p"], [right], **cols) == [1.0] and answer_format_reward(["p"], [right]) == [1.0]
        assert reward(["p"], [wrong], **cols) == [0.0]


def test_arithmetic_and_word_problem_answers():
    ex = get_task("arithmetic", ops="*", n_operands=3).examples(5, "train", seed=0)
    for e in ex:
        a, b, c = map(int, e.prompt[:-1].split("*"))
        assert int(e.answer) == a * b * c and e.question == f"What is {a} * {b} * {c}?"
    for e in get_task("word_problems").examples(50, "train", seed=0):
        assert int(e.answer) >= 0 and e.solution.endswith(f"= {e.answer}")
        assert evaluate_expression(e.solution.split("=")[0])[0] == int(e.answer)  # the worked step is right


def test_countdown_problems_are_solvable_by_their_expression():
    task = get_task("countdown", n_numbers=3, max_number=10, max_target=50)
    for e in task.examples(50, "train", seed=0):
        value, used = evaluate_expression(e.completion)
        assert value == int(e.answer) and 1 <= value <= 50
        assert sorted(used) == sorted(e.columns["numbers"]) and len(used) == 3


def test_task_arguments_are_validated():
    with pytest.raises(ValueError, match="ops"):
        get_task("arithmetic", ops="+/")
    with pytest.raises(ValueError, match="n_numbers"):
        get_task("countdown", n_numbers=1)
    with pytest.raises(ValueError, match="answer_format"):
        get_task("addition").chat_prompt(get_task("addition").examples(1, "train", 0)[0], "latex")


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_datamodule_chat_rows(tmp_path):
    from alignlab.data.datamodule import AlignDataModule
    from alignlab.data.tokenizer import char_tokenizer

    with pytest.raises(ValueError, match="data.chat: the tokenizer has no chat template"):
        AlignDataModule(chat=True)
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp_path)
    dm = AlignDataModule(kind="sft", task="countdown", tokenizer=str(tmp_path), chat=True, answer_format="hash",
                         num_train=16, num_val=4, batch_size=4, max_prompt_length=200, max_completion_length=40)
    dm.setup("fit")
    row = dm.train_rows[0]
    assert row["prompt"].startswith("<user>Using the numbers ") and row["prompt"].endswith("'#### '.<assistant>")
    completion = tok.decode(row["completion_ids"][:-1])
    assert completion.startswith("#### ") and row["completion_ids"][-1] == tok.eos_token_id
    assert countdown_reward([row["prompt"]], [completion], answer=[row["answer"]], numbers=[row["numbers"]]) == [1.0]
    batch = next(iter(dm.val_dataloader()))
    assert len(batch["numbers"]) == 4 and all(len(n) == 4 for n in batch["numbers"])  # the verifier's column
    pref = AlignDataModule(kind="preference", task="addition", tokenizer=str(tmp_path), chat=True, num_train=8,
                           num_val=2, batch_size=4, max_prompt_length=80, max_completion_length=40)
    pref.setup("fit")
    r = pref.train_rows[0]
    chosen, rejected = tok.decode(r["chosen_ids"][:-1]), tok.decode(r["rejected_ids"][:-1])
    assert "\\boxed{" in chosen and chosen != rejected
    assert answer_accuracy_reward(["p"] * 2, [chosen, rejected], answer=[r["answer"]] * 2) == [1.0, 0.0]
