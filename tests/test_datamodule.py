import json

import pytest
import torch

from alignlab.data.datamodule import AlignDataModule, DataError, pad

from conftest import datamodule


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def dm_for(tmp_path, kind, rows, **kw):
    f = write(tmp_path / "train.jsonl", rows)
    dm = AlignDataModule(kind=kind, train_file=f, val_file=f, batch_size=kw.pop("batch_size", 1),
                         max_prompt_length=kw.pop("max_prompt_length", 16),
                         max_completion_length=kw.pop("max_completion_length", 8), **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(
    "kind, row, message",
    [
        ("sft", "{not json", "invalid JSON"),
        ("sft", [1, 2], "must be a JSON object"),
        ("sft", {"prompt": "1+1="}, "missing field 'completion'"),
        ("sft", {"prompt": "", "completion": "2"}, "field 'prompt' is empty"),
        ("sft", {"prompt": "1+1=", "completion": 2}, "field 'completion' must be a string or a list of messages"),
        ("sft", {"prompt": [{"role": "user"}], "completion": "2"}, "message 0 must be an object"),
        ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant turn"),
        ("prompt", {"prompt": "1+1=", "answer": 2}, "field 'answer' must be a string"),
        ("preference", {"prompt": "1+1=", "chosen": "2"}, "missing field 'rejected'"),
        ("preference", {"prompt": "a", "chosen": "2", "rejected": "3", "margin": "big"}, "field 'margin' must be a number"),
        ("sft", {"prompt": "1" * 40, "completion": "2"}, "field 'prompt' has 40 tokens > data.max_prompt_length=16"),
        ("sft", {"prompt": "1+1=", "completion": "2" * 20}, "field 'completion' has 20 tokens"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, kind, row, message):
    good = {"sft": {"prompt": "1+1=", "completion": "2"}, "prompt": {"prompt": "1+1=", "answer": "2"},
            "preference": {"prompt": "1+1=", "chosen": "2", "rejected": "3"}}[kind]
    with pytest.raises(DataError) as err:
        dm_for(tmp_path, kind, [good, row])
    text = str(err.value)
    assert f"{tmp_path / 'train.jsonl'}:2:" in text and message in text
    assert "\n" not in text


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        AlignDataModule(train_file=str(tmp_path / "x.jsonl"), val_file=str(tmp_path / "x.jsonl")).setup("fit")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        AlignDataModule(train_file=str(tmp_path / "empty.jsonl"), val_file=str(tmp_path / "empty.jsonl")).setup("fit")


def test_fewer_rows_than_batch_size(tmp_path):
    with pytest.raises(DataError, match="1 training rows < data.batch_size=4"):
        dm_for(tmp_path, "sft", [{"prompt": "1+1=", "completion": "2"}], batch_size=4)


def test_truncation_is_counted_not_silent(tmp_path):
    rows = [{"prompt": "1" * 40, "completion": "2"}, {"prompt": "1+1=", "completion": "2" * 20}, {"prompt": "a", "completion": "b"}]
    with pytest.warns(UserWarning, match="truncated 2 over-long rows"):
        dm = dm_for(tmp_path, "sft", rows, truncation=True)
    assert dm.truncated[f"{tmp_path / 'train.jsonl'} (train)"] == 2
    assert max(len(r["prompt_ids"]) for r in dm.train_rows) == 16
    assert max(len(r["completion_ids"]) for r in dm.train_rows) == 8


def test_sft_batch_masks_only_the_completion():
    dm = datamodule("sft", batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    for i in range(4):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        comp = batch["input_ids"][i][batch["loss_mask"][i].bool()].tolist()
        assert tok.decode(ids, skip_special_tokens=True) == batch["prompt"][i] + batch["answer"][i]
        assert comp[-1] == tok.eos_token_id and tok.decode(comp[:-1]) == batch["answer"][i]
    assert batch["prompt_mask"][:, -1].all()  # prompts are left-padded


def test_conversational_and_preference_jsonl(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}]
    dm = dm_for(tmp_path, "sft", rows)
    assert dm.train_rows[0]["prompt"] == "1+2=" and dm.train_rows[0]["answer"] == "3"
    pref = [{"prompt": "1+2=", "chosen": "3", "rejected": "45", "margin": 1.5}]
    dm = dm_for(tmp_path, "preference", pref)
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape  # one length for both
    assert batch["chosen_loss_mask"].sum().item() == 2 and batch["rejected_loss_mask"].sum().item() == 3
    assert batch["margin"].tolist() == [1.5]


def test_prompt_rows_keep_extra_columns(tmp_path):
    dm = dm_for(tmp_path, "prompt", [{"prompt": "1+2=", "answer": "3", "source": "x"}])
    batch = next(iter(dm.train_dataloader()))
    assert batch["answer"] == ["3"] and batch["source"] == ["x"]
    assert "input_ids" not in batch


def test_builtin_preference_pairs_are_correct_vs_near_miss():
    dm = datamodule("preference", batch_size=8)
    dm.setup("fit")
    for r in dm.train_rows[:50]:
        assert r["chosen_ids"] != r["rejected_ids"]
        assert dm.tokenizer.decode(r["chosen_ids"], skip_special_tokens=True) == r["answer"]


def test_pad_left_and_right():
    ids, mask = pad([[1, 2], [3]], 0, "left")
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = pad([[1, 2], [3]], 0, "right")
    assert ids.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_bad_config_values_name_the_argument():
    with pytest.raises(ValueError, match="data.kind"):
        AlignDataModule(kind="rl")
    with pytest.raises(ValueError, match="data.batch_size"):
        AlignDataModule(batch_size=0)
    assert torch.is_tensor(pad([[1]], 0, "left")[0])
