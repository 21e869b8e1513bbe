"""PPO (RLHF): GAE through the module, KL-in-reward placement, reward-model scoring under left padding,
the value loss, the adaptive KL controller, the critic's own parameters and lr, a smoke run, learning."""

import math

import lightning as L
import pytest
import torch
from conftest import SCRATCHPAD, datamodule, fit, learning_seeds, rl_learning_run, tiny_arch

from alignlab.algorithms import PPO, RewardModel
from alignlab.algorithms.on_policy import Rollout
from alignlab.algorithms.ppo import adaptive_kl_coef
from alignlab.losses.policy import kl_estimate
from alignlab.model.heads import ScalarModel


# ------------------------------------------------------------------------------------- helpers
def first_batch(dm) -> dict:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def metrics_of(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def hand_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """The recursion written out on one unpadded completion."""
    adv, next_v, next_a = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_v - values[t]
        adv[t] = delta + gamma * lam * next_a
        next_v, next_a = values[t], adv[t]
    return adv


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A randomly initialised reward-model export on the test tokenizer (for wiring tests)."""
    torch.manual_seed(0)
    rm = RewardModel(arch=tiny_arch())
    path = tmp_path_factory.mktemp("tiny_rm") / "rm"
    rm.export(path)
    return str(path)


def ragged_rollout(module: PPO, rewards: list[float]) -> Rollout:
    """A rollout of 3 completions of lengths 3, 1, 2 (right-padded to 3) after prompts of lengths 2, 1, 2."""
    prompt_ids = torch.tensor([[5, 6], [0, 7], [8, 9]])
    prompt_mask = torch.tensor([[1, 1], [0, 1], [1, 1]])
    completion_ids = torch.tensor([[10, 11, 2], [2, 0, 0], [12, 2, 0]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, truncated=torch.tensor([False, False, False]),
                   prompts=["a", "b", "c"], completions=["x", "y", "z"], rewards=torch.tensor(rewards))


# ----------------------------------------------------------------------- KL reward and GAE
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_in_reward_placement_and_gae_against_the_hand_recursion(estimator):
    torch.manual_seed(0)
    module = PPO(arch=tiny_arch(), beta=0.3, kl_estimator=estimator, gamma=0.9, lam=0.8,
                 whiten_advantages=False)
    with torch.no_grad():  # move the policy off the reference so that KL_t != 0
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scores = [1.5, -2.0, 0.5]
    r = ragged_rollout(module, scores)
    module.prepare(r)  # the fixed log-probs and the rollout-time values
    module.compute_advantages(r)
    m = r.completion_mask.bool()
    logp = module.logps_no_grad(module.policy, r)
    kl = kl_estimate(logp, module.logps_no_grad(module.ref, r), estimator)
    assert kl[m].abs().min() > 1e-4
    last = [2, 0, 1]
    for i, n in enumerate([3, 1, 2]):
        # per-token reward: -beta * KL_t everywhere, + the score on the last valid token only
        rew = [-0.3 * kl[i, t].item() + (scores[i] if t == last[i] else 0.0) for t in range(n)]
        vals = r.values[i, :n].tolist()
        adv = hand_gae(rew, vals, gamma=0.9, lam=0.8)
        torch.testing.assert_close(r.advantages[i, :n], torch.tensor(adv), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.returns[i, :n], torch.tensor(adv) + r.values[i, :n], atol=1e-5, rtol=1e-5)
        # padding carries nothing
        assert torch.all(r.advantages[i, n:] == 0) and torch.all(r.returns[i, n:] == 0) and torch.all(r.values[i, n:] == 0)
    # the critic values at rollout time: V_t read at the position that predicts completion token t
    full = module.critic(torch.cat([r.prompt_ids, r.completion_ids], 1), torch.cat([r.prompt_mask, r.completion_mask], 1))
    torch.testing.assert_close(r.values[0, :3], full[0, 1:4].detach(), atol=1e-6, rtol=0)


def test_score_lands_on_the_last_token_and_the_rest_get_minus_beta_kl():
    """gamma = lam = 1 with a zero critic: A_t = sum of the rewards from t on, so the per-token reward is A_t - A_{t+1}."""
    module = PPO(arch=tiny_arch(), beta=0.5, gamma=1.0, lam=1.0, whiten_advantages=False)
    with torch.no_grad():
        module.critic.head.linear.weight.zero_()
        module.critic.head.linear.bias.zero_()
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    r = ragged_rollout(module, [10.0, 20.0, 30.0])
    module.prepare(r)  # the fixed log-probs and the rollout-time values
    module.compute_advantages(r)
    adv = r.advantages
    per_token = adv - torch.cat([adv[:, 1:], torch.zeros_like(adv[:, :1])], 1)
    kl = kl_estimate(module.logps_no_grad(module.policy, r), module.logps_no_grad(module.ref, r), "k1")
    expected = -0.5 * kl * r.completion_mask
    expected[0, 2] += 10.0
    expected[1, 0] += 20.0
    expected[2, 1] += 30.0
    torch.testing.assert_close(per_token, expected, atol=1e-5, rtol=1e-5)


def test_advantages_are_whitened_over_the_masked_batch():
    module = PPO(arch=tiny_arch(), beta=0.1)
    r = ragged_rollout(module, [1.0, -1.0, 3.0])
    module.prepare(r)  # the fixed log-probs and the rollout-time values
    module.compute_advantages(r)
    m = r.completion_mask.bool()
    assert r.advantages[m].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert r.advantages[m].std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased, over the 6 valid tokens
    assert torch.all(r.advantages[~m] == 0)


def test_missing_eos_penalty_and_reward_clip():
    module = PPO(arch=tiny_arch(), num_generations=2, missing_eos_penalty=1.0, reward_clip=0.5,
                 reward_funcs=["test_grpo.length_reward"])
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    raw = r.rewards_per_func["length_reward"]
    expected = (raw - 1.0 * r.truncated.float()).clamp(-0.5, 0.5)
    assert r.truncated.any()  # a random policy rarely emits EOS within 8 tokens
    torch.testing.assert_close(r.rewards, expected)


# --------------------------------------------------------------- reward model under padding
def test_reward_model_score_is_read_at_the_last_real_token_under_left_padding(tiny_rm):
    module = PPO(arch=tiny_arch(), reward_model=tiny_rm, num_generations=2)
    assert module.rule_reward_weight == 0.0  # the rules are only monitored
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=6)))
    assert (r.prompt_mask == 0).any()  # prompts of different lengths: some rows are left-padded
    rm = ScalarModel.load(tiny_rm).eval()
    with torch.no_grad():
        for i in range(len(r)):
            ids = torch.cat([r.prompt_ids[i][r.prompt_mask[i].bool()], r.completion_ids[i][r.completion_mask[i].bool()]])
            alone = rm.score(ids[None], torch.ones_like(ids)[None]).item()  # unpadded, one row
            assert r.rewards[i].item() == pytest.approx(alone, abs=1e-5)
            assert r.rewards_per_func["reward_model"][i].item() == pytest.approx(alone, abs=1e-5)
    assert "accuracy_reward" in r.rewards_per_func  # the true accuracy, logged next to the learned reward


def test_rule_reward_weight_adds_the_rules_to_the_reward_model_score(tiny_rm):
    module = PPO(arch=tiny_arch(), reward_model=tiny_rm, rule_reward_weight=2.0, num_generations=2,
                 reward_funcs=["test_grpo.length_reward"])
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=3)))
    torch.testing.assert_close(r.rewards, r.rewards_per_func["reward_model"] + 2.0 * r.lengths.float())


# ----------------------------------------------------------------------------- value loss
def test_value_loss_is_clipped_around_the_rollout_values():
    """One token: V_old = 0, return R = 1, new V = 0.5 + the clip range 0.2 -> V_clip = 0.2."""
    module = PPO(arch=tiny_arch(), cliprange_value=0.2, vf_coef=1.0, critic_warmup_steps=1)
    r = ragged_rollout(module, [1.0, 0.0, 0.0]).select([1])  # the 1-token completion
    r.loss_mask = r.completion_mask
    r.values, r.returns = torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]])
    module.critic_values = lambda *a: torch.tensor([[0.5, 9.0, 9.0]], requires_grad=True)  # padding ignored
    loss, m = module.compute_loss(r, torch.tensor(1.0), torch.tensor(1.0))
    # max((0.5 - 1)^2, (0.2 - 1)^2) / 2 = 0.32: the clipped term wins
    assert loss.item() == pytest.approx(0.32, abs=1e-6)
    assert m["value/clipfrac_avg"].item() == 1.0
    assert "loss/policy_avg" not in m  # critic warm-up: the policy is not even run


# ------------------------------------------------------------------------- KL controller
def test_adaptive_kl_controller_follows_the_formula_and_is_checkpointed(tmp_path):
    # KL 3x the target: the error is clipped to +0.2 -> beta * (1 + 0.2 * 64 / 1000)
    assert adaptive_kl_coef(0.1, 3.0, 1.0, 64, 1000) == pytest.approx(0.1 * 1.0128)
    assert adaptive_kl_coef(0.1, 0.9, 1.0, 64, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.064))
    assert adaptive_kl_coef(0.1, 0.0, 1.0, 100, 100) == pytest.approx(0.1 * 0.8)

    # k3: the rollout KL estimate is > 0 as soon as the policy moved (k1's sample mean may be negative)
    module = PPO(arch=tiny_arch(), num_generations=4, beta=0.2, target_kl=1e-6, kl_horizon=100, lr=1e-3,
                 num_iterations=1, kl_estimator="k3")
    coefs = []

    class Track(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            coefs.append((float(trainer.callback_metrics["objective/kl"]), pl_module.beta))

    fit(module, datamodule("prompt", batch_size=4), max_steps=3, root=tmp_path, callbacks=[Track()])
    expected = 0.2
    for kl, coef in coefs:  # the coefficient used for the NEXT rollout
        expected = adaptive_kl_coef(expected, kl, 1e-6, 16, 100)
        assert coef == pytest.approx(expected, rel=1e-6)
    # rollout 1: policy == reference, KL = 0 < target: -20% x 16/100; later KL >> target: +20% x 16/100
    assert coefs[0][0] == 0.0 and coefs[1][0] > 1e-4
    assert module.beta == pytest.approx(0.2 * 0.968 * 1.032**2, rel=1e-6)
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)  # our own file, written just now
    assert ckpt["ppo_beta"] == pytest.approx(module.beta)
    again = PPO(arch=tiny_arch(), beta=0.2, target_kl=1e-6)
    again.on_load_checkpoint(ckpt)
    assert again.beta == pytest.approx(module.beta)


# --------------------------------------------------------------------------------- critic
def test_critic_has_its_own_parameters_and_learning_rate(tiny_rm):
    module = PPO(arch=tiny_arch(), reward_model=tiny_rm, lr=1e-5, critic_lr=3e-4)
    policy_ids = {id(p) for p in module.policy.parameters()}
    critic_ids = {id(p) for p in module.critic.parameters()}
    rm_ids = {id(p) for p in module.reward_model.parameters()}
    assert not policy_ids & critic_ids and not critic_ids & rm_ids
    # initialised from the reward model, but a separate copy
    for a, b in zip(module.critic.parameters(), module.reward_model.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert not any(p.requires_grad for p in module.reward_model.parameters())
    opt = module.configure_optimizers()["optimizer"]
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[id(p)] = g["lr"]
    assert {lrs[i] for i in policy_ids} == {1e-5} and {lrs[i] for i in critic_ids} == {3e-4}
    assert not rm_ids & lrs.keys() and not {id(p) for p in module.ref.parameters()} & lrs.keys()
    # without a reward model: the policy's trunk, copied, with a fresh head
    plain = PPO(arch=tiny_arch())
    assert plain.reward_model is None
    assert torch.equal(plain.critic.trunk.embed_tokens.weight, plain.policy.embed_tokens.weight)
    assert plain.critic.trunk.embed_tokens.weight.data_ptr() != plain.policy.embed_tokens.weight.data_ptr()


def test_critic_warmup_trains_only_the_critic():
    module = PPO(arch=tiny_arch(), num_generations=4, critic_warmup_steps=2, num_iterations=2, lr=1e-3, critic_lr=1e-3)
    policy0, critic0 = snapshot(module.policy), snapshot(module.critic)
    fit(module, datamodule("prompt", batch_size=4), max_steps=4)  # 2 rollouts x 2 epochs
    assert all(torch.equal(a, b) for a, b in zip(policy0, module.policy.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic0, module.critic.parameters()))
    fit(module, datamodule("prompt", batch_size=4), max_steps=2)  # a fresh trainer: step 0 again
    assert all(torch.equal(a, b) for a, b in zip(policy0, module.policy.parameters()))


@pytest.mark.parametrize("kw, name", [({"num_iterations": 0}, "num_iterations"), ({"kl_estimator": "k2"}, "kl_estimator"),
                                      ({"epsilon": -0.1}, "epsilon"), ({"dual_clip": 1.0}, "dual_clip"),
                                      ({"reward_model": "/nonexistent"}, "reward_model"), ({"lam": 1.5}, "lam"),
                                      ({"critic_lr": 0.0}, "critic_lr"),
                                      ({"rule_reward_weight": 0.0}, "rule_reward_weight")])
def test_bad_config_names_the_argument(kw, name):
    with pytest.raises(ValueError, match=f"model.{name}"):
        PPO(arch=tiny_arch(), **kw)


# -------------------------------------------------------------------------------- smoke
EXPECTED = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
            "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
            "loss/policy_avg", "loss/value_avg", "value/clipfrac_avg", "policy/ratio_avg", "train/loss", "train/reward",
            "train/beta", "rewards/accuracy_reward/mean", "rewards/reward_model/mean",
            "completions/mean_length", "val/accuracy"]


def test_smoke_20_steps(tmp_path, tiny_rm):
    module = PPO(arch=tiny_arch(), reward_model=tiny_rm, num_generations=2, num_iterations=2, minibatches=2, lr=1e-3,
                 critic_lr=1e-3, entropy_coef=0.01, dual_clip=3.0, log_completions_every_n_steps=4)
    assert module.hparams.num_iterations == 2 and module.optimizer_steps_per_batch() == 4
    ref0, policy0, rm0 = snapshot(module.ref), snapshot(module.policy), snapshot(module.reward_model)
    trainer = fit(module, datamodule("prompt", batch_size=4), max_steps=20, root=tmp_path, val_every=5)  # 5 batches
    assert trainer.global_step == 20  # 5 rollouts x 2 epochs x 2 minibatches
    m = metrics_of(trainer)
    for key in EXPECTED:
        assert key in m and math.isfinite(m[key]), key
    assert m["objective/kl"] != 0  # the policy moved away from the reference...
    assert m["objective/rlhf_reward"] == pytest.approx(m["objective/scores"] + m["objective/non_score_reward"], abs=1e-5)
    assert m["policy/ratio_avg"] != 1.0  # later minibatches reuse the rollout
    assert all(torch.equal(a, b) for a, b in zip(ref0, module.ref.parameters()))  # ...which never changed
    assert all(torch.equal(a, b) for a, b in zip(rm0, module.reward_model.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(policy0, module.policy.parameters())) > 1e-4
    module.export(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").exists() and ScalarModel.is_scalar_model(tmp_path / "hf" / "critic")


# ------------------------------------------------------------------------------ learning
PPO_KW = dict(num_generations=8, max_new_tokens=24, val_max_new_tokens=24, num_iterations=1, critic_lr=3e-4)
MARGIN_PPO_RM, MARGIN_PPO, MARGIN_PPO_GREEDY = 0.02, 0.04, 0.02


@pytest.fixture(scope="module")
def onpolicy_rm(scratchpad_sft_export, onpolicy_pairs, tmp_path_factory):
    """A reward model trained the InstructGPT way, on pairs of the SFT policy's OWN samples ranked by the task
    verifier (conftest.onpolicy_pairs).

    The default RM data (correct answer vs a one-digit or one-column slip) gives a 0.68-accurate RM, and PPO
    against that RM drives accuracy DOWN (measured: 0.42 -> 0.06 at lr 1e-4, beta 0.05, while
    objective/scores rises): textbook reward hacking. ~2000 on-policy pairs, 300 steps: ~15 s on one thread.
    """
    path = scratchpad_sft_export
    L.seed_everything(0)
    rm = RewardModel(init_from=path, lr=5e-4)
    fit(rm, datamodule("preference", tokenizer=path, train_file=onpolicy_pairs["train"], **SCRATCHPAD),
        max_steps=300, limit_val_batches=0)
    root = tmp_path_factory.mktemp("onpolicy_rm")
    rm.export(root / "rm")
    return str(root / "rm")


def run_ppo(path: str, record, seed: int, **kw) -> dict[str, float]:
    return rl_learning_run(PPO, path, record, seed=seed, **{**PPO_KW, **kw})


@learning_seeds()
def test_ppo_with_the_learned_reward_model_raises_true_accuracy(scratchpad_sft_export, onpolicy_rm, seed, record):
    """SFT -> RM -> PPO. The rule accuracy is only monitored (rule_reward_weight 0): the policy sees the RM alone.

    What PPO optimises is the policy's samples, so the true accuracy of samples on held-out prompts is the
    claim (conftest.held_out_accuracy: 400 prompts x 4); greedy accuracy only must not collapse, as it does
    when the RM is hacked (README: the RM trained on the built-in pairs takes `make train ALGO=ppo` down).
    100 rollouts of 16 prompts x 8 samples, lr 3e-5, beta 0.2. Measured over seeds 0-4 at 1 and 2 threads (10 runs, results/learning/spread.md):
    sampled accuracy 0.124 -> 0.174 +- 0.009 (smallest gain +0.031), greedy 0.362 -> 0.370 +- 0.011 (smallest
    -0.010), completions 9.5 -> 14.1 tokens. We require +0.02 sampled and greedy >= start - 0.03; with lr ~0
    the sampled accuracy stays at 0.124 and the test fails.
    """
    r = run_ppo(scratchpad_sft_export, record, seed, reward_model=onpolicy_rm, lr=3e-5, beta=0.2)
    assert r["sampled_end"] >= r["sampled_start"] + MARGIN_PPO_RM, r
    assert r["end"] >= r["start"] - 0.03, r


@learning_seeds()
def test_ppo_with_the_rule_reward_alone_raises_accuracy(scratchpad_sft_export, seed, record):
    """PPO on verifiable rewards: no reward model, accuracy_reward is the score, the critic starts from the policy.

    100 rollouts of 16 x 8, lr 1e-4, beta 0.05. Measured over seeds 0-4 at 1 and 2 threads (10 runs, results/learning/spread.md): sampled accuracy
    0.124 -> 0.208 +- 0.008 (smallest gain +0.074), greedy 0.362 -> 0.446 +- 0.017 (smallest +0.055). We
    require +0.04 sampled and +0.02 greedy; with lr ~0 nothing moves (0.124 -> 0.124) and the test fails.
    """
    r = run_ppo(scratchpad_sft_export, record, seed, lr=1e-4)
    assert r["sampled_end"] >= r["sampled_start"] + MARGIN_PPO, r
    assert r["end"] >= r["start"] + MARGIN_PPO_GREEDY, r
