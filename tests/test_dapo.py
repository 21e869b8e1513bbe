"""DAPO: the five switches (no reference, clip-higher, dynamic sampling, token-mean, overlong shaping)."""

import math

import pytest
import torch

from alignlab.algorithms import DAPO, GRPO, PPO
from alignlab.rewards.rules import overlong_penalty
from conftest import datamodule, fit, learning_seeds, rl_learning_run, tiny_arch


# ------------------------------------------------------------------ reward functions used by path
def mixed_if_even(prompts, completions, **kwargs):
    """Deterministic: groups of prompts whose first operand is even get rewards 0,1,0,1,... (mixed);
    the others all get 0 (dropped by dynamic sampling). Groups are G consecutive rows, G even."""
    return [float(i % 2) if int(p.split("+")[0]) % 2 == 0 else 0.0 for i, p in enumerate(prompts)]


def zero_reward(prompts, completions, **kwargs):
    return [0.0] * len(completions)


# ------------------------------------------------------------------------------------- helpers
def first_batch(dm) -> dict:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def eos_prone(module, p_eos: float = 0.25):
    """Make the (random, near-uniform) policy end a completion with probability ~p_eos per token.

    A hook adds log(p/(1-p) * (V-1)) to the EOS logit, so completion lengths spread over 1..L_max and
    some rows hit L_max without EOS: the tests below then see every region of the length techniques.
    """
    V = module.policy.lm_head.out_features
    offset = torch.zeros(V)
    offset[module.eos_id] = math.log(p_eos / (1 - p_eos) * (V - 1))
    module.policy.lm_head.register_forward_hook(lambda mod, args, out: out + offset.to(out))
    return module


def record_rollouts(module) -> list:
    """Keep every rollout that reaches the advantage step (i.e. after dynamic sampling)."""
    seen, inner = [], module.compute_advantages

    def spy(r):
        seen.append(r)
        return inner(r)

    module.compute_advantages = spy
    return seen


# ------------------------------------------------------------------------ 1. no reference model
def test_dapo_keeps_no_reference_model_and_the_paper_defaults():
    module = DAPO(arch=tiny_arch())
    assert module.ref is None and module.hparams.beta == 0.0
    assert (module.epsilon, module.epsilon_high, module.loss_agg_mode) == (0.2, 0.28, "token-mean")
    h = module.hparams
    assert h.dynamic_sampling and module.mask_truncated_completions and h.overlong_buffer_len > 0
    assert DAPO(arch=tiny_arch(), beta=0.04).ref is not None  # the switch brings it back


