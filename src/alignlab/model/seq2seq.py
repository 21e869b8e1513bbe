"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017), read top-down.

Pieces, smallest first, in the order of the paper's Figure 1:
config -> sinusoidal positional encoding -> multi-head attention (one module for encoder self-attention,
masked decoder self-attention and encoder-decoder cross-attention) -> position-wise feed-forward (ReLU)
-> residual + LayerNorm sub-layer ("Add & Norm") -> encoder layer / decoder layer -> stacks -> model
(embeddings scaled by sqrt(d_model), output projection tied to the embedding) -> cached decoding.

What differs from the decoder-only ``transformer.py`` (and why it is not shared): absolute sinusoidal
positions added to the embeddings instead of RoPE, LayerNorm instead of RMSNorm, ReLU FFN instead of
SwiGLU, biases everywhere, post-norm ``LayerNorm(x + Dropout(Sublayer(x)))`` by default (pre-norm with
``norm_first=True``). The SDPA call pattern, the left-padding position rule (``position_ids_from_mask``)
and the sampler, the EOS/mask bookkeeping and the output type of ``generate.py`` (``Sampler``,
``Completions``, ``GenerationOutput``) are reused.

Shapes: B batch, S source length, T target length (queries), K key length, H heads, D head dim,
C model dim (d_model), F feed-forward dim (d_ff), V vocab.

Padding: sources may be left- or right-padded; ``src_mask`` (B, S) marks real tokens with 1. Source
positions are counted over real tokens only and no query (encoder or decoder) ever attends to a pad source
key, so source padding never changes any output. Targets start with BOS and are right-padded, so the
causal mask alone keeps real target tokens away from target pads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.model.generate import Completions, GenerationOutput, Sampler
from alignlab.model.transformer import position_ids_from_mask


@dataclass
class Seq2SeqConfig:
    """Architecture hyper-parameters. Paper "base": d_model=512, n_heads=8, 6+6 layers, d_ff=2048, dropout 0.1;
    the defaults here are a small model for the built-in digit tasks."""

    vocab_size: int = 128  # shared source/target vocabulary (as the paper's shared BPE vocab)
    d_model: int = 128  # C
    n_heads: int = 4  # H
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 512  # F, inner width of the position-wise FFN
    dropout: float = 0.1  # P_drop: on embeddings + positions and on every sub-layer output
    max_len: int = 256  # longest source or target the positional table covers
    norm_first: bool = False  # False = post-norm (the paper); True = pre-norm (+ final LayerNorm per stack)
    norm_eps: float = 1e-5
    share_embeddings: bool = True  # one embedding matrix for source and target tokens
    tie_output: bool = True  # pre-softmax linear = target embedding matrix (transposed)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even for the sinusoidal encoding")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if min(self.n_encoder_layers, self.n_decoder_layers) < 1:
            raise ValueError("n_encoder_layers and n_decoder_layers must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


# checkpoints hold it in their hyper-parameters; a plain dataclass, safe for torch.load(weights_only=True)
torch.serialization.add_safe_globals([Seq2SeqConfig])


# ------------------------------------------------------------------------------ positional encoding
def sinusoidal_encoding(max_len: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)). (max_len, C)"""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (max_len, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (C/2,)
    angles = pos * inv_freq  # (max_len, C/2)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = angles.sin()
    pe[:, 1::2] = angles.cos()
    return pe.float()


# ----------------------------------------------------------------------------------------- masks
def padding_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean (B, 1, 1, K): True where the key is real. None when nothing is padded (SDPA's fast path)."""
    if key_mask is None or bool(key_mask.all()):
        return None
    return key_mask[:, None, None, :].bool()


def causal_mask(q_len: int, past_len: int, device=None) -> torch.Tensor | None:
    """Boolean (1, 1, T, past + T): query t (at position past + t) sees keys 0 .. past + t.

    None when SDPA's ``is_causal`` is exact: no cache (square, top-left aligned), or one new token (sees all).
    """
    if past_len == 0 or q_len == 1:
        return None
    q_pos = torch.arange(past_len, past_len + q_len, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(past_len + q_len, device=device)[None, :]  # (1, K)
    return (k_pos <= q_pos)[None, None]


# ------------------------------------------------------------------------------------------ cache
class DecoderCache:
    """Decoding state, like ``transformer.KVCache``: self-attention keys/values pre-allocated as
    (L, B, H, max_len, D) and filled one step at a time; cross-attention keys/values (B, H, S, D) per
    layer, projected from the encoder output once, on the first step, and reused on every later step."""

    def __init__(self, cfg: Seq2SeqConfig, batch_size: int, max_len: int, dtype, device):
        shape = (cfg.n_decoder_layers, batch_size, cfg.n_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.n_decoder_layers
        self.length = 0  # target positions filled so far
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) after the filled part; return all keys/values so far (B, H, K, D)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"decoder cache of length {self.max_len} is full (needs {end})")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


