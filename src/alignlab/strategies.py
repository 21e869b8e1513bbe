"""Strategies: FSDP with one unit per Transformer block, selectable from YAML (configs/trainer/fsdp.yaml)."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy

from alignlab.model.transformer import Block


class BlockFSDP(FSDPStrategy):
    """``FSDPStrategy(auto_wrap_policy={Block})``: every Transformer block is an FSDP unit (its parameters are
    gathered just for its forward/backward), the rest (embeddings, final norm) belongs to the root unit.
    The policy is set here because a set of classes cannot be written in a YAML config."""

    def __init__(self, **kwargs):
        kwargs.setdefault("auto_wrap_policy", {Block})
        super().__init__(**kwargs)