# ------------------------------------------------------------------------ 3. dynamic sampling
def test_dynamic_sampling_keeps_only_mixed_groups_and_fills_the_batch():
    G, B = 4, 8
    module = DAPO(arch=tiny_arch(), num_generations=G, reward_funcs=["test_dapo.mixed_if_even"],
                  overlong_buffer_len=0, max_gen_rounds=20)
    seen = record_rollouts(module)
    trainer = fit(module, datamodule("prompt", batch_size=B), max_steps=2)
    assert len(seen) == 2
    for r in seen:
        assert len(r) == B * G  # trimmed to exactly the batch size
        grouped = r.rewards.reshape(B, G)
        torch.testing.assert_close(grouped, torch.tensor([[0.0, 1.0] * (G // 2)] * B))  # every group mixed
        firsts = [int(p.split("+")[0]) for p in r.prompts]
        assert all(a % 2 == 0 for a in firsts)
        assert all(len(set(r.prompts[i : i + G])) == 1 for i in range(0, B * G, G))
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # about half of the prompts have an odd first operand: a 2nd round was needed, and groups were dropped
    assert m["train/gen_rounds"] >= 2 and m["train/dropped_groups"] >= 1
    assert 0 < m["train/frac_reward_zero_std"] < 1  # among all generated groups


def test_dynamic_sampling_stops_after_max_gen_rounds_when_asked():
    module = DAPO(arch=tiny_arch(), num_generations=2, reward_funcs=["test_dapo.zero_reward"],
                  overlong_buffer_len=0, max_gen_rounds=3, unfilled="error")
    with pytest.raises(RuntimeError, match=r"only 0 of 4 prompts had mixed rewards after model.max_gen_rounds=3"):
        fit(module, datamodule("prompt", batch_size=4), max_steps=1)


def test_an_unfilled_batch_is_topped_up_with_equal_groups_that_carry_no_policy_gradient():
    """The default (unfilled=top_up): after max_gen_rounds the mixed groups found are trained on, and the batch
    is filled with equal-reward groups of those rounds (A = 0), so the step runs at its usual shape."""
    G, B = 4, 8
    module = DAPO(arch=tiny_arch(), num_generations=G, reward_funcs=["test_dapo.mixed_if_even"],
                  overlong_buffer_len=0, max_gen_rounds=1)
    seen = record_rollouts(module)
    trainer = fit(module, datamodule("prompt", batch_size=B), max_steps=3)  # ~half of each batch is mixed
    assert len(seen) == 3
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for r in seen:
        assert len(r) == B * G
        firsts = torch.tensor([int(p.split("+")[0]) for p in r.prompts[::G]])
        even = firsts % 2 == 0
        n_mixed = int(even.sum())
        assert 0 < n_mixed < B  # the test sees a short batch
        assert torch.all(even[:n_mixed]) and not torch.any(even[n_mixed:])  # mixed first, then filler
        assert torch.all(r.advantages.reshape(B, G)[n_mixed:] == 0)  # filler: no policy gradient
        assert torch.all(r.advantages.reshape(B, G)[:n_mixed].abs() > 0)
    assert m["train/filler_groups"] == B - n_mixed  # the last step's
    assert m["train/dropped_groups"] == 0 and m["train/gen_rounds"] == 1

    # a batch without one mixed group trains on filler only: the step runs and the loss has no gradient
    module = DAPO(arch=tiny_arch(), num_generations=2, reward_funcs=["test_dapo.zero_reward"],
                  overlong_buffer_len=0, max_gen_rounds=1)
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    assert len(r) == 8 and float(r.stats["filler_groups"]) == 4 and float(r.stats["frac_reward_zero_std"]) == 1
    module.prepare(r)
    module.compute_advantages(r)
    loss, _ = module.compute_loss(r, r.loss_mask.sum(), torch.tensor(8.0))
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in module.policy.parameters())


def test_without_dynamic_sampling_equal_groups_stay():
    module = DAPO(arch=tiny_arch(), num_generations=2, reward_funcs=["test_dapo.zero_reward"],
                  overlong_buffer_len=0, dynamic_sampling=False)
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    assert len(r) == 8 and torch.all(r.rewards == 0)


# -------------------------------------------------------------------------- 5. overlong shaping
def test_soft_overlong_punishment_is_added_to_the_reward():
    module = eos_prone(DAPO(arch=tiny_arch(), num_generations=4, max_new_tokens=6, overlong_buffer_len=4,
                            reward_funcs=["test_dapo.zero_reward"], dynamic_sampling=False))
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=8)))  # varied lengths
    expected = overlong_penalty(r.lengths, max_len=6, cache_len=4)  # 0 up to 2 tokens, -1 at 6
    assert expected.min() < -0.5 and len(set(expected.tolist())) > 1  # the test sees several regions
    torch.testing.assert_close(r.rewards_per_func["overlong"], expected)
    torch.testing.assert_close(r.rewards, expected)  # zero task reward + penalty
    lengths = r.lengths
    assert torch.all(r.rewards[lengths <= 2] == 0) and torch.all(r.rewards[lengths == 6] == -1)


