"""Faults and bad input: what alignlab promises, one test per promise.

- NaN/Inf in a loss, a reward or a gradient: "skip" drops the step (weights untouched, warning, counted),
  "stop" ends the run with one line naming the step and the quantity; checkpoints never hold a NaN.
- Bad input: one line ``error: ...`` naming the key / file / argument, exit code 2, no traceback, nothing
  written (no run directory).
- A run never writes into an existing run directory's checkpoints or export.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import datamodule, fit, tiny_arch

from alignlab import train
from alignlab.algorithms import GRPO, PPO, SFT
from alignlab.algorithms.base import NonFiniteError
from alignlab.callbacks import HFExport
from alignlab.cli import cli, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# --------------------------------------------------------------------------------- helpers
CALLS = {"n": 0, "nan_at": ()}


def nan_reward(prompts, completions, **kw):
    """Completion length as reward, NaN on the calls listed in CALLS["nan_at"] (1-based)."""
    CALLS["n"] += 1
    bad = CALLS["n"] in CALLS["nan_at"]
    return [float("nan") if bad else float(len(c)) for c in completions]


def nan_from_third_call(prompts, completions, **kw):
    """For the subprocess: fine for two rollouts (steps 0 and 1), NaN from step 2 on."""
    CALLS["n"] += 1
    return [float("nan") if CALLS["n"] >= 3 else float(len(c)) for c in completions]


FAST = ["--config", str(CONFIGS / "model" / "tiny.yaml"), "--trainer.max_steps", "2",
        "--trainer.enable_progress_bar", "false", "--data.num_train", "128", "--data.num_val", "8"]
ON_POLICY = ["--model.init_args.init_from", "null", "--data.batch_size", "4", "--model.init_args.num_generations", "2",
             "--model.init_args.max_new_tokens", "8"]


def cli_args(tmp_path: Path, algo: str, *args: str, module: str = "alignlab") -> list[str]:
    """Arguments of ``python -m alignlab fit`` (or ``alignlab.train``), logging under tmp_path/logs."""
    cmd = [algo] if module == "alignlab.train" else [
        "fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "algo" / f"{algo}.yaml")]
    extra = ON_POLICY if algo in ("grpo", "dapo") else []
    return [*cmd, *FAST, *extra, "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), *args]


def run_cli(tmp_path: Path, algo: str, *args: str, code: int = 2, module: str = "alignlab") -> subprocess.CompletedProcess:
    """The real entry point in a subprocess, in tmp_path."""
    cmd = [sys.executable, "-m", module, *cli_args(tmp_path, algo, *args, module=module)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ALIGNLAB_DEBUG", None)
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == code, res.stderr[-3000:]
    return res


def run_in_process(tmp_path: Path, algo: str, *args: str, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """``alignlab.cli.cli`` (what ``python -m alignlab`` runs) in this process: much faster than a subprocess.

    An exception other than SystemExit (i.e. a traceback) fails the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNLAB_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(cli_args(tmp_path, algo, *args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess([], e.value.code, out.out, out.err)


def assert_one_line_error(res: subprocess.CompletedProcess, *names: str) -> str:
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and res.stderr.rstrip().splitlines()[-1] == errors[0], res.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


class Snapshots(L.Callback):
    """The policy's flattened parameters after every training batch."""

    def __init__(self):
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.params.append(flat(module))


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.policy.parameters()])


