"""Scalar heads: the Transformer trunk read out as one number per token.

Used twice in the RLHF flow (SFT -> reward model -> PPO):

- reward model: ``ScalarModel.score(ids, mask)`` -> (B,), the head's value at the LAST REAL token of each
  sequence (the EOS that ends the completion), trained with the Bradley-Terry loss (``algorithms/rm.py``);
- PPO critic: ``ScalarModel.forward(ids, mask)`` -> (B, T), a value V_t at every position, initialised
  from the reward model (``ScalarModel.load``) or from the SFT policy (``ScalarModel.from_policy``).

On disk a ScalarModel is an ordinary HF export of its trunk (config.json + model.safetensors + tokenizer,
loadable by ``hf.load_hf`` and by transformers) plus two small files:

    value_head.safetensors   {"weight": (1, C), "bias": (1,)}
    alignlab_scalar.json     {"type": "alignlab.ScalarModel", "dim": C, "head": "value_head.safetensors"}

Only safetensors are read, never pickles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignlab.model.hf import load_hf, save_hf
from alignlab.model.transformer import Transformer

HEAD_WEIGHTS = "value_head.safetensors"
MARKER = "alignlab_scalar.json"


class ScalarHead(nn.Module):
    """Linear C -> 1 with a small init, so that initial values / rewards are close to 0."""

    def __init__(self, dim: int, init_std: float = 0.02):
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)  # (B, T, C) -> (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, whatever the padding side: (B, T) -> (B,)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(-1)


class ScalarModel(nn.Module):
    """A Transformer trunk (its LM head unused) + a ScalarHead on the final hidden states."""

    def __init__(self, trunk: Transformer, head: ScalarHead | None = None):
        super().__init__()
        self.trunk = trunk
        self.head = head if head is not None else ScalarHead(trunk.config.dim).to(trunk.embed_tokens.weight.device)

    @property
    def config(self):
        return self.trunk.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values (B, T) in fp32. Values at pad positions are meaningless; mask them."""
        hidden = self.trunk(input_ids, attention_mask, return_hidden=True)  # (B, T, C)
        return self.head(hidden).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per sequence: the value at its last real token (right or left padding): (B,)."""
        values = self(input_ids, attention_mask)  # (B, T)
        idx = last_token_index(attention_mask)  # (B,)
        return values.gather(1, idx[:, None]).squeeze(1)

    # ----------------------------------------------------------------------------- on disk
    def save(self, path, tokenizer=None, overwrite: bool = False) -> None:
        """Trunk as an HF export (+ tokenizer) and the head as value_head.safetensors + alignlab_scalar.json."""
        path = Path(path)
        save_hf(self.trunk, path, tokenizer=tokenizer, overwrite=overwrite)
        head = {k: v.detach().cpu().contiguous() for k, v in self.head.linear.state_dict().items()}
        save_file(head, str(path / HEAD_WEIGHTS), metadata={"format": "pt"})
        with open(path / MARKER, "w") as f:
            json.dump({"type": "alignlab.ScalarModel", "dim": self.config.dim, "head": HEAD_WEIGHTS}, f, indent=2)
            f.write("\n")

    @staticmethod
    def is_scalar_model(path) -> bool:
        """Does ``path`` hold a saved ScalarModel (rather than a plain policy export)?"""
        return (Path(path) / MARKER).is_file()

    @classmethod
    def load(cls, path, dtype: torch.dtype | None = None) -> ScalarModel:
        """Read a ScalarModel written by ``save`` (trunk and head); safetensors only."""
        path = Path(path)
        if not cls.is_scalar_model(path):
            raise FileNotFoundError(f"{path}: no {MARKER}; this is not an alignlab reward/value model "
                                    f"(use ScalarModel.from_policy to put a fresh head on a policy export)")
        with open(path / MARKER) as f:
            meta = json.load(f)
        trunk = load_hf(path, dtype=dtype)
        if meta.get("dim") != trunk.config.dim:
            raise ValueError(f"{path / MARKER}: dim {meta.get('dim')} != trunk width {trunk.config.dim}")
        state = load_file(str(path / meta.get("head", HEAD_WEIGHTS)))
        head = ScalarHead(trunk.config.dim)
        head.linear.load_state_dict(state)
        return cls(trunk, head.to(trunk.embed_tokens.weight.dtype))

    @classmethod
    def from_policy(cls, path, dtype: torch.dtype | None = None) -> ScalarModel:
        """Trunk from a policy's HF export (e.g. the SFT stage), with a fresh head."""
        trunk = load_hf(path, dtype=dtype)
        return cls(trunk, ScalarHead(trunk.config.dim).to(trunk.embed_tokens.weight.dtype))
