"""Every YAML under configs/ parses; the CLI instantiates and runs; the train pipeline finds stages."""

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

from alignlab import train
from alignlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALGOS = sorted(p.stem for p in (CONFIGS / "algo").glob("*.yaml"))


def cli_args(algo, *extra):
    return ["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "algo" / f"{algo}.yaml"), *extra]


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_is_valid_yaml(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize("algo", ALGOS)
def test_algo_config_parses_with_base(algo, capsys):
    with pytest.raises(SystemExit) as e:
        main(cli_args(algo, "--print_config"))
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["logger"]["init_args"]["name"] == algo  # logs/<algo>/version_N


PRESETS = sorted((CONFIGS / "model").glob("*.yaml")) + sorted((CONFIGS / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_model_and_trainer_presets_parse(path, capsys):
    with pytest.raises(SystemExit) as e:
        main(cli_args("sft", "--config", str(path), "--print_config"))
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    preset = yaml.safe_load(path.read_text())
    for key, value in preset.get("trainer", {}).items():
        if isinstance(value, dict):  # a class: its class_path and the preset's init_args (defaults are added)
            assert printed["trainer"][key]["class_path"] == value["class_path"]
            assert value.get("init_args", {}).items() <= printed["trainer"][key]["init_args"].items()
        else:
            assert printed["trainer"][key] == value
    for key, value in preset.get("model", {}).get("init_args", {}).items():
        if isinstance(value, dict):
            assert value.items() <= printed["model"]["init_args"][key].items()
        else:
            assert printed["model"]["init_args"][key] == value


def test_fresh_model_instantiates_from_tiny_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(cli_args("sft", "--config", str(CONFIGS / "model" / "tiny.yaml"))[1:], run=False)
    assert cli.model.policy.config.dim == 64 and cli.datamodule.hparams.kind == "sft"


def test_misspelled_key_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(cli_args("sft", "--model.init_args.lrr", "0.1"))
    assert e.value.code != 0
    assert "lrr" in capsys.readouterr().err


def test_abbreviations_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--conf", str(CONFIGS / "base.yaml")])


def test_cli_runs_sft_and_writes_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(cli_args("sft", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                  "--model.init_args.arch.dim", "32", "--model.init_args.arch.n_layers", "1",
                  "--model.init_args.arch.n_heads", "2", "--data.num_train", "500", "--data.num_val", "10",
                  "--trainer.enable_progress_bar", "false"))
    run = tmp_path / "logs" / "sft" / "version_0"
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "hf" / "config.json").exists() and (run / "hf" / "tokenizer.json").exists()
    assert list(run.glob("events.out.tfevents.*"))
    assert (tmp_path / "logs" / "sft" / "latest_hf").resolve() == (run / "hf").resolve()
    # a second run gets its own directory; the first one's files are untouched
    stamp = (run / "hf" / "model.safetensors").stat().st_mtime_ns
    (tmp_path / "logs" / "sft" / "latest").symlink_to("version_0")  # the link earlier versions wrote
    main(cli_args("sft", "--trainer.max_steps", "1", "--model.init_args.arch.dim", "32",
                  "--model.init_args.arch.n_layers", "1", "--model.init_args.arch.n_heads", "2",
                  "--data.num_train", "500", "--data.num_val", "10", "--trainer.enable_progress_bar", "false"))
    assert (tmp_path / "logs" / "sft" / "version_1" / "hf").exists()
    assert (run / "hf" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (tmp_path / "logs" / "sft" / "latest_hf").resolve().parent.name == "version_1"
    # TensorBoard lists each run once: no link to a run directory is left for it to read as another run
    assert not (tmp_path / "logs" / "sft" / "latest").is_symlink()
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "logs")).Runs()
    assert sorted(runs) == ["sft/version_0", "sft/version_1"]


def test_train_pipeline_prerequisites_come_from_configs(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert train.prerequisites("sft") == []
    for algo in ALGOS:
        text = (CONFIGS / "algo" / f"{algo}.yaml").read_text()
        if "logs/sft/latest_hf" in text:
            assert "sft" in train.prerequisites(algo)
    with pytest.raises(SystemExit, match="ALGO='nope' has no config"):
        train.main(["nope"])


def val_steps(run_dir):
    """Steps at which a run logged val/accuracy, read back from its TensorBoard events."""
    from alignlab.curve import read_scalars
    return [step for step, _, _ in read_scalars(run_dir)["val/accuracy"]]


TINY_SFT = ("--model.init_args.arch.dim", "32", "--model.init_args.arch.n_layers", "1",
            "--model.init_args.arch.n_heads", "2", "--data.num_train", "500", "--data.num_val", "10",
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1")


@pytest.mark.parametrize("max_steps, interval, start, expected", [
    (5, 100, False, [4]),       # shorter than val_check_interval: one validation, after the last step
    (5, 3, False, [2, 4]),      # the scheduled one after step 3, and one after the last step
    (6, 3, False, [2, 5]),      # the last step is a scheduled one: validated once, not twice
    (5, 3, True, [0, 2, 4]),    # ValidateAtStart: the starting model too, at step 0
])
def test_every_run_ends_with_a_validation(tmp_path, monkeypatch, max_steps, interval, start, expected):
    monkeypatch.chdir(tmp_path)
    extra = ["--trainer.callbacks+=alignlab.callbacks.ValidateAtStart"] if start else []
    main(cli_args("sft", "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(interval),
                  *TINY_SFT, *extra))
    assert val_steps(tmp_path / "logs" / "sft" / "version_0") == expected  # Lightning logs step n at n - 1


# --------------------------------------------------------------------------- run names, minimal stage configs
def printed_config(args) -> dict:
    """The resolved config of ``fit ARGS --print_config``, parsed."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(["fit", *args, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(out.getvalue())


STAGE_CONFIGS = [CONFIGS / "algo" / f"{a}.yaml" for a in ALGOS] + sorted((CONFIGS / "recipes").glob("*/*.yaml"))


def commented_keys(text: str) -> set[str]:
    """Dotted keys of a YAML file whose line carries a comment (``key: value  # why``): stated on purpose."""
    stack, keys = [], set()
    for line in text.splitlines():
        key = line.lstrip().split(":", 1)[0]
        if not line.strip() or line.lstrip().startswith(("#", "-")) or ":" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        if "#" in line.split(":", 1)[1]:
            keys.add(".".join(k for _, k in stack))
    return keys


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_stage_config_states_only_what_differs(path):
    """A stage config = what lies beneath it (its class's defaults and base.yaml; for a recipe, its algorithm's
    config) + the keys it states; each stated key differs from what lies beneath, unless its comment says why
    it is stated anyway. Its run is named after its path."""
    recipe = path.parent.name if path.parent.parent.name == "recipes" else None
    algo_yaml = CONFIGS / "algo" / path.name
    layers = ["--config", str(CONFIGS / "base.yaml"), "--config", str(algo_yaml)]
    if recipe:
        beneath = printed_config(layers)
        resolved = printed_config([*layers, "--config", str(path)])
    else:
        class_path = yaml.safe_load(path.read_text())["model"]["class_path"]
        beneath = printed_config(layers[:2] + [f"--model.class_path={class_path}"])
        resolved = printed_config(layers)
    stated = yaml.safe_load(path.read_text())
    on_purpose = commented_keys(path.read_text())
    assert resolved["trainer"]["logger"]["init_args"]["name"] == train.stage_name(path.stem, recipe)
    sections = {"model.init_args": (stated.get("model", {}).get("init_args", {}),
                                    resolved["model"]["init_args"], beneath["model"]["init_args"]),
                "data": (stated.get("data", {}), resolved["data"], beneath["data"]),
                "trainer": (stated.get("trainer", {}), resolved["trainer"], beneath["trainer"])}
    for section, (mine, res, below) in sections.items():
        appended = {k.removesuffix("+") for k in mine if k.endswith("+")}
        for key, value in res.items():
            if key == "logger" and section == "trainer":
                continue
            if key in appended:  # callbacks+: the ones beneath, then this file's
                assert [c["class_path"] for c in value] == [c["class_path"] for c in below[key]] + \
                    [c["class_path"] for c in mine[f"{key}+"]]
            elif key not in mine:
                assert value == below[key], f"{section}.{key}: {value!r} is neither stated nor from beneath"
            elif isinstance(mine[key], dict) and value != mine[key]:  # a dataclass: the stated fields + defaults
                assert mine[key].items() <= value.items(), f"{section}.{key}"
            else:
                assert value == mine[key], f"{section}.{key}"
        for key, value in mine.items():
            if f"{section}.{key}" not in on_purpose and key not in appended and f"{key}+" not in mine:
                assert value != below.get(key), (f"{path.relative_to(CONFIGS)}: {section}.{key}: {value!r} is "
                                                 f"what lies beneath already: leave it out (or say why in a comment)")


def test_config_stage_names_the_run_after_the_config_path(tmp_path):
    assert train.config_stage(CONFIGS / "algo" / "grpo.yaml") == "grpo"
    assert train.config_stage("configs/recipes/smollm2/ppo.yaml") == "smollm2/ppo"
    assert train.config_stage(tmp_path / "configs" / "algo" / "mine.yaml") == "mine"  # wherever the copy is
    for other in ("configs/base.yaml", "configs/model/tiny.yaml", "configs/ablation/rl.yaml", "my/algo/grpo.yaml",
                  "configs/algo/notes.txt"):
        assert train.config_stage(other) is None, other


def test_an_explicit_or_later_run_name_wins_and_other_configs_keep_logs_run(tmp_path):
    base, grpo = ["--config", str(CONFIGS / "base.yaml")], ["--config", str(CONFIGS / "algo" / "grpo.yaml")]
    name = lambda *args: printed_config([*args])["trainer"]["logger"]["init_args"]["name"]  # noqa: E731
    assert name(*base, *grpo, "--trainer.logger.init_args.name=mine") == "mine"
    assert name(*base, "--trainer.logger.init_args.name=mine", *grpo) == "grpo"  # the later config names it
    dapo = ["--config", str(CONFIGS / "algo" / "dapo.yaml")]
    assert name(*base, *dapo, "--config", str(CONFIGS / "ablation" / "rl.yaml")) == "ablation/dapo"
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  class_path: alignlab.algorithms.GRPO\n")
    assert name(*base, "--config", str(mine)) == "run"  # not a stage config: base.yaml's logs/run
    own = tmp_path / "configs" / "algo" / "own.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("trainer:\n  logger:\n    init_args:\n      name: elsewhere\n")
    assert name(*base, *grpo, "--config", str(own)) == "elsewhere"  # a stage config that names its run itself
    printed = printed_config([*grpo])  # no base.yaml, so no logger class to name: Lightning's default logger
    assert printed["trainer"]["logger"] is None


# ---------------------------------------------------------------------------------- train.py from anywhere
def test_train_runs_from_any_directory_with_logs_in_it(tmp_path, monkeypatch):
    """The project's configs come from the repository; logs/ (runs, exports, the stage chain) from the working
    directory."""
    monkeypatch.chdir(tmp_path)  # no configs/ here
    calls = []

    def run_in_process(cmd):
        calls.append(cmd)
        main(cmd[3:])  # [python, -m, alignlab, fit, ...]
        return 0
    monkeypatch.setattr(train.subprocess, "call", run_in_process)
    train.main(["sft", "--trainer.max_steps=1", *TINY_SFT])
    configs = [calls[0][i + 1] for i, a in enumerate(calls[0]) if a == "--config"]
    assert configs == [str(CONFIGS / "base.yaml"), str(CONFIGS / "algo" / "sft.yaml")]
    assert (tmp_path / "logs" / "sft" / "version_0" / "hf" / "config.json").is_file()
    assert train.exported("sft") and train.missing_stages("grpo") == []  # GRPO's init_from: ./logs/sft/latest_hf
    with pytest.raises(SystemExit, match=f"^error: RECIPE='nope' has no config {CONFIGS}/recipes/nope/grpo.yaml; "
                                         f"no such recipe$"):
        train.main(["grpo", "--recipe", "nope"])
    with pytest.raises(SystemExit, match=f"^error: ALGO='nope' has no config {CONFIGS}/algo/nope.yaml; known: dapo"):
        train.main(["nope"])
