"""A decoder-only Transformer written from torch primitives, read top-down.

Pieces, smallest first: config -> RMSNorm -> rotary embedding (RoPE) -> attention (grouped-query,
optional q/k/v bias as in Qwen2, optional per-head q/k RMSNorm as in Qwen3) -> SwiGLU MLP -> block ->
model, plus a pre-allocated KV cache for decoding.

Module names mirror the Llama/Qwen checkpoints (``layers.N.self_attn.q_proj`` ...) so that loading a
Hugging Face checkpoint (see ``hf.py``) is a rename of the ``model.`` prefix, nothing more.

Shapes: B batch, T query length, S key length (cache + new), H query heads, K kv heads, D head dim,
C model dim, V vocab.

Padding: batches may be left-padded (generation) or right-padded (training). ``attention_mask`` (B, S)
marks real tokens with 1. Positions are counted over real tokens only and no real query ever attends to a
pad key, so padding never changes the logits of real tokens.

Speed machinery lives in ``speed.py``, so that this file reads as the math: packing of real tokens (with
padding in the batch, everything but attention runs on the real tokens only: ``speed.Packing``, the
identity ``speed.NO_PACKING`` by default), a shared prompt's keys/values computed once for its completions
(``speed.PrefixCache``) and the attention kernel (``speed.attention``: the eager formula on short CPU
sequences, fused SDPA otherwise). None of it changes a value. This file imports torch and ``speed.py``
only; Hugging Face checkpoints are read and written by ``hf.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignlab.model import speed


@dataclass
class TransformerConfig:
    """Architecture hyper-parameters (the defaults are a ~6M-parameter model for the built-in tasks)."""

    vocab_size: int = 128
    dim: int = 256  # model width C
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (plain multi-head)
    head_dim: int | None = None  # None = dim // n_heads (Qwen3 sets it explicitly)
    hidden_dim: int | None = None  # SwiGLU width; None = 4 * dim * 2/3 rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None | {"rope_type": "linear"|"llama3", ...} as in HF configs
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    tie_embeddings: bool = True
    sliding_window: int | None = None  # Mistral; None = full causal attention
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = 64 * math.ceil(int(8 * self.dim / 3) / 64)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    def to_dict(self) -> dict:
        return asdict(self)


# checkpoints hold it in their hyper-parameters; a plain dataclass, safe for torch.load(weights_only=True)
torch.serialization.add_safe_globals([TransformerConfig])


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as Llama/Qwen do)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), with the optional Llama-3 / linear context scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # smooth interpolation between low- and high-frequency bands (Llama 3.1)
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_mid, mid, scaled)
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3 are)")


class RotaryEmbedding(nn.Module):
    """RoPE in the 'rotate half' layout used by Llama/Qwen checkpoints.

    cos/sin of every position up to max_seq_len are computed once (fp32, on first use on a device) and
    looked up per forward: recomputing them for every (B, T) position costs more than a layer's matmuls
    on a small model decoding one token at a time. The sin table carries rotate-half's sign (see
    ``apply_rope``).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        self.max_len = cfg.max_seq_len
        self._table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (inv_freq, cos, signed sin)

    def table(self, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and [-sin, sin] (n', D) for positions 0 .. n'-1, n' >= n; rebuilt when inv_freq, the device or
        n changed."""
        t = self._table
        if t is None or t[0] is not self.inv_freq or t[1].device != device or len(t[1]) < n:
            freqs = torch.arange(max(n, self.max_len), device=device).float()[:, None] * self.inv_freq.float()
            sin = freqs.sin()
            self._table = t = (self.inv_freq, torch.cat([freqs, freqs], -1).cos(), torch.cat([-sin, sin], -1))
        return t[1], t[2]

    def forward(self, position_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (B, 1, T, D) at position_ids, all of which are < length (the cached + new tokens)."""
        cos, sin = self.table(position_ids.device, length)
        return cos[position_ids][:, None], sin[position_ids][:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] (x = [x1, x2], halves of the head dim).
    Written [x2, x1] * [-sin, sin]: the sign lives in the table and [x2, x1] is one roll, bitwise the same
    result in one kernel instead of chunk + neg + cat."""
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin).to(x.dtype)


class KVCache:
    """Pre-allocated keys and values for every layer: (L, B, K, max_len, D); no re-allocation per step."""

    def __init__(self, cfg: TransformerConfig, batch_size: int, max_len: int, dtype, device):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far (same for every row: pads are stored too)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) after the filled part; return all keys/values so far (B, K, S, D)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of length {self.max_len} is full (needs {end})")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows where ``keep`` (B,) is True: (L, B, ...) -> (L, B', ...)."""
        self.k, self.v = self.k[:, keep], self.v[:, keep]

    def repeat_rows(self, n: int) -> None:
        """Each row n times in a row, (L, B, ...) -> (L, B*n, ...): a prompt prefilled once, sampled n times."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: KVCache | speed.PrefixCache | None = None,
                packing: speed.Packing | speed.NoPacking = speed.NO_PACKING):
        """softmax(Q K^T / sqrt(D) + mask) V per head, heads concatenated, times W_o: (B, T, C) -> (B, T, C).

        Q = RoPE(x W_q) in H heads, K = RoPE(x W_k) and V = x W_v in K kv heads (each serving H / K query
        heads); with a cache, K and V also hold the past keys/values. With a ``speed.Packing``, x and the
        output are the N real tokens only, (N, C), and ``packing.pad`` / ``unpad`` (identities by default)
        take the heads to the (B, T) layout that attention needs and back.
        """
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim))  # (B, T, H, D)
        k = self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, T, K, D)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, T, K, D)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (packing.pad(t).transpose(1, 2) for t in (q, k, v))  # (B, H|K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D), S = past + T
        y = speed.attention(q, k, v, mask)  # (B, H, T, D) = softmax(q k^T / sqrt(D) + mask) v, GQA
        return self.o_proj(packing.unpad(y.transpose(1, 2).flatten(2)))  # heads concatenated: (B, T, H * D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, packing=speed.NO_PACKING):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, packing)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, sliding_window: int | None
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask: True where query t may attend key s.

    Key s is visible to query t when it is real (attention_mask == 1), not in the future
    (s <= past_len + t) and, with a sliding window, not too far back. Each query also sees itself, so a
    pad query row is never fully masked (its output is garbage that no real token ever reads); this keeps
    SDPA free of NaNs. Returns None when plain causal attention suffices (SDPA's fast path).
    """
    no_pad = attention_mask is None or bool(attention_mask.all())
    if no_pad and past_len == 0 and sliding_window is None:
        return None
    if no_pad and q_len == 1 and sliding_window is None:
        return None  # one new token sees every cached key
    S = past_len + q_len
    device = attention_mask.device if attention_mask is not None else None
    q_pos = torch.arange(past_len, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :S].bool()
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted over real tokens only: left padding shifts nothing. (B, S)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Transformer(nn.Module):
    """Token embedding -> N blocks -> final RMSNorm -> LM head (tied to the embedding or not).

    ``activation_checkpointing = True``: under autograd each block keeps only its input and recomputes its
    activations in the backward (torch.utils.checkpoint, non-reentrant): same values and gradients, memory
    of one block's activations instead of every block's. The prefix pass of a ``speed.PrefixCache`` is
    exempt (it stores keys/values as a side effect, which a recomputation would repeat); the completions
    that attend to it are checkpointed.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rotary = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | speed.PrefixCache | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T', V), or final hidden states (B, T', C) if return_hidden.

        attention_mask (B, past + T): 1 for real tokens, covering the cached positions too when a cache
        is given. logits_to_keep > 0 computes the head only for the last that many positions (T' = it).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        else:
            position_ids = position_ids_from_mask(attention_mask)[:, past : past + T]
        cos, sin = self.rotary(position_ids, past + T)  # positions count real tokens: < past + T
        mask = attention_mask_4d(attention_mask, T, past, self.config.sliding_window)
        packing = speed.packing_for(attention_mask, past, T)  # padding among the new tokens: real ones only
        x = self.embed_tokens(packing.unpad(input_ids))  # (B, T, C), or (N, C) when packed
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and (
            cache is None or isinstance(cache, speed.PrefixCache) and cache.length > 0)
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, cache, packing, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, packing)
        if cache is not None:
            cache.advance(T)
        x = packing.pad(x)  # (B, T, C), zeros at padding
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)