def test_masking_truncated_completions_zeroes_their_loss_weight():
    module = eos_prone(DAPO(arch=tiny_arch(), num_generations=4, max_new_tokens=6, overlong_buffer_len=0,
                            reward_funcs=["alignlab.rewards.rules.format_reward"], dynamic_sampling=False))
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=8)))
    module.prepare(r)
    module.compute_advantages(r)
    truncated = r.truncated
    assert 0 < truncated.sum() < len(r)  # some of each
    assert torch.all(r.loss_mask[truncated] == 0) and torch.all(r.loss_mask[~truncated] == r.completion_mask[~truncated])
    n = r.loss_mask.sum()
    loss, _ = module.compute_loss(r, n, torch.tensor(float(len(r))))
    r.advantages = torch.where(truncated, torch.full_like(r.advantages, 1e3), r.advantages)  # change only them
    loss2, _ = module.compute_loss(r, n, torch.tensor(float(len(r))))
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    # and without the switch they count
    module.mask_truncated_completions = False
    r.loss_mask = None
    module.prepare(r)
    loss3, _ = module.compute_loss(r, r.loss_mask.sum(), torch.tensor(float(len(r))))
    assert abs(loss3.item()) > 10


def test_the_clip_range_has_one_name_across_algorithms():
    """epsilon / epsilon_high in GRPO, DAPO and PPO; DAPO's lower bound is no longer epsilon_low."""
    assert (DAPO(arch=tiny_arch(), epsilon=0.3).epsilon, GRPO(arch=tiny_arch(), epsilon=0.3).epsilon) == (0.3, 0.3)
    assert PPO(arch=tiny_arch(), epsilon=0.3, epsilon_high=0.4).hparams.epsilon_high == 0.4
    with pytest.raises(TypeError, match="epsilon_low"):
        DAPO(arch=tiny_arch(), epsilon_low=0.3)
    with pytest.raises(ValueError, match="model.overlong_buffer_len"):
        DAPO(arch=tiny_arch(), max_new_tokens=4, overlong_buffer_len=5)


# ----------------------------------------------------------------------------------- smoke
EXPECTED = ["train/loss", "train/reward", "train/reward_std", "train/group_reward_std",
            "train/entropy", "train/clip_ratio/low",
            "train/clip_ratio/high", "train/clip_ratio/region", "train/frac_reward_zero_std",
            "train/dropped_groups", "train/gen_rounds", "completions/mean_length", "completions/min_length",
            "completions/max_length", "completions/clipped_ratio", "rewards/format_reward/mean",
            "rewards/overlong/mean", "val/accuracy"]


def test_smoke_20_steps():
    module = DAPO(arch=tiny_arch(), num_generations=4, lr=1e-3, max_gen_rounds=20,
                  reward_funcs=["alignlab.rewards.rules.format_reward"])
    policy0 = [p.detach().clone() for p in module.policy.parameters()]
    trainer = fit(module, datamodule("prompt", batch_size=4), max_steps=20)
    assert trainer.global_step == 20 and module.ref is None
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in EXPECTED:
        assert key in m and math.isfinite(m[key]), key
    assert "train/kl" not in m  # beta = 0: no KL computed at all
    assert max((a - b).abs().max().item() for a, b in zip(policy0, module.policy.parameters())) > 1e-4


# ----------------------------------------------------------------------------------- learning
@learning_seeds(default_run=3)
def test_dapo_raises_validation_accuracy(scratchpad_sft_export, seed, record):
    """From the scratchpad SFT policy, DAPO learns to prefer the reliable strategy (the worked-out sum).

    Measured over seeds 0-4 at 1 and 2 threads (10 runs, results/learning/spread.md): accuracy of 4 samples per held-out prompt
    0.124 -> 0.240 +- 0.009 (smallest gain +0.106), greedy 0.362 -> 0.472 +- 0.014 (smallest +0.090),
    completions 10.2 -> 13.6 tokens. We require +0.06 sampled, +0.04 greedy, +2 tokens; with lr ~0 nothing
    moves and the test fails.

    Measured (1 thread, seed 0, 100 steps of 16 prompts x 8 samples, lr 1e-4, ~20 s): validation accuracy
    0.44 -> 0.63, mean completion length 9.9 -> 13.9 tokens. We require +0.12 and longer completions.
    """
    r = rl_learning_run(DAPO, scratchpad_sft_export, record, seed=seed)
    assert r["sampled_end"] >= r["sampled_start"] + 0.06, r
    assert r["end"] >= r["start"] + 0.04, r
    assert r["length_end"] > r["length_start"] + 2, r  # the scratchpad took over
