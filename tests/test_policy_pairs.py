"""Preference pairs from the policy itself (data/policy_pairs.py, ``data.pairs_from``): a correct and an
incorrect sample of the same prompt, as ranked by the verifier; counted, written in TRL's columns, reused."""

import json

import pytest

from alignlab.data.datamodule import AlignDataModule
from alignlab.data.policy_pairs import pair_groups
from alignlab.rewards.rules import accuracy_reward
from conftest import DATA

START = str(DATA / "sft_start")  # the committed SFT start: greedy accuracy ~0.26, samples right and wrong


def test_pair_groups_pairs_right_with_wrong_samples_of_one_prompt():
    prompts = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}, {"prompt": "3+3=", "answer": "6"}]
    texts = ["2", "3", "2", " ",   # prompt 0: two right, one wrong, one empty (no pair)
             "4", "4", "4", "4",   # prompt 1: all right: no pair
             "1", "6", "5", "7"]   # prompt 2: one right, three wrong: one pair
    ok = [1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0]
    rows = pair_groups(prompts, texts, ok, 4)
    assert rows == [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "answer": "2"},
                    {"prompt": "3+3=", "chosen": "6", "rejected": "1", "answer": "6"}]


def pairs_dm(tmp_path, **kw):
    args = dict(kind="preference", task_args={"max_digits": 2}, tokenizer=START, pairs_from=START,
                pairs_dir=str(tmp_path / "pairs"), num_train=256, num_val=20, batch_size=16,
                max_prompt_length=16, max_completion_length=8)
    return AlignDataModule(**{**args, **kw})


def test_pairs_from_the_policy_are_its_own_samples_ranked_by_the_verifier(tmp_path):
    dm = pairs_dm(tmp_path)
    dm.setup("fit")
    stats = dm.pairs_stats["train"]
    files = list((tmp_path / "pairs").glob("train-*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert stats["prompts"] == 256 and stats["pairs"] == len(rows) == len(dm.train_rows) > 16
    assert stats["all_right"] + stats["all_wrong"] < 256  # the rest had a right and a wrong sample
    assert set(rows[0]) >= {"prompt", "chosen", "rejected", "answer"}  # TRL's columns, plus the answer
    answers = [r["answer"] for r in rows]
    assert accuracy_reward(None, [r["chosen"] for r in rows], answers) == [1.0] * len(rows)
    assert accuracy_reward(None, [r["rejected"] for r in rows], answers) == [0.0] * len(rows)
    templated = {(row["prompt"], row["rejected"]) for _, row in pairs_dm(tmp_path, pairs_from=None)._task_rows(
        "train", "preference")}
    own = [(r["prompt"], r["rejected"]) not in templated for r in rows]
    assert sum(own) > len(rows) / 2  # the policy's own mistakes, not the template's one-digit near misses
    # validation keeps the task's rows: every held-out prompt once
    assert len(dm.val_rows) == 20 and len({r["prompt"] for r in dm.val_rows}) == 20

    # the same command reads the file back; a changed setting samples anew next to it
    stamp = files[0].stat().st_mtime_ns
    again = pairs_dm(tmp_path)
    again.setup("fit")
    assert again.pairs_stats == {} and files[0].stat().st_mtime_ns == stamp
    assert [r["chosen_ids"] for r in again.train_rows] == [r["chosen_ids"] for r in dm.train_rows]
    pairs_dm(tmp_path, pairs_samples=2).setup("fit")
    assert len(list((tmp_path / "pairs").glob("train-*.jsonl"))) == 2


def test_pairs_val_pairs_the_held_out_prompts_own_samples_too(tmp_path):
    """The reward model's validation (``data.pairs_val``): own-sample pairs of the held-out prompts, written
    beside the training pairs, and none of a training prompt."""
    dm = pairs_dm(tmp_path, num_val=64, pairs_val=True)
    dm.setup("fit")
    assert set(dm.pairs_stats) == {"train", "val"}
    val = [json.loads(line) for f in (tmp_path / "pairs").glob("val-*.jsonl") for line in f.read_text().splitlines()]
    assert dm.pairs_stats["val"]["prompts"] == 64 and len(val) == len(dm.val_rows) == dm.pairs_stats["val"]["pairs"] > 0
    answers = [r["answer"] for r in val]
    assert accuracy_reward(None, [r["chosen"] for r in val], answers) == [1.0] * len(val)
    assert accuracy_reward(None, [r["rejected"] for r in val], answers) == [0.0] * len(val)
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in dm.train_rows}  # held out
    assert len({r["prompt"] for r in val}) < 64  # all-right / all-wrong held-out prompts give no pair


@pytest.mark.parametrize("kw, message", [
    (dict(kind="sft"), "data.pairs_from: samples preference pairs for a built-in task: needs data.kind=preference"),
    (dict(pairs_samples=1), "data.pairs_samples must be >= 2"),
])
def test_bad_pairs_settings_are_one_line(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        pairs_dm(tmp_path, **kw)


def test_a_missing_pairs_policy_or_reward_is_one_line_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.pairs_from: .*nope: no HF model directory"):
        pairs_dm(tmp_path, pairs_from=str(tmp_path / "nope")).setup("fit")
    with pytest.raises(ValueError, match=r"data.pairs_reward: cannot import 'alignlab.rewards.rules.nope'"):
        pairs_dm(tmp_path, pairs_reward="alignlab.rewards.rules.nope").setup("fit")
    assert not (tmp_path / "pairs").exists()  # nothing written