class PoisonedSFT(SFT):
    """SFT whose loss (or one gradient) becomes NaN / Inf at step ``poison_step``."""

    def __init__(self, poison: str = "loss", poison_step: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.poison, self.poison_step = poison, poison_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.poison == "loss" and self.global_step == self.poison_step else loss

    def on_after_backward(self):
        if self.poison == "gradient norm" and self.global_step == self.poison_step:
            next(self.policy.parameters()).grad.view(-1)[0] = float("inf")


# ------------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("poison", ["loss", "gradient norm"])
def test_nonfinite_loss_or_gradient_skips_the_step(poison):
    module = PoisonedSFT(poison=poison, arch=tiny_arch(), lr=1e-2)
    snaps = Snapshots()
    with pytest.warns(UserWarning, match=f"step 1: {poison} is NaN or Inf: skipped"):
        trainer = fit(module, datamodule("sft", batch_size=8), max_steps=3, callbacks=[snaps])
    assert trainer.global_step == 3 and module.skipped_steps == 1
    assert torch.equal(snaps.params[1], snaps.params[0])  # the poisoned step left the weights alone
    assert not torch.equal(snaps.params[2], snaps.params[1])  # and training went on
    assert all(torch.isfinite(p).all() for p in snaps.params)
    assert trainer.callback_metrics["train/skipped_steps"] == 1


@pytest.mark.parametrize("poison", ["loss", "gradient norm"])
def test_nonfinite_loss_or_gradient_stops_naming_step_and_quantity(poison):
    module = PoisonedSFT(poison=poison, arch=tiny_arch(), lr=1e-2, nonfinite="stop")
    snaps = Snapshots()
    with pytest.raises(NonFiniteError, match=f"step 1: {poison} is NaN or Inf"):
        fit(module, datamodule("sft", batch_size=8), max_steps=3, callbacks=[snaps])
    assert len(snaps.params) == 1 and torch.equal(flat(module), snaps.params[0])  # stopped before the step


@pytest.mark.parametrize("algo", [GRPO, PPO])
def test_nonfinite_reward_skips_the_rollout(algo):
    CALLS.update(n=0, nan_at=(2,))
    kw = dict(beta=0.0) if algo is GRPO else dict(target_kl=1.0, num_iterations=1)  # PPO: its adaptive KL too
    module = algo(arch=tiny_arch(), num_generations=2, max_new_tokens=6, lr=1e-2,
                  reward_funcs=["test_reliability.nan_reward"], **kw)
    snaps = Snapshots()
    with pytest.warns(UserWarning, match=r"step 1: reward \(nan_reward\) is NaN or Inf: skipped"):
        trainer = fit(module, datamodule("prompt", batch_size=4), max_steps=3, callbacks=[snaps])
    assert len(snaps.params) == 4 and trainer.global_step == 3  # 4 rollouts, 3 optimizer steps
    assert torch.equal(snaps.params[1], snaps.params[0])
    assert not torch.equal(snaps.params[2], snaps.params[1])
    assert module.skipped_steps == 1 and all(torch.isfinite(p).all() for p in snaps.params)


def test_persistent_nonfinite_values_stop_after_patience():
    CALLS.update(n=0, nan_at=range(1, 100))
    module = GRPO(arch=tiny_arch(), num_generations=2, max_new_tokens=4, nonfinite_patience=3,
                  reward_funcs=["test_reliability.nan_reward"])
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match="3 steps in a row"):
        fit(module, datamodule("prompt", batch_size=4), max_steps=5)


def test_nonfinite_option_is_validated():
    with pytest.raises(ValueError, match="model.nonfinite: must be skip|stop"):
        SFT(arch=tiny_arch(), nonfinite="ignore")


@pytest.mark.parametrize("on_exception", [False, True])
def test_nonfinite_stop_keeps_last_checkpoint_finite(on_exception, tmp_path):
    """Through the CLI: the run stops at step 2 with one line and no export. last.ckpt is step 2's and finite,
    whether it was saved periodically (every step) or by ModelCheckpoint(save_on_exception=True) as the run
    stopped: the stop comes before the optimizer step, so not even that checkpoint sees the NaN."""
    every = 100 if on_exception else 1
    (tmp_path / "ckpt.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{save_last: true, every_n_train_steps: {every}, save_top_k: 0, "
        f"save_on_exception: {str(on_exception).lower()}}}\n"
        "    - class_path: alignlab.callbacks.HFExport\n")
    res = run_cli(tmp_path, "grpo", "--config", str(tmp_path / "ckpt.yaml"), "--trainer.max_steps", "5",
                  "--model.init_args.nonfinite", "stop",
                  "--model.init_args.reward_funcs", "[test_reliability.nan_from_third_call]", code=1)
    line = assert_one_line_error(res)
    assert line.startswith("error: step 2: reward (nan_from_third_call) is NaN or Inf (model.nonfinite=stop)")
    run = tmp_path / "logs" / "grpo" / "version_0"
    ckpts = {p.name: torch.load(p, weights_only=False, map_location="cpu")  # ours, just written
             for p in (run / "checkpoints").glob("*.ckpt")}
    assert ckpts["last.ckpt"]["global_step"] == 2 and len(ckpts) == (2 if on_exception else 1)
    for ckpt in ckpts.values():
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (run / "hf").exists()


