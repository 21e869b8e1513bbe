"""DDP on CPU (gloo, 2 processes under torchrun): GRPO/DAPO updates with 2 ranks x b prompts equal 1 rank x 2b
on the same prompts and completions (group statistics, token-level means, loss x world size); every algorithm
trains under DDP with the ranks on disjoint data and identical weights."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from ddp_run import VARIANTS, equivalence_run

from conftest import tiny_arch

TESTS = Path(__file__).resolve().parent
ALGOS = ["sft", "rm", "dpo", "ppo", "grpo", "dapo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    """One torchrun job, 2 CPU processes: every scenario of tests/ddp_run.py; returns its output directory."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(TESTS / "ddp_run.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_x_b_prompts_update_like_one_rank_x_2b(name, ddp_out, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # the reward function lives in tests/resume_helpers.py
    one = equivalence_run(name, devices=1)
    two = torch.load(ddp_out / f"equiv_{name}.pt", weights_only=True)
    L.seed_everything(0)
    init = VARIANTS[name][0](arch=tiny_arch()).policy.state_dict()
    assert max((one[k] - init[k]).abs().max() for k in one) > 1e-2  # the update moved the weights (SGD, lr 1)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_under_ddp_on_disjoint_data_with_identical_weights(algo, ddp_out):
    r0, r1 = (torch.load(ddp_out / f"smoke_{algo}_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(r0["prompts"]) == len(r1["prompts"]) == 8  # 2 steps x batch 4 on each rank
    assert not set(r0["prompts"]) & set(r1["prompts"])  # the sampler splits the data between ranks
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], atol=0, rtol=0, msg=k)  # gradients all-reduced


def test_dapo_resumed_under_ddp_ends_like_the_uninterrupted_run(ddp_out):
    ckpt = torch.load(ddp_out / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    gens = ckpt["sampling_generator"]
    assert gens.shape[0] == 2 and not torch.equal(gens[0], gens[1])  # one sampling stream per rank, both saved
    assert ckpt["dapo_extra_prompts_drawn"].shape == (2,)
    for r in (0, 1):
        out = torch.load(ddp_out / f"resume_dapo_rank{r}.pt", weights_only=True)
        for k, v in out["full"].items():
            torch.testing.assert_close(out["resumed"][k], v, atol=1e-6, rtol=0, msg=k)


def test_the_hf_export_at_the_end_of_a_ddp_run_is_written(ddp_out):
    assert (ddp_out / "logs" / "sft" / "latest_hf" / "config.json").is_file()
