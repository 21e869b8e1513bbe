import pytest
import torch

from alignlab.rewards.rules import accuracy_reward, extract_answer, format_reward, overlong_penalty


def test_extract_answer():
    assert extract_answer("12+5=17") == "17"
    assert extract_answer("  42 \n") == "42"
    assert extract_answer("a=b= 3 \n") == "3"  # after the LAST "="
    assert extract_answer("x =") == ""
    assert extract_answer("") == ""


def test_accuracy_reward():
    prompts = ["3+4="] * 5
    completions = ["3+4=7", "3+4=8", "7", " = 7 ", "7=3+4"]
    answer = ["7", "7", " 7", "7", "7"]
    out = accuracy_reward(prompts, completions, answer=answer, task=["add"] * 5)  # unknown column accepted
    assert out == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert all(isinstance(v, float) for v in out)


def test_format_reward():
    completions = ["=12", "x=-3", "=1.5", "=abc", "12 13", "=-", "", "= 007 ", "--1"]
    out = format_reward(["p"] * len(completions), completions, answer=["0"] * len(completions))
    assert out == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_overlong_penalty_regions_and_boundaries():
    max_len, cache_len = 20, 4  # soft window (16, 20]
    lengths = torch.tensor([0, 15, 16, 17, 18, 19, 20, 21, 100])
    out = overlong_penalty(lengths, max_len, cache_len)
    assert out.dtype.is_floating_point
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]))
    # the whole range is the window when cache_len == max_len
    out = overlong_penalty(torch.tensor([0, 5, 10]), 10, 10)
    torch.testing.assert_close(out, torch.tensor([0.0, -0.5, -1.0]))


def test_overlong_penalty_validation():
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), 10, 0)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), 10, 11)