# ------------------------------------------------------------------------ gradient clipping
class GradNorms(L.Callback):
    """Total gradient norm before clipping (this callback's hook runs before the module's) and the one the
    optimizer used (a step post-hook: the gradients are zeroed only later)."""

    def __init__(self):
        self.before, self.after = [], []

    def on_fit_start(self, trainer, module):
        trainer.optimizers[0].register_step_post_hook(lambda opt, *_: self.after.append(self.norm(opt)))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.before.append(self.norm(optimizer))

    @staticmethod
    def norm(opt) -> float:
        return float(torch.nn.utils.get_total_norm([p.grad for g in opt.param_groups for p in g["params"]
                                                    if p.grad is not None]))


@pytest.mark.parametrize("algo", ["sft", "grpo"])  # automatic and manual optimisation
def test_gradients_are_clipped_once_and_their_norm_logged(algo):
    """Every optimizer step sees gradients of norm <= max_grad_norm; train/grad_norm is the norm before."""
    if algo == "sft":
        module, dm = SFT(arch=tiny_arch(), max_grad_norm=0.05), datamodule("sft", batch_size=8)
    else:
        module = GRPO(arch=tiny_arch(), num_generations=4, max_new_tokens=6, max_grad_norm=0.05, beta=0.04,
                      num_iterations=2, reward_funcs=["test_reliability.nan_reward"])
        dm = datamodule("prompt", batch_size=2)
    CALLS["nan_at"] = ()
    norms = GradNorms()
    trainer = fit(module, dm, max_steps=4, callbacks=[norms])
    assert len(norms.before) == len(norms.after) == 4
    assert all(b > 0.05 for b in norms.before)  # every step needed clipping ...
    assert norms.after == pytest.approx([0.05] * 4, rel=1e-4)  # ... and the optimizer saw the clipped norm
    assert float(trainer.callback_metrics["train/grad_norm"]) == pytest.approx(norms.before[-1], rel=1e-5)


