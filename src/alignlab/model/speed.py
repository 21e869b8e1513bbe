"""Speed machinery of the decoder-only Transformer (``transformer.py``): it changes the time, never the math.

Three pieces, each with a plain default that is what the model means:

- packing of real tokens (``Packing``): with padding among the new tokens, every layer but attention runs on
  the N real tokens only; ``packing_for`` picks it, and ``NO_PACKING`` (the identity) is the default;
- prefix/KV sharing (``PrefixCache``): the keys/values of U distinct prompts computed once and attended to
  by the B >= U completions that share them (training); the default is no cache;
- the attention kernel (``attention``): the eager formula softmax(q k^T / sqrt(D) + mask) v on short CPU
  sequences, PyTorch's fused ``F.scaled_dot_product_attention`` otherwise; both compute the same function.

Imports torch only; ``transformer.py`` imports this file, never the other way round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------ packing of real tokens
class Packing:
    """Padding-free compute: the real tokens of a padded (B, T) batch gathered into one (N, ...) tensor.

    Every layer except attention treats tokens independently, so the projections, the MLP and the norms
    run on the N real tokens only; attention needs the (B, T) layout and gets it with ``pad`` (zeros at
    padding, which the attention mask hides) and leaves it with ``unpad``. Both are differentiable.
    """

    def __init__(self, real: torch.Tensor):
        self.shape = real.shape  # (B, T)
        self.index = real.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions of the real tokens

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at padding."""
        B, T = self.shape
        return x.new_zeros(B * T, *x.shape[1:]).index_copy(0, self.index, x).view(B, T, *x.shape[1:])


class NoPacking:
    """The default: tokens stay in their (B, T) layout; ``pad`` and ``unpad`` return their input."""

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return x


NO_PACKING = NoPacking()


def packing_for(attention_mask: torch.Tensor | None, past: int, q_len: int) -> Packing | NoPacking:
    """``Packing`` of the real ones among the q_len new tokens (after ``past`` cached ones) when some of
    them are padding, else ``NO_PACKING``. One new token (decoding) is never packed."""
    if attention_mask is None or q_len == 1:
        return NO_PACKING
    real = attention_mask[:, past : past + q_len].bool()
    return NO_PACKING if bool(real.all()) else Packing(real)


# ------------------------------------------------------------------------------ prefix / KV sharing
class PrefixCache:
    """Keys and values of a shared prefix, kept in the autograd graph (training, not decoding).

    The first forward with this cache stores each layer's keys/values (e.g. of U distinct prompts); after
    ``select_rows(index)`` maps them to B rows, a second forward (the completions) attends to them as its
    past. Gradients of the B rows flow back into the U prefix rows and add up there, so the result equals
    a forward over every row's full sequence, with each prefix computed once.
    """

    def __init__(self):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.k):  # the prefix pass: store (not checkpointed: a recomputation would store twice)
            self.k.append(k)
            self.v.append(v)
            return k, v
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)

    def advance(self, n: int) -> None:
        self.length += n

    def select_rows(self, index: torch.Tensor) -> None:
        """Row b of the next forward attends to prefix row index[b]. (U, ...) -> (B, ...)"""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


# ------------------------------------------------------------------------------ attention kernel
# Below this many keys, attention on the CPU is computed "eagerly" (two matmuls and a softmax). At the
# shapes of a GRPO step (python benchmarks/bench_kernels.py) that is 1.7-1.9x faster than PyTorch's fused CPU
# kernel in bf16 (forward, decoding) and 5x in bf16 forward + backward; in fp32 it is about even (forward
# faster, backward slower in isolation, no difference measured over a whole policy update). Longer
# sequences, and every GPU, use F.scaled_dot_product_attention, which never materialises the (T, S) scores.
EAGER_ATTENTION_MAX_KEYS = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v. q (B, H, T, D), k/v (B, K, S, D), mask (B|1, 1, T, S) bool or None
    (None: causal when T > 1, every key when T == 1). K < H is grouped-query attention: query head h reads
    kv head h // (H / K)."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if q.device.type != "cpu" or S > EAGER_ATTENTION_MAX_KEYS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                              enable_gqa=K != H)
    # the H / K query heads of a kv head are stacked as rows of one matmul against it: the same dot products
    # as expanding k and v to H heads, without copying the cache H / K times (B, K, G * T, D)
    q = q.reshape(B, K, (H // K) * T, D)
    scores = (q @ k.transpose(-1, -2)).view(B, K, H // K, T, S) * D ** -0.5  # (B, K, G, T, S)
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2) if mask.dim() == 4 else ~mask, float("-inf"))
    return (scores.softmax(-1).view(B, K, (H // K) * T, S) @ v).view(B, H, T, D)