# -------------------------------------------------------------------------------------- attention
class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = softmax(Q W_i^Q (K W_i^K)^T / sqrt(d_k)) V W_i^V.

    Three uses (Figure 1): encoder self-attention (queries, keys, values = encoder states, source padding
    masked), masked decoder self-attention (``causal=True``; keys/values cached while decoding) and
    cross-attention (``cross=True``: queries from the decoder, keys/values from the encoder output
    ``memory``, source padding masked; projected once per sequence when a cache is given).
    """

    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int = 0, causal: bool = False, cross: bool = False):
        super().__init__()
        if causal and cross:
            raise ValueError("cross-attention is never causal: every query may see the whole source")
        self.layer_idx, self.causal, self.cross = layer_idx, causal, cross
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model)  # W^O

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) queries; memory (B, S, C) encoder output (cross-attention only);
        mask boolean, broadcastable to (B, H, T, K), True = may attend. -> (B, T, C)"""
        B, T, _ = x.shape
        q = self.heads(self.q_proj(x))  # (B, H, T, D)
        if self.cross:
            if cache is not None and cache.cross[self.layer_idx] is not None:
                k, v = cache.cross[self.layer_idx]  # (B, H, S, D), computed on the first step
            else:
                k, v = self.heads(self.k_proj(memory)), self.heads(self.v_proj(memory))  # (B, H, S, D)
                if cache is not None:
                    cache.cross[self.layer_idx] = (k, v)
        else:
            k, v = self.heads(self.k_proj(x)), self.heads(self.v_proj(x))  # (B, H, T, D)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, H, K, D), K = past + T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None and T > 1 and k.shape[2] == T,
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, applied to each position separately."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.linear2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class AddNorm(nn.Module):
    """A residual sub-layer ("Add & Norm" in Figure 1).

    post-norm (the paper): LayerNorm(x + Dropout(Sublayer(x)))
    pre-norm (option):     x + Dropout(Sublayer(LayerNorm(x)))   -- trains without warm-up at depth
    """

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


# ------------------------------------------------------------------------------------------ layers
class EncoderLayer(nn.Module):
    """Multi-head self-attention -> Add & Norm -> feed forward -> Add & Norm."""

    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg, layer_idx)
        self.attn_norm = AddNorm(cfg)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = AddNorm(cfg)

    def forward(self, x: torch.Tensor, src_attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x, lambda h: self.self_attn(h, mask=src_attn_mask))  # (B, S, C)
        return self.ffn_norm(x, self.ffn)


class DecoderLayer(nn.Module):
    """Masked multi-head self-attention -> Add & Norm -> cross-attention over the encoder output ->
    Add & Norm -> feed forward -> Add & Norm."""

    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg, layer_idx, causal=True)
        self.self_attn_norm = AddNorm(cfg)
        self.cross_attn = MultiHeadAttention(cfg, layer_idx, cross=True)
        self.cross_attn_norm = AddNorm(cfg)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = AddNorm(cfg)

    def forward(self, x, memory, self_mask, cross_mask, cache: DecoderCache | None) -> torch.Tensor:
        x = self.self_attn_norm(x, lambda h: self.self_attn(h, mask=self_mask, cache=cache))  # (B, T, C)
        x = self.cross_attn_norm(x, lambda h: self.cross_attn(h, memory, mask=cross_mask, cache=cache))
        return self.ffn_norm(x, self.ffn)


