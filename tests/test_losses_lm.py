import math

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from alignlab.losses.lm import (
    HeadLogps, entropy_from_logits, masked_mean, masked_sum, selective_log_softmax, sft_loss,
)

LN = math.log


def _row_logits():
    # softmax([ln 1, ln 2, ln 3]) = [1/6, 2/6, 3/6]
    return torch.tensor([LN(1), LN(2), LN(3)])


def test_selective_log_softmax_hand_values():
    logits = _row_logits().expand(2, 3, 3).clone()  # (B=2, T=3, V=3)
    index = torch.tensor([[0, 1, 2], [2, 2, 0]])
    out = selective_log_softmax(logits, index)
    p = {0: 1 / 6, 1: 2 / 6, 2: 3 / 6}
    expected = torch.tensor([[LN(p[0]), LN(p[1]), LN(p[2])], [LN(p[2]), LN(p[2]), LN(p[0])]])
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, expected)


def test_selective_log_softmax_matches_log_softmax_and_bf16_runs_in_fp32():
    logits = torch.randn(3, 5, 11) * 4
    index = torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index), ref)

    low = logits.bfloat16()
    out = selective_log_softmax(low, index)
    assert out.dtype == torch.float32
    ref_low = torch.log_softmax(low.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref_low)


def test_selective_log_softmax_gradient_is_onehot_minus_softmax():
    logits = _row_logits().view(1, 1, 3).clone().requires_grad_()
    selective_log_softmax(logits, torch.tensor([[2]])).sum().backward()
    torch.testing.assert_close(logits.grad.view(3), torch.tensor([-1 / 6, -2 / 6, 1 - 3 / 6]))


def test_entropy_hand_values():
    uniform = torch.zeros(1, 1, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.tensor([[LN(8)]]))
    # p = [1/4, 3/4]
    two = torch.tensor([LN(1), LN(3)]).view(1, 1, 2)
    expected = -(0.25 * LN(0.25) + 0.75 * LN(0.75))
    torch.testing.assert_close(entropy_from_logits(two), torch.tensor([[expected]]))
    # near one-hot -> ~0
    assert entropy_from_logits(torch.tensor([[[100.0, 0.0, 0.0]]])).item() < 1e-6
    # bf16 in, fp32 out, same value
    logits = torch.randn(2, 3, 7)
    out = entropy_from_logits(logits.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, entropy_from_logits(logits.bfloat16().float()))


def test_masked_mean_and_sum():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_sum(x, mask).item() == 3.0
    assert masked_mean(x, mask).item() == 1.5
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 0.0]))  # empty row -> 0
    torch.testing.assert_close(masked_sum(x, mask.bool(), dim=0), torch.tensor([1.0, 2.0, 0.0]))
    torch.testing.assert_close(masked_mean(x, mask.float(), dim=0), torch.tensor([1.0, 2.0, 0.0]))
    assert masked_mean(x, torch.zeros_like(x)).item() == 0.0  # no NaN when nothing is selected
    # garbage (inf / nan) under the mask does not leak
    bad = x.clone()
    bad[1] = torch.tensor([float("inf"), float("nan"), -float("inf")])
    assert masked_mean(bad, mask).item() == 1.5
    # float weights are weights
    assert masked_mean(torch.tensor([1.0, 3.0]), torch.tensor([0.25, 0.75])).item() == 2.5


def test_sft_loss_hand_value_and_mask():
    logits = _row_logits().expand(1, 3, 3).clone().requires_grad_()
    labels = torch.tensor([[2, 0, -100]])  # the masked label is an ignore id: never read
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = sft_loss(logits, labels, mask)
    expected = (-LN(3 / 6) - LN(1 / 6)) / 2  # = ln(12) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert metrics["num_tokens"].item() == 2
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    loss.backward()
    assert torch.all(logits.grad[0, 2] == 0)  # masked position gets no gradient
    # d/dlogits of -log p(label) / N = (softmax - onehot) / N
    softmax, onehot = torch.tensor([1 / 6, 2 / 6, 3 / 6]), torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(logits.grad[0, 0], (softmax - onehot) / 2)


def test_sft_loss_equals_cross_entropy_on_masked_tokens():
    logits = torch.randn(3, 6, 10)
    labels = torch.randint(0, 10, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    loss, _ = sft_loss(logits, labels, mask)
    ref = torch.nn.functional.cross_entropy(logits[mask.bool()], labels[mask.bool()])
    torch.testing.assert_close(loss, ref)


def _head_reference(hidden, weight, index, temperature):
    """The formula as autograd differentiates it: logits, / temperature, gather - logsumexp."""
    logits = (hidden @ weight.T).float()
    return selective_log_softmax(logits / temperature if temperature != 1.0 else logits, index)


@pytest.mark.parametrize("temperature, dtype, autocast, frozen", [
    (1.0, torch.float32, False, False), (0.7, torch.float32, False, False),  # fp32, sampling temperature
    (1.0, torch.float32, False, True),  # a frozen head (LoRA): no weight gradient asked for
    (1.0, torch.float32, True, False),  # bf16 autocast (fp32 weights), as bf16-mixed training runs it
    (0.7, torch.bfloat16, False, False),  # bf16 weights
])
def test_head_logps_equal_autograd_of_the_formula_to_the_bit(temperature, dtype, autocast, frozen):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(101, 16, generator=g).to(dtype).requires_grad_(not frozen)
    index, grad = torch.randint(0, 101, (37,), generator=g), torch.randn(37, generator=g)
    inputs = (hidden,) if frozen else (hidden, weight)
    results = []
    for fn in (_head_reference, HeadLogps.apply):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(hidden, weight, index, temperature)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    assert results[0][0].dtype == results[1][0].dtype == torch.float32
    for want, got in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


class LargeAllocations(TorchDispatchMode):
    """Counts the op results of at least ``numel`` elements in fresh memory (not an input's: in-place ops
    and views excluded)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.numel() >= self.numel \
                and out.untyped_storage().data_ptr() not in inputs:
            self.count += 1
        return out


def test_head_logps_backward_allocates_no_vocabulary_wide_tensor_and_runs_once():
    hidden, weight = torch.randn(64, 8, requires_grad=True), torch.randn(512, 8, requires_grad=True)
    index = torch.randint(0, 512, (64,))
    counts = []
    for fn in (_head_reference, HeadLogps.apply):
        out = fn(hidden, weight, index, 1.0).sum()
        with LargeAllocations(64 * 512) as mode:
            out.backward()
        counts.append(mode.count)
    assert counts[0] >= 3 and counts[1] == 0  # autograd: one-hot scatter, exp, product, sum; here: none
    out = HeadLogps.apply(hidden, weight, index, 1.0).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="consumed by an earlier backward"):
        out.backward()
