import math

import pytest
import torch

from alignlab.losses.policy import (
    LOSS_AGG_MODES,
    aggregate,
    clipped_surrogate,
    clipped_value_loss,
    kl_estimate,
    logp_difference,
    truncated_importance_weights,
)

# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-2.0, -1.0, -3.0]])  # logp - ref = [1, -1, 0]
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.5, 0.5, 0.0]]))
    # k3 with d = ref - logp = [-1, 1, 0]: e^d - d - 1 = [e^-1, e - 2, 0]
    torch.testing.assert_close(
        kl_estimate(logp, ref, "k3"), torch.tensor([[math.exp(-1), math.e - 2, 0.0]])
    )
    torch.testing.assert_close(kl_estimate(logp, ref), kl_estimate(logp, ref, "k3"))  # k3 is the default


def test_k3_is_nonnegative_on_random_inputs():
    logp = -torch.rand(64, 128) * 10
    for scale in (1e-8, 1e-6, 1e-3, 1.0, 5.0):  # tiny differences are where exp(d) - d - 1 goes negative
        ref = logp + torch.randn_like(logp) * scale
        assert (kl_estimate(logp, ref, "k3") >= 0).all()
        assert (kl_estimate(logp, ref, "k2") >= 0).all()


def test_k3_gradient_pulls_policy_toward_reference():
    logp = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0]])
    kl_estimate(logp, ref, "k3").sum().backward()
    # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref - logp)
    torch.testing.assert_close(logp.grad, torch.tensor([[1 - math.exp(-1), 1 - math.e]]))
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] < 0  # descent lowers the too-high logp, raises the low one


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="estimator.*k1.*k2.*k3"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---------------------------------------------------------------- clipped surrogate


def _logp_for(ratios):
    """logp with old_logp = 0 so that exp(logp - old_logp) = ratios."""
    return torch.log(torch.tensor(ratios)).requires_grad_()


def test_clip_higher_ratio_125():
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    adv = torch.tensor([1.0])  # (B,) broadcast to tokens

    # eps_high = 0.28: 1.25 is inside [0.8, 1.28] -> not clipped, loss -r*A, grad -r*A
    logp = _logp_for([[1.25]])
    loss, m = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    assert loss.item() == pytest.approx(-1.25, rel=1e-6)
    assert logp.grad.item() == pytest.approx(-1.25, rel=1e-6)
    assert m["clip_ratio/high"].item() == 0.0

    # eps_high defaults to eps_low = 0.2: 1.25 > 1.2 with A > 0 -> clipped to -1.2 * A, zero gradient
    logp = _logp_for([[1.25]])
    loss, m = clipped_surrogate(logp, old, adv, mask, eps_low=0.2)
    loss.sum().backward()
    assert loss.item() == pytest.approx(-1.2, rel=1e-6)
    assert logp.grad.item() == 0.0
    assert m["clip_ratio/high"].item() == 1.0
    assert m["clip_ratio/low"].item() == 0.0
    assert m["clip_ratio/region"].item() == 1.0


def test_clipped_surrogate_ragged_batch_hand_values():
    # ratios, row 1's last token is padding; A = [1, -2] per sequence
    logp = _logp_for([[1.25, 0.7, 1.1], [0.7, 1.5, 1.0]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    loss, m = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # row 0 (A=1):  -min(rA, clip(r)A) = [-1.25, -0.7 (r low but A>0: not clipped), -1.1]
    # row 1 (A=-2): r=0.7 -> -min(-1.4, -1.6) = 1.6 (clipped); r=1.5 -> -min(-3.0, -2.56) = 3.0 (not clipped)
    expected = torch.tensor([[-1.25, -0.7, -1.1], [1.6, 3.0, 0.0]])
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    # unclipped tokens: d/dlogp (-A r) = -A r; clipped and padded tokens: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.25, -0.7, -1.1], [0.0, 3.0, 0.0]]))
    assert m["clip_ratio/low"].item() == pytest.approx(1 / 5)
    assert m["clip_ratio/high"].item() == 0.0
    assert m["clip_ratio/region"].item() == pytest.approx(1 / 5)
    assert m["ratio/mean"].item() == pytest.approx((1.25 + 0.7 + 1.1 + 0.7 + 1.5) / 5)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())

    # token-level advantages give the same result as the (B,) broadcast
    loss_tok, _ = clipped_surrogate(logp.detach(), old, adv[:, None].expand(2, 3), mask, 0.2, 0.28)
    torch.testing.assert_close(loss_tok, expected)


def test_ratio_one_gives_minus_advantage():
    # one update per rollout: r == 1, so the loss is -A per token (GRPO's loss starts at ~0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    logp = torch.randn(4, 3)
    loss, m = clipped_surrogate(logp, logp.clone(), adv, torch.ones(4, 3))
    torch.testing.assert_close(loss, -adv[:, None].expand(4, 3))
    assert m["ratio/mean"].item() == 1.0 and m["clip_ratio/region"].item() == 0.0


def test_dual_clip():
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    logp = _logp_for([[5.0, 2.0, 5.0]])
    loss, _ = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, dual_clip=3.0)
    # A<0, r=5: standard loss -min(-5, -1.2) = 5, capped at -3 * A = 3
    # A<0, r=2: standard loss 2 < 3, unchanged
    # A>0, r=5: clipped to -1.2, dual clip does not apply
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -1.2]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 2.0, 0.0]]))

    plain, _ = clipped_surrogate(logp.detach(), old, adv, mask, eps_low=0.2)
    torch.testing.assert_close(plain, torch.tensor([[5.0, 2.0, -1.2]]))

    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(logp, old, adv, mask, dual_clip=1.0)


