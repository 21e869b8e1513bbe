"""Resume: a run killed with SIGKILL and resumed from last.ckpt logs the same metrics at every later step as the
uninterrupted run (GRPO, DAPO, DPO); SIGTERM saves a checkpoint before exiting; checkpoint writes are atomic
and loads never run code; the training order resumes mid-epoch."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader
from resume_helpers import read_metrics

from alignlab.checkpoint import AtomicCheckpointIO, find_last_checkpoint
from alignlab.cli import main
from alignlab.data.datamodule import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = ["--config", str(CONFIGS / "model" / "tiny.yaml"), "--model.init_args.init_from=null"]
ALGO_ARGS = {
    "grpo": ["--model.init_args.num_generations=4", "--model.init_args.max_new_tokens=6", "--data.batch_size=4",
             "--model.init_args.lr=1e-3"],
    "dapo": ["--model.init_args.num_generations=2", "--model.init_args.max_new_tokens=6", "--data.batch_size=4",
             "--model.init_args.overlong_buffer_len=2", "--model.init_args.lr=1e-3",
             "--model.init_args.reward_funcs=[resume_helpers.length_parity_reward]"],  # G=2: some group has equal
    # rewards (parity) within steps 3-6, so the refill iterator is used and its position must be restored
    "dpo": ["--data.batch_size=8", "--model.init_args.lr=1e-3", "--data.pairs_from=null"],  # a fresh model: task pairs
    # PPO on the rule reward (no reward model): policy, critic (its own optimizer groups), reference and the
    # adaptive KL controller must all come back
    "ppo": ["--model.init_args.num_generations=4", "--model.init_args.max_new_tokens=6", "--data.batch_size=4",
            "--model.init_args.reward_model=null", "--model.init_args.lr=1e-3", "--model.init_args.target_kl=0.01"],
}


def run_config(tmp_path, metrics: str, kill_after: int | None = None, every: int = 2) -> str:
    """Trainer settings of the test runs: checkpoints every `every` steps, metrics of every step to a file."""
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": every, "save_top_k": 0}},
        {"class_path": "alignlab.checkpoint.CheckpointOnSigterm"},
        {"class_path": "resume_helpers.StepMetrics", "init_args": {"path": str(tmp_path / metrics)}},
    ]
    if kill_after is not None:
        callbacks.append({"class_path": "resume_helpers.KillAfterStep", "init_args": {"step": kill_after}})
    cfg = {"trainer": {"callbacks": callbacks, "limit_val_batches": 0, "enable_progress_bar": False,
                       "log_every_n_steps": 1},
           "data": {"num_train": 400, "num_val": 8}}
    path = tmp_path / f"{metrics}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def cli_args(algo, tmp_path, metrics, max_steps, **kw):
    return ["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "algo" / f"{algo}.yaml"),
            *TINY, *ALGO_ARGS[algo], "--config", run_config(tmp_path, metrics, **kw),
            f"--trainer.max_steps={max_steps}"]


def subprocess_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("algo", ["grpo", "dapo", "dpo", "ppo"])
def test_sigkill_then_resume_from_last_matches_the_uninterrupted_run(algo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    main(cli_args(algo, tmp_path, "full.jsonl", 6))  # uninterrupted, in process: logs/<algo>/version_0

    killed = subprocess.run([sys.executable, "-m", "alignlab", *cli_args(algo, tmp_path, "part.jsonl", 6,
                                                                         kill_after=3)],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "pre-optimization state" not in killed.stderr  # Lightning's manual-optimisation warning is filtered
    assert max(read_metrics(tmp_path / "part.jsonl")) == 3  # died after step 3, its last checkpoint is step 2
    assert (tmp_path / "logs" / algo / "version_1" / "checkpoints" / "last.ckpt").is_file()

    main(cli_args(algo, tmp_path, "part.jsonl", 6) + ["--ckpt_path", "last"])  # continues version_1
    assert not (tmp_path / "logs" / algo / "version_2").exists()
    assert (tmp_path / "logs" / algo / "version_1" / "config.resume.yaml").is_file()
    full, part = read_metrics(tmp_path / "full.jsonl"), read_metrics(tmp_path / "part.jsonl")
    assert sorted(part) == sorted(full) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):  # recomputed (3) or new (4-6) after the resume from step 2
        assert part[step].keys() == full[step].keys()
        for k, v in full[step].items():
            assert part[step][k] == pytest.approx(v, abs=1e-6), (step, k)
    if algo == "dapo":  # the refill iterator was used, so its position was part of what was restored
        assert any(full[s]["train/gen_rounds"] > 1 for s in (3, 4, 5, 6))


def test_sigterm_saves_a_checkpoint_at_the_step_reached_and_exits(tmp_path):
    args = cli_args("grpo", tmp_path, "run.jsonl", 10_000, every=10_000)
    proc = subprocess.Popen([sys.executable, "-m", "alignlab", *args], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and max(read_metrics(metrics), default=0) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run stopped before step 3"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode is not None  # it exited by itself (Lightning stops after the current batch)
    ckpt = tmp_path / "logs" / "grpo" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), err[-2000:]
    reached = max(read_metrics(metrics))
    assert torch.load(ckpt, weights_only=True)["global_step"] == reached >= 3


# ------------------------------------------------------------------------------------ atomic, safe files
def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):  # half the bytes reach the disk, then the process "dies"
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind
    io.save_checkpoint({"global_step": 3, "w": torch.zeros(3)}, path)
    assert io.load_checkpoint(path)["global_step"] == 3


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_never_runs_code_from_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        torch.save({"state_dict": {}, "x": _Payload()}, f, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # asked for unsafe: still safe
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------------- data order
def test_sampler_resumes_mid_epoch_and_splits_ranks():
    data = list(range(103))
    g = torch.Generator().manual_seed(5)
    loader = DataLoader(data, batch_size=len(data), shuffle=True, generator=g)
    old = [next(iter(loader)).tolist() for _ in range(3)]  # the shuffled DataLoader's epochs, as Lightning ran them
    s = ResumableSampler(data, seed=5)
    assert [list(s) for _ in range(3)] == old  # same order as before, epoch after epoch
    s.start(1, 40)
    assert list(s) == old[1][40:] and list(s) == old[2]
    ranks = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=5)) for r in (0, 1)]
    assert ranks[0] == old[0][0:102:2] and ranks[1] == old[0][1:102:2]


def test_ckpt_path_last_finds_the_newest_run_and_skips_the_latest_symlink(tmp_path):
    for v in ("version_0", "version_1"):
        (tmp_path / "grpo" / v / "checkpoints").mkdir(parents=True)
        (tmp_path / "grpo" / v / "checkpoints" / "last.ckpt").write_bytes(b"x")
    os.utime(tmp_path / "grpo" / "version_0" / "checkpoints" / "last.ckpt", (1e9, 1e9))
    (tmp_path / "grpo" / "latest").symlink_to("version_1")
    assert find_last_checkpoint(tmp_path, "grpo") == tmp_path / "grpo" / "version_1" / "checkpoints" / "last.ckpt"
    assert find_last_checkpoint(tmp_path, "dpo") is None


@pytest.mark.parametrize("resume_step", [4, 8])  # in the first epoch, in the second (6 batches per epoch)
def test_resume_mid_epoch_follows_the_same_batches_across_epoch_boundaries(resume_step, tmp_path):
    import lightning as L
    from conftest import datamodule, fit, tiny_arch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from resume_helpers import StepMetrics

    from alignlab.algorithms import DPO

    def run(name, ckpt_path=None):
        L.seed_everything(0)
        module = DPO(arch=tiny_arch(), lr=1e-3)
        dm = datamodule("preference", batch_size=4, num_train=24, num_val=4, max_completion_length=24,
                        task_args={"max_digits": 2, "scratchpad_prob": 0.5})
        ck = ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)
        fit(module, dm, max_steps=15, root=tmp_path / name, callbacks=[ck, StepMetrics(str(tmp_path / f"{name}.jsonl"))],
            plugins=[AtomicCheckpointIO()], ckpt_path=ckpt_path, limit_val_batches=0)

    run("full")
    ckpt = next((tmp_path / "full").rglob(f"*step={resume_step}.ckpt"))
    run("resumed", ckpt_path=ckpt)
    full, resumed = read_metrics(tmp_path / "full.jsonl"), read_metrics(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(resume_step + 1, 16))
    for step in resumed:
        assert resumed[step]["batch_idx"] == full[step]["batch_idx"]
        assert resumed[step]["train/loss"] == pytest.approx(full[step]["train/loss"], abs=1e-6), step


# ------------------------------------------------------------------- checkpoints without frozen weights
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_sigkill_then_resume_with_the_reference_reloaded_from_init_from(variant, tmp_path, monkeypatch, capsys):
    """GRPO from an init_from directory: the checkpoint holds no reference weights (full fine-tuning) or no frozen
    base at all (LoRA: adapters + optimizer state), and the resumed run still logs the uninterrupted run's metrics;
    with the directory changed, resuming is one line naming it (exit 2)."""
    from alignlab.cli import cli
    from alignlab.data.tokenizer import char_tokenizer
    from alignlab.model.hf import save_hf
    from alignlab.model.transformer import Transformer, TransformerConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    torch.manual_seed(0)
    start = tmp_path / "start"
    save_hf(Transformer(TransformerConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, max_seq_len=64)),
            start, tokenizer=char_tokenizer())
    extra = [f"--model.init_args.init_from={start}", "--model.init_args.reward_funcs=[resume_helpers.length_parity_reward]"]
    if variant == "lora":
        extra += ["--model.init_args.lora.r=4", "--model.init_args.lora.dropout=0.1", "--model.init_args.lr=1e-2"]

    main(cli_args("grpo", tmp_path, "full.jsonl", 6) + extra)
    killed = subprocess.run([sys.executable, "-m", "alignlab", *cli_args("grpo", tmp_path, "part.jsonl", 6,
                                                                         kill_after=3), *extra],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt_path = tmp_path / "logs" / "grpo" / "version_1" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["global_step"] == 2
    assert not any(k.startswith("ref.") for k in ckpt["state_dict"])
    assert set(ckpt["rebuilt_from"]) == ({"ref."} if variant == "full" else {"policy."})
    if variant == "lora":
        assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])

    main(cli_args("grpo", tmp_path, "part.jsonl", 6) + extra + ["--ckpt_path", "last"])
    full, part = read_metrics(tmp_path / "full.jsonl"), read_metrics(tmp_path / "part.jsonl")
    assert sorted(part) == sorted(full) == [1, 2, 3, 4, 5, 6]
    assert full[6]["train/kl"] > 0  # the policy moved away from the reference: the KL term is live
    for step in (3, 4, 5, 6):
        assert part[step].keys() == full[step].keys()
        for k, v in full[step].items():
            assert part[step][k] == pytest.approx(v, abs=1e-6), (step, k)

    (start / "config.json").write_text((start / "config.json").read_text().replace('"rms_norm_eps": 1e-05',
                                                                                 '"rms_norm_eps": 1e-06'))
    with pytest.raises(SystemExit) as exit_:
        cli(cli_args("grpo", tmp_path, "again.jsonl", 8) + extra + ["--ckpt_path", str(ckpt_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: ckpt_path: {ckpt_path} expects the frozen weights of ") and "now holds other" in err


@pytest.mark.parametrize("ckpt_path", ["last", "file"])
def test_a_resumed_run_keeps_the_checkpoints_hyper_parameters_and_names_each_ignored_value(ckpt_path, tmp_path,
                                                                                          monkeypatch, recwarn):
    """``--ckpt_path FILE`` and ``--ckpt_path last`` agree: the checkpoint's ``model.init_args`` win over the
    configured ones (Lightning's restore), and a warning names each configured value that is not used."""
    from alignlab.cli import CheckCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    main(cli_args("grpo", tmp_path, "run.jsonl", 2))  # lr 1e-3, temperature 1.0
    last = tmp_path / "logs" / "grpo" / "version_0" / "checkpoints" / "last.ckpt"
    path = "last" if ckpt_path == "last" else str(last)
    args = cli_args("grpo", tmp_path, "more.jsonl", 4) + ["--ckpt_path", path]

    changed = main(args + ["--model.init_args.lr=5e-4", "--model.init_args.temperature=0.7"], cli_class=CheckCLI)
    assert changed.model.hparams.lr == 1e-3 and changed.model.hparams.temperature == 1.0  # the checkpoint's
    found = changed.config.fit.ckpt_path
    assert Path(found).resolve() == last.resolve()  # "last" found the run
    messages = [str(w.message) for w in recwarn if "keeps its checkpoint's hyper-parameters" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"ckpt_path: {found}:" in messages[0]
    assert "model.init_args.lr=0.0005 (checkpoint: 0.001)" in messages[0]
    assert "model.init_args.temperature=0.7 (checkpoint: 1.0)" in messages[0]
    assert "max_new_tokens" not in messages[0]  # configured as in the checkpoint: not named

    recwarn.clear()
    same = main(args, cli_class=CheckCLI)  # the run's own values: nothing to warn about
    assert same.model.hparams.lr == 1e-3
    assert not [w for w in recwarn if "keeps its checkpoint's hyper-parameters" in str(w.message)]
