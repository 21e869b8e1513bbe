"""The rollout-engine seam (model/engines.py) and the rollout correction, without vLLM: the default engine
keeps the old path (no recomputed pi_old, no sampling/ metrics); an engine that is not exact gets pi_old from
the trainer, its mismatch measured and, when asked, corrected by truncated importance weights in GRPO's and
PPO's policy loss; bad options and a missing vLLM are one line naming the key. The vLLM engine itself:
tests/test_vllm.py."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from alignlab.algorithms import DAPO, GRPO, PPO
from alignlab.cli import main
from alignlab.model.engines import AlignlabEngine, VLLMConfig, vllm_available
from conftest import datamodule, fit, tiny_arch
from test_grpo import first_batch

SHIFT = 0.1  # the fake sampler's log-probs are the trainer's minus this


class ShiftedEngine(AlignlabEngine):
    """alignlab's sampler reporting log-probs SHIFT lower than the trainer's: a sampler that is not pi_old
    by a known amount (as a lower-precision or stale copy would be, by an unknown one)."""

    exact = False

    def generate(self, *args, **kwargs):
        out = super().generate(*args, **kwargs)
        out.logprobs = (out.logprobs - SHIFT) * out.completion_mask
        return out


def grpo(**kw) -> GRPO:
    return GRPO(arch=tiny_arch(), num_generations=4, reward_funcs=["test_grpo.length_reward"], **kw)


def test_default_engine_is_alignlabs_and_keeps_the_old_path():
    module = grpo()
    assert isinstance(module.engine, AlignlabEngine) and module.engine.exact
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    module.prepare(r)
    assert r.logp_old is None and r.is_weights is None  # one update per rollout: logp.detach() is pi_old
    assert not [k for k in r.stats if k.startswith("sampling/")]
    assert r.sampler_logp is not None and r.sampler_logp.shape == r.completion_ids.shape
    real = r.completion_mask.bool()
    assert (r.sampler_logp[real] < 0).all() and (r.sampler_logp[~real] == 0).all()


def test_with_the_exact_engine_the_correction_measures_no_mismatch():
    module = grpo(rollout_correction="token_tis")
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    module.prepare(r)
    assert r.logp_old is not None
    assert float(r.stats["sampling/logp_difference/max"]) < 1e-5  # KV-cache decoding vs one forward: float noise
    torch.testing.assert_close(r.is_weights, r.completion_mask.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", ["token_tis", "sequence_tis"])
def test_an_inexact_engine_gets_the_trainers_pi_old_and_truncated_importance_weights(level):
    module = grpo(rollout_correction=level, rollout_correction_cap=3.0)
    module.engine = ShiftedEngine(module)
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    module.prepare(r)
    real = r.completion_mask.bool()
    assert r.logp_old is not None  # recomputed by the trainer: the loss's pi_old
    assert float(r.stats["sampling/logp_difference/mean"]) == pytest.approx(SHIFT, abs=1e-5)
    assert float(r.stats["sampling/logp_difference/max"]) == pytest.approx(SHIFT, abs=1e-5)
    if level == "token_tis":  # w = exp(logp_old - logp_sampler) = e^0.1 on every real token
        expected = torch.full_like(r.logp_old, math.exp(SHIFT))
    else:  # the product over the sequence, e^(0.1 |o_i|), capped at 3
        expected = torch.exp(SHIFT * r.lengths.float()).clamp(max=3.0)[:, None].expand_as(r.logp_old)
    torch.testing.assert_close(r.is_weights[real], expected[real], atol=1e-4, rtol=1e-4)
    assert (r.is_weights[~real] == 0).all()
    for k in ("min", "mean", "max"):
        assert f"sampling/importance_sampling_ratio/{k}" in r.stats


def test_an_inexact_engine_without_correction_is_measured_but_not_reweighted():
    module = grpo()
    module.engine = ShiftedEngine(module)
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    module.prepare(r)
    assert r.logp_old is not None and r.is_weights is None
    assert float(r.stats["sampling/logp_difference/mean"]) == pytest.approx(SHIFT, abs=1e-5)
    assert "sampling/importance_sampling_ratio/mean" not in r.stats


def policy_grads(module, r) -> list[torch.Tensor]:
    module.policy.zero_grad()
    n = torch.tensor(float(r.loss_mask.sum()))
    loss, _ = module.compute_loss(r, n, torch.tensor(float(len(r))))
    loss.backward()
    return [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]


def test_the_importance_weights_scale_the_policy_gradient():
    """beta = 0: the loss is the policy term alone, and a constant weight w on every token scales its gradient
    by w (the weights are constants of the update, like pi_old)."""
    module = grpo(beta=0.0, rollout_correction="token_tis")
    module.engine = ShiftedEngine(module)
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    module.prepare(r)
    module.compute_advantages(r)
    weighted = policy_grads(module, r)
    r.is_weights = None
    plain = policy_grads(module, r)
    for a, b in zip(weighted, plain):
        torch.testing.assert_close(a, math.exp(SHIFT) * b, atol=1e-6, rtol=1e-4)


def test_ppo_takes_the_same_correction():
    module = PPO(arch=tiny_arch(), num_generations=2, rollout_correction="token_tis")
    module.engine = ShiftedEngine(module)
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    module.prepare(r)
    module.compute_advantages(r)
    real = r.completion_mask.bool()
    assert float(r.stats["sampling/logp_difference/mean"]) == pytest.approx(SHIFT, abs=1e-5)
    torch.testing.assert_close(r.is_weights[real], torch.full_like(r.is_weights[real], math.exp(SHIFT)))
    weighted = policy_grads(module, r)  # the policy's parameters: its clipped surrogate alone
    r.is_weights = None
    plain = policy_grads(module, r)
    assert weighted and len(weighted) == len(plain)
    for a, b in zip(weighted, plain):
        torch.testing.assert_close(a, math.exp(SHIFT) * b, atol=1e-6, rtol=1e-4)


def test_the_correction_runs_through_training_steps_and_logs():
    module = grpo(rollout_correction="sequence_tis")
    module.engine = ShiftedEngine(module)
    trainer = fit(module, datamodule("prompt", batch_size=4), max_steps=2)
    m = trainer.callback_metrics
    for key in ("sampling/logp_difference/mean", "sampling/logp_difference/max",
                "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                "sampling/importance_sampling_ratio/max", "train/loss"):
        assert key in m and math.isfinite(float(m[key])), key


def test_dapo_dynamic_sampling_keeps_the_sampler_log_probs_of_the_groups_it_keeps():
    from test_dapo import record_rollouts
    module = DAPO(arch=tiny_arch(), num_generations=4, reward_funcs=["test_dapo.mixed_if_even"],
                  overlong_buffer_len=0, max_gen_rounds=20, rollout_correction="token_tis")
    module.engine = ShiftedEngine(module)
    seen = record_rollouts(module)
    trainer = fit(module, datamodule("prompt", batch_size=8), max_steps=1)
    r = seen[0]
    assert float(trainer.callback_metrics["train/gen_rounds"]) >= 2  # rows of several rounds, concatenated
    real = r.completion_mask.bool()
    torch.testing.assert_close((r.logp_old - r.sampler_logp)[real], torch.full_like(r.logp_old[real], SHIFT),
                               atol=1e-5, rtol=0)  # each kept row with its own sampler log-probs
    assert (r.sampler_logp[~real] == 0).all()
    assert float(trainer.callback_metrics["sampling/logp_difference/mean"]) == pytest.approx(SHIFT, abs=1e-5)


@pytest.mark.parametrize("kw, name", [({"rollout_engine": "sglang"}, "rollout_engine"),
                                      ({"rollout_sync_every": 0}, "rollout_sync_every"),
                                      ({"rollout_correction": "tis"}, "rollout_correction"),
                                      ({"rollout_correction_cap": 0.0}, "rollout_correction_cap"),
                                      ({"vllm": VLLMConfig(dtype="int8")}, "vllm.dtype"),
                                      ({"vllm": {"kv_cache_memory_gb": -1.0}}, "vllm.kv_cache_memory_gb"),
                                      ({"vllm": {"tensor_parallel_size": 0}}, "vllm.tensor_parallel_size")])
def test_bad_engine_options_name_the_key(kw, name):
    with pytest.raises(ValueError, match=f"model.{name}:"):
        grpo(**kw)


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here: the engine starts instead")
def test_the_vllm_engine_without_vllm_is_one_line_naming_the_key_and_the_make_target(smollm2_dir):
    with pytest.raises(ValueError, match=r"model.rollout_engine: vllm is not installed .*make vllm") as e:
        GRPO(init_from=str(smollm2_dir), rollout_engine="vllm")
    assert "\n" not in str(e.value)


def test_the_vllm_engine_needs_a_checkpoint_directory():
    with pytest.raises(ValueError, match="model.rollout_engine"):
        grpo(rollout_engine="vllm")  # no init_from (and, here, maybe no vllm): one line either way


def test_the_engine_config_parses_with_the_recipe(capsys):
    root = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", f"{root}/base.yaml", "--config", f"{root}/algo/grpo.yaml", "--config",
              f"{root}/recipes/smollm2/grpo.yaml", "--config", f"{root}/engine/vllm.yaml", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert printed["rollout_engine"] == "vllm" and printed["rollout_correction"] == "token_tis"
    assert printed["vllm"]["dtype"] == "float32"


def test_the_vllm_options_survive_a_weights_only_checkpoint_load(tmp_path):
    """Checkpoints hold the hyper-parameters (model.vllm included) and are loaded with weights_only=True."""
    cfg = VLLMConfig(dtype="bfloat16", kv_cache_memory_gb=2.0)
    torch.save({"hyper_parameters": {"vllm": cfg}}, tmp_path / "c.ckpt")
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["hyper_parameters"]["vllm"] == cfg
