import math

import pytest
import torch

from alignlab.losses.preference import bradley_terry_loss, dpo_loss


def softplus(x):  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# A fixed batch of two pairs, beta = 0.5:
#   chosen log-ratios  pc - rc = [1, -1];  rejected log-ratios pr - rr = [-1, 0]
#   logits = [2, -1];  h = beta * logits = [1, -0.5]
PC = torch.tensor([-1.0, -4.0])
PR = torch.tensor([-3.0, -3.0])
RC = torch.tensor([-2.0, -3.0])
RR = torch.tensor([-2.0, -3.0])
BETA = 0.5
H = [1.0, -0.5]


def test_dpo_equal_logratios_is_ln2():
    logps = torch.tensor([-5.0, -7.0, -2.0])
    ref = torch.tensor([-4.0, -9.0, -3.0])
    # policy and reference differ, but chosen and rejected log-ratios are equal -> h = 0
    loss, metrics = dpo_loss(logps, logps, ref, ref, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["rewards/accuracies"].item() == 0.0  # ties are not counted as correct


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", (softplus(-1.0) + softplus(0.5)) / 2),  # -log sigmoid(h)
        ("ipo", ((2 - 1 / (2 * BETA)) ** 2 + (-1 - 1 / (2 * BETA)) ** 2) / 2),  # (1 + 4) / 2
        ("hinge", (max(0.0, 1 - 1.0) + max(0.0, 1 + 0.5)) / 2),  # (0 + 1.5) / 2
        ("robust", (softplus(-1.0) + softplus(0.5)) / 2),  # ls = 0: same as sigmoid
    ],
)
def test_dpo_loss_types_hand_values(loss_type, expected):
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_hand_values_literal():
    # the same numbers written out, so a wrong formula cannot hide in a shared helper
    assert dpo_loss(PC, PR, RC, RR, beta=BETA)[0].item() == pytest.approx(0.6436693, rel=1e-6)
    assert dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="ipo")[0].item() == pytest.approx(2.5)
    assert dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="hinge")[0].item() == pytest.approx(0.75)


def test_dpo_label_smoothing_follows_formula():
    ls = 0.1
    # cDPO: -(1-ls) log s(h) - ls log s(-h) = softplus(-h) + ls * h   (since log s(-h) = log s(h) - h)
    expected = [(1 - ls) * softplus(-h) + ls * softplus(h) for h in H]
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=ls)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    plain, _ = dpo_loss(PC, PR, RC, RR, beta=BETA)
    assert (loss - plain).item() == pytest.approx(ls * sum(H) / 2, rel=1e-5)  # + ls * mean(h) = 0.025
    assert loss.item() == pytest.approx(0.6686693, rel=1e-6)

    # robust: (-(1-ls) log s(h) + ls log s(-h)) / (1 - 2 ls) = softplus(-h) - ls * h / (1 - 2 ls)
    expected_robust = [((1 - ls) * softplus(-h) - ls * softplus(h)) / (1 - 2 * ls) for h in H]
    robust, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="robust", label_smoothing=ls)
    assert robust.item() == pytest.approx(sum(expected_robust) / 2, rel=1e-6)
    assert robust.item() == pytest.approx(0.6124193, rel=1e-6)  # (0.18826169 + 1.03657698) / 2


def test_dpo_metrics():
    _, m = dpo_loss(PC, PR, RC, RR, beta=BETA)
    assert set(m) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    # chosen rewards 0.5 * [1, -1] = [0.5, -0.5]; rejected 0.5 * [-1, 0] = [-0.5, 0]
    assert m["rewards/chosen"].item() == pytest.approx(0.0)
    assert m["rewards/rejected"].item() == pytest.approx(-0.25)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx(0.25)
    assert m["logps/chosen"].item() == pytest.approx(-2.5)
    assert m["logps/rejected"].item() == pytest.approx(-3.0)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc = torch.tensor([-5.0, -1.0], requires_grad=True)
    pr = torch.tensor([-5.0, -9.0], requires_grad=True)
    rc = torch.tensor([-5.0, -2.0])
    rr = torch.tensor([-5.0, -8.0])
    beta = 0.1
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    loss.backward()
    # gradient descent: d loss / d pc < 0 -> pc goes up; d loss / d pr > 0 -> pr goes down
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)
    # exact: dL/dpc = -beta * sigmoid(-h) / B; pair 0 has h = 0 -> -0.1 * 0.5 / 2
    assert pc.grad[0].item() == pytest.approx(-beta * 0.5 / 2, rel=1e-6)
    torch.testing.assert_close(pr.grad, -pc.grad)


def test_dpo_validation():
    args = (PC, PR, RC, RR)
    with pytest.raises(ValueError, match="loss_type.*sigmoid.*ipo.*hinge.*robust"):
        dpo_loss(*args, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, label_smoothing=-0.1)
    dpo_loss(*args, label_smoothing=1.0)  # allowed for sigmoid


def test_bradley_terry_hand_values():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 1.0, 1.0])  # differences [1, -1, 0]
    loss, m = bradley_terry_loss(chosen, rejected)
    expected = (softplus(-1) + softplus(1) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3)  # the tie does not count
    assert m["margin"].item() == pytest.approx(0.0)
    assert m["reward_chosen"].item() == pytest.approx(1.0)
    assert m["reward_rejected"].item() == pytest.approx(1.0)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_bradley_terry_margin_and_centering():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 1.0, 1.0])
    margin = torch.tensor([1.0, 0.0, 0.0])  # pair 0 needed a gap of 1: its term becomes ln 2
    loss, m = bradley_terry_loss(chosen, rejected, margin=margin)
    assert loss.item() == pytest.approx((2 * math.log(2) + softplus(1)) / 3, rel=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3)  # accuracy ignores the margin

    centred, _ = bradley_terry_loss(chosen, rejected, center_rewards_coef=0.01)
    plain, _ = bradley_terry_loss(chosen, rejected)
    # mean((rc + rr)^2) = (9 + 1 + 4) / 3
    assert (centred - plain).item() == pytest.approx(0.01 * 14 / 3, rel=1e-5)


def test_bradley_terry_gradient_separates_rewards():
    chosen = torch.tensor([0.0, 0.5], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0)
    assert chosen.grad[0].item() == pytest.approx(-0.5 / 2)  # -sigmoid(-0) / B