def test_padding_garbage_does_not_leak():
    logp = torch.tensor([[-1.0, 200.0]], requires_grad=True)  # exp(200) overflows fp32
    old = torch.tensor([[-1.0, -200.0]])
    mask = torch.tensor([[1, 0]])
    loss, m = clipped_surrogate(logp, old, torch.tensor([1.0]), mask)
    aggregate(loss, mask, "token-mean").backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert loss[0, 1].item() == 0.0 and logp.grad[0, 1].item() == 0.0
    assert m["ratio/mean"].item() == 1.0


# ---------------------------------------------------------------- aggregation

# A ragged batch: lengths 4, 1 and 0.
VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [8.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_aggregate_modes_hand_values():
    # token-mean: (1 + 2 + 3 + 4 + 8) / 5 tokens
    assert aggregate(VALUES, MASK, "token-mean").item() == pytest.approx(18 / 5)
    # seq-mean-token-mean: sequence means [2.5, 8, 0 (empty)] / 3 sequences
    assert aggregate(VALUES, MASK, "seq-mean-token-mean").item() == pytest.approx(10.5 / 3)
    assert aggregate(VALUES, MASK).item() == pytest.approx(10.5 / 3)  # the default
    # seq-mean-token-sum-norm: sequence sums [10, 8, 0] / max_len 4, / 3 sequences
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm", max_len=4).item() == pytest.approx(4.5 / 3)
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm", max_len=8).item() == pytest.approx(2.25 / 3)


def test_aggregate_modes_weigh_lengths_as_documented():
    # a long sequence (4 tokens) of 1s and a short one (1 token) of 0s
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(4 / 5)  # long sequence weighs 4x
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(1 / 2)  # each seq: 1/2
    assert aggregate(values, mask, "seq-mean-token-sum-norm", max_len=4).item() == pytest.approx(4 / 8)

    # the gradient is the per-token weight:
    # token-mean 1/5 for every token; seq-mean 1/(B*len); sum-norm 1/(B*max_len)
    grads = {}
    for mode in LOSS_AGG_MODES:
        v = values.clone().requires_grad_()
        aggregate(v, mask, mode, max_len=4).backward()
        grads[mode] = v.grad
    torch.testing.assert_close(grads["token-mean"], mask * (1 / 5))
    torch.testing.assert_close(grads["seq-mean-token-mean"], torch.tensor([[1 / 8] * 4, [1 / 2, 0, 0, 0]]))
    torch.testing.assert_close(grads["seq-mean-token-sum-norm"], mask * (1 / 8))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_minibatches_with_global_normalisers_sum_to_full_batch(mode):
    values = torch.randn(6, 5)
    lengths = torch.tensor([5, 1, 3, 0, 2, 4])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    full = aggregate(values, mask, mode, max_len=5)
    num_tokens, num_seqs = mask.sum(), values.shape[0]
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]  # uneven minibatches (or DDP shards)
    total = sum(
        aggregate(values[p], mask[p], mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=5)
        for p in parts
    )
    torch.testing.assert_close(total, full)
    # without the global counts the minibatch means do not add up to the batch value
    local = sum(aggregate(values[p], mask[p], mode, max_len=5) for p in parts)
    assert not torch.allclose(local, full)


