import pytest
from transformers import PreTrainedTokenizerBase

from alignlab.data.tasks import Addition, get_task
from alignlab.data.tokenizer import char_tokenizer, load_tokenizer, render_prompt


def test_char_tokenizer_is_a_hf_tokenizer_and_round_trips(tmp_path):
    tok = char_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerBase)
    ids = tok("12+34=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and tok.decode(ids) == "12+34="
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "12+34="
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    again = load_tokenizer(tmp_path)
    assert again("12+34=", add_special_tokens=False)["input_ids"] == ids
    assert again.padding_side == "left" and again.pad_token_id == tok.pad_token_id


def test_load_tokenizer_missing_dir_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_tokenizer(tmp_path / "nope")


def test_render_prompt_plain_and_conversational():
    tok = char_tokenizer()
    assert render_prompt(tok, "1+1=") == "1+1="
    assert render_prompt(tok, [{"role": "user", "content": "1+1="}]) == "1+1="  # no chat template


def test_addition_examples_are_correct_and_verifiable():
    task = Addition(min_digits=1, max_digits=3, n_operands=3)
    for ex in task.examples(50, "train", seed=0):
        a = ex.prompt[:-1].split("+")
        assert len(a) == 3 and ex.prompt.endswith("=")
        assert int(ex.answer) == sum(map(int, a)) and ex.completion == ex.answer
        assert task.verify(ex.completion, ex.answer)
        assert not task.verify(str(int(ex.answer) + 1), ex.answer)


def test_splits_are_deterministic_and_disjoint():
    task = get_task("addition", max_digits=2)
    train = task.examples(3000, "train", seed=0)
    val = task.examples(100, "val", seed=0)
    assert [e.prompt for e in val] == [e.prompt for e in task.examples(100, "val", seed=0)]
    assert len({e.prompt for e in val}) == 100
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    # another seed draws other problems, but from the same split
    assert not {e.prompt for e in task.examples(3000, "train", seed=1)} & {e.prompt for e in val}


def test_near_miss_is_wrong_but_close():
    import random

    task = get_task("addition")
    rng = random.Random(0)
    for ex in task.examples(30, "train", seed=0):
        wrong = task.near_miss(ex, rng)
        assert wrong != ex.answer and len(wrong) == len(ex.answer) and not task.verify(wrong, ex.answer)


def test_scratchpad_works_the_sum_out_column_by_column():
    from alignlab.data.tasks import scratchpad

    assert scratchpad([37, 58]) == "7+8=15,3+5+1=9=95"
    assert scratchpad([97, 58]) == "7+8=15,9+5+1=15=155"
    assert scratchpad([5, 61, 9]) == "5+1+9=15,0+6+0+1=7=75"
    assert scratchpad([97, 58], slip=(0, -1)) == "7+8=14,9+5+1=15=154"  # the mistake is carried through
    assert scratchpad([97, 58], slip=(0, -2)) == "7+8=13,9+5+1=15=153"
    assert scratchpad([97, 58], slip=(1, 1)) == "7+8=15,9+5+1=16=165"


def test_scratchpad_share_and_verification():
    plain = get_task("addition").examples(400, "train", seed=0)
    task = get_task("addition", scratchpad_prob=0.5)
    mixed = task.examples(400, "train", seed=0)
    n_pad = sum(ex.completion != ex.answer for ex in mixed)
    assert 150 < n_pad < 250  # about half
    assert all(task.verify(ex.completion, ex.answer) for ex in mixed)  # both styles verify
    assert all(ex.completion == ex.answer for ex in plain)  # scratchpad_prob 0: the plain task
    with pytest.raises(ValueError, match="scratchpad_prob"):
        get_task("addition", scratchpad_prob=1.5)


def test_scratchpad_near_miss_is_a_consistent_wrong_working():
    import random

    from alignlab.data.tasks import scratchpad

    task = get_task("addition", scratchpad_prob=1.0)
    rng = random.Random(0)
    for ex in task.examples(50, "train", seed=0):
        wrong = task.near_miss(ex, rng)
        assert not task.verify(wrong, ex.answer) and "-" not in wrong
        nums = [int(x) for x in ex.prompt[:-1].split("+")]
        width = max(len(str(n)) for n in nums)
        slips = [scratchpad(nums, slip=(c, d)) for c in range(width) for d in (-2, -1, 1, 2)]
        assert wrong in slips  # exactly one column summed wrong, carried through


def test_unknown_task_and_bad_args():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="min_digits"):
        get_task("addition", min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="fewer than"):
        get_task("addition", max_digits=1).examples(500, "val", seed=0)


@pytest.mark.parametrize("name", ["reverse", "sort"])
def test_digit_string_tasks(name):
    for ex in get_task(name).examples(20, "train", seed=0):
        s = ex.prompt.split(" ")[1][:-1]
        assert ex.answer == (s[::-1] if name == "reverse" else "".join(sorted(s)))