# ------------------------------------------------------------------------------------------- model
class Seq2SeqTransformer(nn.Module):
    """Embeddings * sqrt(d_model) + positional encoding -> N encoder layers -> (memory) ->
    N decoder layers -> linear (tied to the embedding) -> softmax (in the loss / sampler)."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.config = cfg
        self.tgt_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.src_embed = self.tgt_embed if cfg.share_embeddings else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.register_buffer("pe", sinusoidal_encoding(cfg.max_len, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_decoder_layers))
        # pre-norm leaves each stack's output un-normalised: one final LayerNorm per stack (post-norm needs none)
        self.encoder_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self.out_proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_output:
            self.out_proj.weight = self.tgt_embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, zero biases, LayerNorm at (1, 0); embeddings N(0, d_model^-1/2) so that
        the scaled embedding sqrt(d_model) * E[x] has unit variance, like the positional encoding."""
        for name, p in self.named_parameters():
            if name.endswith("embed.weight"):
                nn.init.normal_(p, std=self.config.d_model**-0.5)
            elif p.dim() >= 2:
                nn.init.xavier_uniform_(p)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, table: nn.Embedding, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Dropout(sqrt(d_model) * E[ids] + PE[positions]). (B, T) -> (B, T, C)"""
        if int(position_ids.max()) >= self.config.max_len:
            raise ValueError(f"position {int(position_ids.max())} >= max_len={self.config.max_len}")
        return self.dropout(table(ids) * math.sqrt(self.config.d_model) + self.pe[position_ids])

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source (B, S) -> memory (B, S, C). Positions count real tokens only, so padding shifts nothing."""
        B, S = src_ids.shape
        if src_mask is None:
            position_ids = torch.arange(S, device=src_ids.device).expand(B, S)
        else:
            if not bool(src_mask.any(-1).all()):
                raise ValueError("every source row needs at least one real token (src_mask row of zeros)")
            position_ids = position_ids_from_mask(src_mask)  # (B, S)
        mask = padding_mask(src_mask)  # (B, 1, 1, S) or None
        x = self.embed(self.src_embed, src_ids, position_ids)  # (B, S, C)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def decode(
        self,
        tgt_ids: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Target prefix (B, T) starting with BOS (right-padded, or the next token when cached) + memory
        (B, S, C) -> logits (B, T, V): position t predicts target token t + 1."""
        B, T = tgt_ids.shape
        past = cache.length if cache is not None else 0
        position_ids = torch.arange(past, past + T, device=tgt_ids.device).expand(B, T)  # (B, T)
        self_mask = causal_mask(T, past, tgt_ids.device)  # None -> SDPA is_causal (or one new token)
        cross_mask = padding_mask(src_mask)  # (B, 1, 1, S) or None
        x = self.embed(self.tgt_embed, tgt_ids, position_ids)  # (B, T, C)
        for layer in self.decoder_layers:
            x = layer(x, memory, self_mask, cross_mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.decoder_norm(x)
        return x if return_hidden else self.out_proj(x)  # (B, T, V)

    def forward(
        self,
        src_ids: torch.Tensor,
        src_mask: torch.Tensor | None,
        tgt_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) for the target prefix ``tgt_ids`` (BOS + y_<t) given the source."""
        return self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask)

    # --------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(
        self,
        src_ids: torch.Tensor,
        src_mask: torch.Tensor | None,
        max_new_tokens: int,
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
        greedy: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> GenerationOutput:
        """Encode once, then decode one token per step from BOS on the cache, until every row emitted EOS.

        Returns ``GenerationOutput`` as ``generate.generate`` does (completion ids without BOS, mask up to
        and including EOS, log-probs of the chosen tokens under softmax(logits / temperature)).
        Call in eval mode (dropout off).
        """
        choose = Sampler(temperature, top_k, top_p, greedy, generator)
        if max_new_tokens > self.config.max_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} > max_len={self.config.max_len}")
        B, device = src_ids.shape[0], src_ids.device
        memory = self.encode(src_ids, src_mask)  # (B, S, C), once
        cache = DecoderCache(self.config, B, max_new_tokens, memory.dtype, device)
        out = Completions(B, max_new_tokens, eos_token_id, pad_token_id, device)
        step_ids = torch.full((B, 1), bos_token_id, dtype=torch.long, device=device)  # (B, 1)
        for t in range(max_new_tokens):
            logits = self.decode(step_ids, memory, src_mask, cache=cache)[:, -1]  # (B, V)
            next_tok, logp = choose(logits)
            if out.add(t, next_tok, logp):
                break
            step_ids = next_tok[:, None]
        return out.output()

    # ------------------------------------------------------------------------------- save / load
    def save(self, path, tokenizer=None) -> None:
        """config.json (``Seq2SeqConfig`` fields) + model.safetensors (+ tokenizer files) in ``path``.

        Tied / shared matrices are stored once (safetensors refuses shared storage) and re-tied on load.
        Not a ``transformers`` architecture: load it back with ``Seq2SeqTransformer.load``.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if (path / "model.safetensors").exists():
            raise FileExistsError(f"{path / 'model.safetensors'} already exists; not overwriting it")
        path.mkdir(parents=True, exist_ok=True)
        seen, tensors = set(), {}
        for name, t in self.state_dict(keep_vars=True).items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            tensors[name] = t.detach().cpu().contiguous()
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg = {"architectures": ["alignlab.Seq2SeqTransformer"], **self.config.to_dict()}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            cfg[key] = getattr(tokenizer, key, None)
        (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    @classmethod
    def load(cls, path) -> Seq2SeqTransformer:
        """Build from a directory written by ``save`` (weights through safetensors, never pickle)."""
        from safetensors.torch import load_file

        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        if raw.get("architectures") != ["alignlab.Seq2SeqTransformer"]:
            raise ValueError(f"{path}: not an alignlab Seq2SeqTransformer export "
                             f"(architectures={raw.get('architectures')})")
        fields = Seq2SeqConfig.__dataclass_fields__
        model = cls(Seq2SeqConfig(**{k: v for k, v in raw.items() if k in fields}))
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        seen, aliases = set(), set()  # names of tied / shared matrices, stored once under their first name
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) in seen:
                aliases.add(name)
            seen.add(id(t))
        if unexpected or set(missing) - aliases:
            raise ValueError(f"{path}: weights do not match the config "
                             f"(missing {missing}, unexpected {unexpected})")
        return model