# ------------------------------------------------------------------------------ bad input
GOOD = {"prompt": "1+2=", "completion": "3"}
CASES = {
    # name: (algo, args, words the error line must contain); {tmp} is the test's directory
    "misspelled_key": ("sft", ["--model.init_args.lrr", "0.1"], ["lrr", "not accepted"]),
    "renamed_key": ("ppo", ["--model.init_args.kl_coef", "0.1"],
                    ["kl_coef", "not accepted", "model.init_args.kl_coef is now model.init_args.beta"]),
    "misspelled_data_key": ("sft", ["--data.batch_sise", "8"], ["batch_sise"]),
    "bad_trainer_argument": ("sft", ["--trainer.max_steps", "-5"], ["max_steps", "-5"]),
    "wrong_type": ("sft", ["--model.init_args.lr", "fast"], ['"lr"', "float", "fast"]),
    "invalid_value": ("sft", ["--model.init_args.lr", "-1"], ["model.lr", "must be > 0"]),
    "missing_init_from": ("grpo", ["--model.init_args.init_from", "{tmp}/no_such_dir"], ["model.init_from", "no_such_dir"]),
    "missing_ckpt_path": ("sft", ["--ckpt_path", "{tmp}/no.ckpt"], ["ckpt_path", "no.ckpt"]),
    "unsupported_hf_architecture": ("grpo", ["--model.init_args.init_from", "{tmp}/gpt2"], ["model_type", "gpt2"]),
    "unresolvable_reward": ("grpo", ["--model.init_args.reward_funcs", "[alignlab.rewards.rules.no_such_reward]"],
                            ["model.reward_funcs", "no_such_reward"]),
    "jsonl_bad_row": ("sft", ["--data.train_file", "{tmp}/bad.jsonl", "--data.batch_size", "1"],
                      ["bad.jsonl:2", "'completion'"]),
    "jsonl_invalid_json": ("sft", ["--data.train_file", "{tmp}/broken.jsonl", "--data.batch_size", "1"],
                           ["broken.jsonl:3", "invalid JSON"]),
    "empty_jsonl": ("sft", ["--data.train_file", "{tmp}/empty.jsonl"], ["empty.jsonl", "no rows"]),
    "too_few_rows": ("sft", ["--data.train_file", "{tmp}/good.jsonl", "--data.batch_size", "8"],
                     ["good.jsonl", "data.batch_size=8"]),
    "wrong_data_kind": ("grpo", ["--data.kind", "sft"], ["data.kind", "prompt"]),
    "minibatches_do_not_divide": ("grpo", ["--model.init_args.minibatches", "3"],
                                  ["model.minibatches", "data.batch_size=4", "num_generations=2"]),
    "prompt_plus_generation_too_long": ("grpo", ["--model.init_args.max_new_tokens", "62"],
                                        ["max_seq_len=64", "model.max_new_tokens"]),
    "sequence_too_long": ("sft", ["--model.init_args.arch.max_seq_len", "16"],
                          ["max_seq_len=16", "data.max_completion_length"]),
    "ckpt_path_last_without_a_run": ("sft", ["--ckpt_path", "last"],
                                     ["--ckpt_path last", "/sft/version_*/checkpoints/last.ckpt"]),
    "random_bytes_as_ckpt_path": ("sft", ["--ckpt_path={tmp}/garbage.ckpt"],
                                  ["garbage.ckpt", "not a checkpoint"]),
    "truncated_ckpt_path": ("sft", ["--ckpt_path={tmp}/truncated.ckpt"], ["truncated.ckpt", "truncated"]),
    "ckpt_path_without_weights": ("sft", ["--ckpt_path={tmp}/tensors.ckpt"],
                                  ["tensors.ckpt", "not a Lightning checkpoint"]),
}


