"""configs/recipes/smollm2/*.yaml: each parses and instantiates on the real checkpoint (chat data, the
free-text verifier, EOS <|im_end|>, its own log name); the train pipeline layers it without prerequisites;
a missing model directory and a --data.tokenizer next to init_from are one line each."""

from pathlib import Path

import pytest
import yaml

from alignlab import train
from alignlab.cli import cli, main
from alignlab.rewards.rules import answer_accuracy_reward

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = sorted((CONFIGS / "recipes" / "smollm2").glob("*.yaml"))


def recipe_args(path: Path, *extra):
    return ["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "algo" / path.name),
            "--config", str(path), *extra]


def test_there_are_recipes_for_the_main_algorithms():
    assert {p.stem for p in RECIPES} >= {"sft", "dpo", "grpo", "dapo"}


@pytest.mark.real_model
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_instantiates_on_the_real_model(path, smollm2_dir, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / smollm2_dir.name).symlink_to(smollm2_dir)
    monkeypatch.chdir(tmp_path)
    algo = path.stem
    if algo == "ppo":  # its reward model is the RM recipe's export: an untrained one stands in
        rm = main(recipe_args(CONFIGS / "recipes" / "smollm2" / "rm.yaml")[1:], run=False).model
        rm.export(tmp_path / "logs" / "smollm2" / "rm" / "latest_hf")
    c = main(recipe_args(path)[1:], run=False)
    m, dm = c.model, c.datamodule
    assert type(m).__name__.lower() == {"rm": "rewardmodel"}.get(algo, algo) and m.hparams.init_from == "models/smollm2-135m-instruct"
    assert (m.policy if algo != "rm" else m.model.trunk).config.n_layers == 30 and m.eos_id == m.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert algo == "rm" or m.val_reward_fn is answer_accuracy_reward
    assert dm.hparams.chat and dm.tokenizer.eos_token == "<|im_end|>"
    assert c.trainer.logger.name == f"smollm2/{algo}"  # logs/smollm2/<algo>/version_N, never logs/<algo>
    if algo in ("grpo", "dapo"):
        assert m.reward_paths[0] == "alignlab.rewards.rules.answer_accuracy_reward"
    dm.setup("fit")
    row = dm.val_rows[0]
    assert row["prompt"].startswith("<|im_start|>system\n") and row["prompt"].endswith("<|im_start|>assistant\n")
    assert "#### " in row["prompt"] and (algo != "sft" or row.get("completion_ids", [0])[-1] == m.eos_id)


def test_train_pipeline_layers_the_recipe_without_prerequisites(monkeypatch):
    monkeypatch.chdir(ROOT)
    calls = []
    monkeypatch.setattr(train.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(train, "exported", lambda stage: False)  # would run SFT first without the recipe
    train.main(["grpo", "--recipe", "smollm2", "--trainer.max_steps", "2"])
    assert len(calls) == 1  # no SFT stage: the recipe's init_from is the instruct model
    configs = [calls[0][i + 1] for i, a in enumerate(calls[0]) if a == "--config"]
    assert configs == ["configs/base.yaml", "configs/algo/grpo.yaml", "configs/recipes/smollm2/grpo.yaml"]
    assert calls[0][-2:] == ["--trainer.max_steps", "2"]
    with pytest.raises(SystemExit, match="RECIPE='nope' has no config configs/recipes/nope/grpo.yaml"):
        train.main(["grpo", "--recipe", "nope"])


def test_a_recipe_stage_runs_its_recipe_prerequisites_first(monkeypatch):
    """PPO's recipe names logs/smollm2/rm/latest_hf: the stage smollm2/rm, run with the RM recipe first."""
    monkeypatch.chdir(ROOT)
    calls = []
    monkeypatch.setattr(train.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(train, "check", lambda *a, **k: None)  # checked in test_reliability; needs exports
    monkeypatch.setattr(train, "exported", lambda stage: False)
    assert train.missing_stages("ppo", recipe="smollm2") == ["smollm2/rm"]  # not sft, not the default rm
    assert train.missing_stages("ppo", ["--model.init_args.reward_model=/my/rm"], recipe="smollm2") == []
    train.main(["ppo", "--recipe", "smollm2", "--trainer.max_steps", "2"])
    configs = [[c[i + 1] for i, a in enumerate(c) if a == "--config"] for c in calls]
    assert configs == [["configs/base.yaml", "configs/algo/rm.yaml", "configs/recipes/smollm2/rm.yaml"],
                       ["configs/base.yaml", "configs/algo/ppo.yaml", "configs/recipes/smollm2/ppo.yaml"]]
    assert calls[0][-1].endswith("rm.yaml") and calls[1][-2:] == ["--trainer.max_steps", "2"]
    monkeypatch.setattr(train, "exported", lambda stage: stage == "smollm2/rm")
    assert train.missing_stages("ppo", recipe="smollm2") == []


def test_recipe_values_are_what_2_cores_can_run():
    for path in RECIPES:
        cfg = yaml.safe_load(path.read_text())
        args, data = cfg["model"]["init_args"], cfg["data"]
        assert data["chat"] and data["batch_size"] <= 8 and args.get("max_new_tokens", 64) <= 96
        assert args.get("num_generations", 4) <= 8


def test_missing_model_directory_is_one_line_saying_make_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli(recipe_args(CONFIGS / "recipes" / "smollm2" / "grpo.yaml"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "models/smollm2-135m-instruct" in err and "make model" in err
    assert not (tmp_path / "logs").exists()


def test_data_tokenizer_next_to_init_from_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(recipe_args(CONFIGS / "recipes" / "smollm2" / "sft.yaml", "--data.tokenizer", "x"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "data.tokenizer: the tokenizer comes from model.init_args.init_from" in err
