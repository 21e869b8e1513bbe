import math

import pytest
import torch

from alignlab.losses.advantages import (ADVANTAGE_ESTIMATORS, SCALE_REWARDS, gae, group_advantages, per_token_rewards,
                                        rloo_advantages, whiten)

# ---------------------------------------------------------------- group advantages

# Three groups of 3: [1, 2, 3] (mean 2, unbiased std 1), [1, 1, 1] (std 0), [0, 0, 3] (mean 1, std sqrt 3)
REWARDS = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 0.0, 0.0, 3.0])
CENTRED = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 2.0])
# whole batch: mean 4/3, squared deviations sum to 10, unbiased var 10 / 8 = 1.25
BATCH_STD = math.sqrt(1.25)


def test_group_advantages_group_scaling():
    eps = 1e-4
    adv, m = group_advantages(REWARDS, group_size=3, scale_rewards="group", eps=eps)
    group_std = torch.tensor([1.0] * 3 + [0.0] * 3 + [math.sqrt(3)] * 3)
    torch.testing.assert_close(adv, CENTRED / (group_std + eps))
    assert adv[0].item() == pytest.approx(-1 / 1.0001, rel=1e-6)
    assert adv[8].item() == pytest.approx(2 / (math.sqrt(3) + eps), rel=1e-6)
    assert torch.all(adv[3:6] == 0)  # zero-std group: no signal, exactly 0
    assert m["group_reward_std"].item() == pytest.approx((1 + 0 + math.sqrt(3)) / 3, rel=1e-6)
    assert m["reward_std"].item() == pytest.approx(REWARDS.std().item(), rel=1e-6)  # TRL's: all rewards
    assert m["frac_reward_zero_std"].item() == pytest.approx(1 / 3)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_group_advantages_batch_and_none_scaling():
    adv, m = group_advantages(REWARDS, 3, scale_rewards="batch", eps=1e-4)
    torch.testing.assert_close(adv, CENTRED / (BATCH_STD + 1e-4))  # mean per group, std over the batch
    assert m["frac_reward_zero_std"].item() == 0.0  # TRL's: is the std the advantages are divided by 0?
    adv, m = group_advantages(REWARDS, 3, scale_rewards="none")
    torch.testing.assert_close(adv, CENTRED)
    assert m["frac_reward_zero_std"].item() == pytest.approx(1 / 3)  # the groups' stds, as TRL
    _, m = group_advantages(torch.ones(6), 3, scale_rewards="batch")
    assert m["frac_reward_zero_std"].item() == 1.0


def test_group_advantages_all_equal_and_group_of_one():
    adv, m = group_advantages(torch.tensor([0.0, 0.0, 1.0, 1.0]), group_size=2)
    assert torch.all(adv == 0)
    assert m["frac_reward_zero_std"].item() == 1.0 and m["group_reward_std"].item() == 0.0
    assert m["reward_std"].item() == pytest.approx(torch.tensor([0.0, 0.0, 1.0, 1.0]).std().item())
    adv, m = group_advantages(torch.tensor([0.3, 2.0]), group_size=1)
    assert torch.all(adv == 0) and not torch.isnan(m["reward_std"])
    adv, _ = group_advantages(torch.tensor([5.0]), group_size=1, scale_rewards="batch")
    assert adv.item() == 0.0


def test_group_advantages_validation():
    assert SCALE_REWARDS == ("group", "batch", "none")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), group_size=3)
    with pytest.raises(ValueError, match="scale_rewards.*group\\|batch\\|none"):
        group_advantages(torch.zeros(6), group_size=3, scale_rewards="global")


# ---------------------------------------------------------------- GAE


def test_gae_hand_recursion_ragged():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 77.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # lengths 3 and 2; row 1's last entries are padding
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # row 0: delta_2 = 2 + 0 - 1.5 = 0.5                A_2 = 0.5
    #        delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35         A_1 = 0.35 + 0.72*0.5  = 0.71
    #        delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4          A_0 = 1.4  + 0.72*0.71 = 1.9112
    # row 1: delta_1 = 3 + 0 (V_2 is padding) - 1 = 2   A_1 = 2
    #        delta_0 = 0 + 0.9*1.0 - 2.0 = -1.1         A_0 = -1.1 + 0.72*2   = 0.34
    torch.testing.assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5], [0.34, 2.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0], [2.34, 3.0, 0.0]]))
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_lambda_one_is_monte_carlo():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    values = torch.tensor([[0.3, 0.1, 0.4, 0.2]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # returns = sum of the remaining valid rewards; the reward under padding is ignored
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.7, 0.9, -0.4, 0.0]]))


# ---------------------------------------------------------------- whitening


def test_whiten_hand_case():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased var 1
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_whiten_mean_zero_std_one_over_masked_entries():
    x = torch.randn(5, 9) * 3 + 7
    x[:, -2:] = 1e6  # padding values must not influence the statistics
    lengths = torch.tensor([9, 1, 4, 7, 5])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    mask[:, -2:] = False
    w = whiten(x, mask)
    assert w[mask].mean().abs().item() < 1e-5
    assert w[mask].std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(w[~mask] == 0)
    kept = whiten(x, mask, shift_mean=False)
    assert kept[mask].mean().item() == pytest.approx(x[mask].mean().item(), rel=1e-5)


# ---------------------------------------------------------------- per-token rewards


def test_per_token_rewards_score_on_last_valid_token():
    scores = torch.tensor([1.0, 2.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    r = per_token_rewards(scores, kl, mask, beta=0.1)
    expected = torch.tensor([[-0.01, -0.02, -0.03 + 1.0], [-0.05, -0.05 + 2.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)
    # a single valid token gets both its KL penalty and the score
    kl, mask = torch.tensor([[1.0, 9.0]]), torch.tensor([[1, 0]])
    r = per_token_rewards(torch.tensor([3.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(r, torch.tensor([[2.5, 0.0]]))


def test_rloo_subtracts_the_mean_of_the_other_samples_of_the_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 2.0, 5.0, 4.0, 4.0])
    adv, m = rloo_advantages(rewards, group_size=4)
    hand = [rewards[i] - (rewards[g * 4:(g + 1) * 4].sum() - rewards[i]) / 3
            for g in (0, 1) for i in range(g * 4, g * 4 + 4)]
    torch.testing.assert_close(adv, torch.stack(hand))
    _, mg = group_advantages(rewards, 4)
    assert m.keys() == mg.keys()
    scaled, _ = rloo_advantages(rewards, 4, scale_rewards="group")  # then divided as GRPO's would be
    torch.testing.assert_close(scaled, group_advantages(rewards, 4, "group")[0] * 4 / 3)
    assert torch.all(rloo_advantages(torch.tensor([0.3, 2.0]), group_size=1)[0] == 0)  # no other sample
    assert ADVANTAGE_ESTIMATORS == {"grpo": group_advantages, "rloo": rloo_advantages}