def make_inputs(tmp: Path) -> None:
    from alignlab.data.tokenizer import char_tokenizer

    jsonl(tmp / "bad.jsonl", [GOOD, {"prompt": "2+2="}])
    jsonl(tmp / "broken.jsonl", [GOOD, GOOD, '{"prompt": "1+1=", '])
    jsonl(tmp / "good.jsonl", [GOOD, GOOD])
    (tmp / "empty.jsonl").write_text("\n")
    (tmp / "garbage.ckpt").write_bytes(random.Random(0).randbytes(4096))
    torch.save({"weights": torch.ones(64, 64)}, tmp / "tensors.ckpt")  # a torch.save file, not Lightning's
    (tmp / "truncated.ckpt").write_bytes((tmp / "tensors.ckpt").read_bytes()[:8000])
    gpt2 = tmp / "gpt2"
    char_tokenizer().save_pretrained(gpt2)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                  "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128}))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    algo, args, words = CASES[case]
    make_inputs(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    res = run_in_process(tmp_path, algo, *(a.replace("{tmp}", str(tmp_path)) for a in args),
                         capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 2
    assert_one_line_error(res, *words)
    assert sorted(tmp_path.rglob("*")) == before  # no run directory, no config.yaml, nothing


def test_ckpt_path_of_another_model_shape_or_algorithm_is_one_line(tmp_path, capsys, monkeypatch):
    """A real checkpoint that does not fit this run: the export it started from has since changed shape (as
    when logs/sft/latest_hf moves to a bigger SFT run), or the command trains another algorithm."""
    export = tmp_path / "export"
    SFT(arch=tiny_arch()).export(export)
    monkeypatch.chdir(tmp_path)
    main(cli_args(tmp_path, "sft", "--model.init_args.init_from", str(export)))
    ckpt = tmp_path / "logs" / "sft" / "version_0" / "checkpoints" / "last.ckpt"
    shutil.rmtree(export)
    SFT(arch=tiny_arch(dim=32)).export(export)
    before = sorted(tmp_path.rglob("*"))
    res = run_in_process(tmp_path, "sft", f"--ckpt_path={ckpt}", capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 2
    assert_one_line_error(res, f"ckpt_path: {ckpt}: another model shape", "(128, 64) in the checkpoint",
                          "(128, 32) in this run's model")
    res = run_in_process(tmp_path, "grpo", f"--ckpt_path={ckpt}", capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 2
    assert_one_line_error(res, f"ckpt_path: {ckpt}: a checkpoint of alignlab.algorithms.SFT", "(GRPO)")
    assert sorted(tmp_path.rglob("*")) == before


def test_entry_point_bad_input_is_one_line(tmp_path):
    """The real ``python -m alignlab``: exit code 2, one line, no usage text, no traceback."""
    res = run_cli(tmp_path, "sft", "--model.init_args.lrr", "0.1")
    assert_one_line_error(res, "lrr")
    assert list(tmp_path.iterdir()) == []


def test_train_entry_point_bad_input_is_one_line(tmp_path):
    """``python -m alignlab.train grpo`` with its own init_from: no SFT stage runs, one line from the check."""
    (tmp_path / "configs").symlink_to(CONFIGS)
    res = run_cli(tmp_path, "grpo", "--model.init_args.init_from", str(tmp_path / "missing"), module="alignlab.train")
    assert_one_line_error(res, "model.init_from", "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]


# The whole command is checked before a prerequisite stage runs: a fresh checkout (no logs/sft export),
# `make train ALGO=<algo> ARGS="<args>"`. {tmp} is the test's directory.
TRAIN_CASES = {
    "misspelled_key": ("grpo", ["--model.epsilonn=0.3"], ["epsilonn", "not accepted"]),
    "wrong_type": ("grpo", ["--model.init_args.epsilon=wide"], ['"epsilon"', "float", "wide"]),
    "invalid_value": ("grpo", ["--model.init_args.epsilon=-1"], ["model.epsilon", ">= 0"]),
    "too_long_for_the_sft_model": ("ppo", ["--model.init_args.max_new_tokens=62"],  # SFT and RM still to run
                                   ["max_seq_len=64", "model.max_new_tokens"]),
    "missing_data_file": ("dpo", ["--data.train_file={tmp}/no.jsonl"], ["no.jsonl", "no such file"]),
    "missing_ckpt_path": ("grpo", ["--ckpt_path={tmp}/no.ckpt"], ["ckpt_path", "no.ckpt"]),
    "random_bytes_as_ckpt_path": ("grpo", ["--ckpt_path={tmp}/garbage.ckpt"],
                                  ["garbage.ckpt", "not a checkpoint"]),
    "ckpt_path_last_without_a_run": ("dapo", ["--ckpt_path", "last"],
                                     ["--ckpt_path last: no logs/dapo/version_*/checkpoints/last.ckpt"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_checks_the_whole_command_before_any_stage_runs(case, tmp_path, capsys, monkeypatch):
    algo, args, words = TRAIN_CASES[case]
    (tmp_path / "configs").symlink_to(CONFIGS)
    (tmp_path / "garbage.ckpt").write_bytes(random.Random(0).randbytes(4096))
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNLAB_DEBUG", raising=False)
    ran = []
    monkeypatch.setattr(train, "fit", lambda stage, extra, recipe=None: ran.append(stage))
    with pytest.raises(SystemExit) as e:
        train.main([algo, "--data.num_train=128", "--data.num_val=8",
                    *(a.replace("{tmp}", str(tmp_path)) for a in args)])
    out = capsys.readouterr()
    assert e.value.code == 2 and ran == []  # no stage ran, not even the missing SFT export's
    assert_one_line_error(subprocess.CompletedProcess([], 2, out.out, out.err), *words)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_good_dpo_command_is_checked_without_sampling_pairs_from_the_stand_in(tmp_path, monkeypatch):
    """DPO's default pairs come from the SFT export (data.pairs_from): while SFT is still missing, the check
    uses the task's pairs (an untrained stand-in's samples would give none) and writes no pairs file."""
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(train, "fit", lambda stage, extra, recipe=None: ran.append(stage))
    train.main(["dpo", "--data.num_train=128", "--data.num_val=8"])
    assert ran == ["sft", "dpo"]  # checked, then the stages (not run here)
    assert not (tmp_path / "logs").exists()  # the check wrote nothing: no logs/pairs


@pytest.mark.parametrize("command, words", [
    (["grpo", "--model.epsilonn=0.3"], ["Option 'epsilonn' is not accepted"]),  # checked before SFT runs
    (["sft", "--ckpt_path=garbage.ckpt"], ["ckpt_path: garbage.ckpt: not a checkpoint"]),  # by the SFT run itself
])
def test_train_entry_point_bad_command_is_one_line_before_any_stage(command, words, tmp_path):
    """The real ``python -m alignlab.train`` (``make train``) on a fresh checkout: one line, exit code 2, no
    stage has run and nothing is written."""
    (tmp_path / "configs").symlink_to(CONFIGS)
    (tmp_path / "garbage.ckpt").write_bytes(random.Random(0).randbytes(4096))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ALIGNLAB_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "alignlab.train", *command], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert_one_line_error(res, *words)
    assert "running stage" not in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "garbage.ckpt"]


def test_train_runs_only_the_missing_stages_and_prints_a_config_without_them(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(CONFIGS)
    monkeypatch.chdir(tmp_path)
    assert train.missing_stages("ppo") == ["sft", "rm"]
    (tmp_path / "logs" / "sft" / "latest_hf").mkdir(parents=True)
    (tmp_path / "logs" / "sft" / "latest_hf" / "config.json").write_text("{}")
    assert train.missing_stages("ppo") == ["rm"] and train.missing_stages("grpo") == []
    ran = []
    monkeypatch.setattr(train, "fit", lambda stage, extra, recipe=None: ran.append((stage, extra)))
    train.main(["ppo", "--print_config"])  # no check, no stage: the config is printed by the ppo command
    assert ran == [("ppo", ["--print_config"])]


def test_train_skips_prerequisites_the_command_line_replaces(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert train.prerequisites("ppo") == ["sft", "rm"]
    assert train.prerequisites("ppo", ["--model.init_args.init_from=/my/sft"]) == ["rm"]
    assert train.prerequisites("ppo", ["--model.init_args.reward_model", "/my/rm"]) == ["sft"]


def test_debug_env_restores_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGNLAB_DEBUG", "1")
    with pytest.raises(ValueError, match="model.lr: must be > 0"):  # the exception itself, with its traceback
        cli(cli_args(tmp_path, "sft", "--model.init_args.lr", "-1"))


# ---------------------------------------------------------------------- existing run directories
@pytest.mark.parametrize("existing", ["checkpoints/last.ckpt", "hf/config.json", "config.yaml"])
def test_existing_run_directory_is_refused(existing, tmp_path, capsys, monkeypatch):
    run = tmp_path / "logs" / "sft" / "version_0"
    (run / existing).parent.mkdir(parents=True)
    (run / existing).write_text("precious")
    before = sorted(tmp_path.rglob("*"))
    res = run_in_process(tmp_path, "sft", "--trainer.logger.init_args.version", "0", capsys=capsys,
                         monkeypatch=monkeypatch)
    assert_one_line_error(res, "trainer.logger.init_args.version", "already holds a run", "--ckpt_path")
    assert sorted(tmp_path.rglob("*")) == before and (run / existing).read_text() == "precious"


def test_hf_export_never_overwrites(tmp_path):
    trainer = L.Trainer(default_root_dir=tmp_path, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="x"))
    out = Path(trainer.log_dir) / "hf"
    out.mkdir(parents=True)
    (out / "config.json").write_text("precious")
    with pytest.raises(FileExistsError, match="not overwriting"):
        HFExport().on_train_end(trainer, SFT(arch=tiny_arch()))
    assert (out / "config.json").read_text() == "precious"