def test_aggregate_empty_sequences_do_not_nan():
    values = torch.full((2, 3), float("nan"))  # whatever sits under the mask is ignored
    mask = torch.zeros(2, 3)
    for mode in LOSS_AGG_MODES:
        assert aggregate(values, mask, mode, max_len=3).item() == 0.0


def test_aggregate_validation():
    with pytest.raises(ValueError, match="token-mean.*seq-mean-token-mean.*seq-mean-token-sum-norm"):
        aggregate(VALUES, MASK, "sum")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm")


# ---------------------------------------------------------------- value loss


def test_clipped_value_loss_hand_values():
    values = torch.tensor([[1.0, 1.0, 2.0, 9.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = clipped_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # t0: V_clip = 0.5 + 0.2 = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69 -> clipped term larger
    # t1: V_clip = 0.7; max((1-0)^2, 0.49) = 1 -> unclipped
    # t2: V = V_old -> both 1, clipped not larger; t3: padding
    torch.testing.assert_close(loss, torch.tensor([[0.5 * 1.69, 0.5, 0.5, 0.0]]))
    assert m["vf_clipfrac"].item() == pytest.approx(1 / 3)
    assert m["vf_clipfrac"].dim() == 0 and not m["vf_clipfrac"].requires_grad
    loss.sum().backward()
    # clipped term wins at t0 and is flat in V -> no gradient; t1: d/dV 0.5 (V-R)^2 = V - R = 1
    assert values.grad[0, 0].item() == 0.0
    assert values.grad[0, 1].item() == pytest.approx(1.0)
    assert values.grad[0, 3].item() == 0.0


# ------------------------------------------------------- rollout correction (truncated importance sampling)


def test_logp_difference_hand_values_on_real_tokens_only():
    logp_old = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, 0.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    m = logp_difference(logp_old, sampler, mask)  # |d| on real tokens: 0.5, 1.0, 0.0
    torch.testing.assert_close(m["logp_difference/mean"], torch.tensor(0.5))
    torch.testing.assert_close(m["logp_difference/max"], torch.tensor(1.0))
    empty = logp_difference(logp_old, sampler, torch.zeros_like(mask))
    assert float(empty["logp_difference/mean"]) == 0.0 and float(empty["logp_difference/max"]) == 0.0


def test_token_tis_hand_values_and_cap():
    logp_old = torch.tensor([[-1.0, -1.0, -1.0, 0.0]])
    sampler = torch.tensor([[-1.0, -1.5, 1.0, 0.0]])  # log-ratios 0, 0.5, -2, (padding)
    mask = torch.tensor([[1, 1, 1, 0]])
    w, m = truncated_importance_weights(logp_old, sampler, mask, "token", cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.5, math.exp(-2.0), 0.0]]))  # e^0.5 = 1.65 -> capped at 1.5
    torch.testing.assert_close(m["importance_sampling_ratio/max"], torch.tensor(1.5))
    torch.testing.assert_close(m["importance_sampling_ratio/min"], torch.tensor(math.exp(-2.0)))
    assert not w.requires_grad


def test_sequence_tis_is_the_capped_product_over_the_sequence():
    logp_old = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, -2.0, -2.0]])
    sampler = torch.tensor([[-1.2, -1.3, 7.0], [-1.0, -1.0, -1.0]])  # sums: 0.5 (padding left out), -3
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w, m = truncated_importance_weights(logp_old, sampler, mask, "sequence", cap=10.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5)] * 2 + [0.0], [math.exp(-3.0)] * 3]))
    torch.testing.assert_close(m["importance_sampling_ratio/mean"], torch.tensor((math.exp(0.5) + math.exp(-3)) / 2))
    w, _ = truncated_importance_weights(logp_old, sampler, mask, "sequence", cap=1.2)
    assert float(w[0, 0]) == pytest.approx(1.2)


def test_tis_does_not_overflow_and_equal_log_probs_give_weight_one():
    logp = -torch.rand(4, 16)
    mask = torch.ones(4, 16)
    for level in ("token", "sequence"):
        w, _ = truncated_importance_weights(logp, logp, mask, level, cap=3.0)
        assert torch.equal(w, torch.ones(4, 16))
        w, _ = truncated_importance_weights(logp + 500.0, logp, mask, level, cap=3.0)  # exp(8000) would be inf
        assert torch.isfinite(w).all() and torch.allclose(w, torch.full_like(w, 3.0))
    with pytest.raises(ValueError, match="level"):
        truncated_importance_weights(logp, logp, mask, "batch")
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(logp, logp, mask, "token", cap=0.0)
