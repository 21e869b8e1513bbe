"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, written out.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A (r, in), B (out, r), r << min(in, out)

B starts at zero, so an adapted model starts as its base model exactly; only A and B are trained. The
reference model of DPO / GRPO / PPO is then the same module with every adapter switched off
(``adapters_off``): no second copy of the weights in memory.

``LoRALinear`` subclasses ``nn.Linear`` and keeps the base layer's own ``weight`` / ``bias`` (the same
tensors, frozen), so the base keys of the state dict are unchanged and the adapters add
``<name>.lora_A.weight`` / ``<name>.lora_B.weight`` beside them, the names PEFT uses. Two exports:

- merged (``merged_state_dict``): W + (alpha / r) B A, an ordinary checkpoint (``hf.save_hf`` uses it);
- PEFT's format (``save_peft_adapter``): ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, loadable with
  ``peft.PeftModel.from_pretrained(base, dir)`` on the transformers model of the base checkpoint.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

# the projections of a Llama / Qwen block, by their checkpoint names
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    """Which linear layers get adapters, and their shape. Defaults: every projection, r 16, alpha 32."""

    r: int = 16  # rank of the update
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input (training only)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # names of the projections

    def errors(self) -> list[tuple[str, str]]:
        """(key, message) for every invalid field (PolicyModule reports them naming ``model.lora.<key>``)."""
        out = []
        if self.r < 1:
            out.append(("r", f"must be >= 1, got {self.r}"))
        if self.alpha <= 0:
            out.append(("alpha", f"must be > 0, got {self.alpha}"))
        if not 0 <= self.dropout < 1:
            out.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown or not self.target_modules:
            out.append(("target_modules", f"must be a non-empty subset of {list(LORA_TARGETS)}, got "
                                          f"{list(self.target_modules)}"))
        return out


# checkpoints hold it in their hyper-parameters; a plain dataclass, safe for torch.load(weights_only=True)
torch.serialization.add_safe_globals([LoRAConfig])


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` (its own weight and bias, not copied) + scaling * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # no fresh weight: take over the base layer's tensors
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init
        nn.init.zeros_(self.lora_B.weight)  # the update starts at 0: the base model exactly
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as a matrix: scaling * B A, (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.out_features}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every ``nn.Linear`` named in ``cfg.target_modules`` by a LoRALinear around it, freeze all
    other parameters; return the names of the adapted layers. Only lora_A / lora_B stay trainable."""
    model.requires_grad_(False)
    names = []
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if attr in cfg.target_modules and type(module) is nn.Linear:
            setattr(model.get_submodule(parent_name), attr, LoRALinear(module, cfg.r, cfg.alpha, cfg.dropout))
            names.append(name)
    if not names:
        raise ValueError(f"model.lora.target_modules: {cfg.target_modules} match no linear layer of the model")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_off(model: nn.Module):
    """Within the block the model computes its base function (every adapter bypassed)."""
    layers = list(lora_layers(model).values())
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.enabled = on


class AdaptersOff:
    """The base model of a LoRA-adapted one, as a model: calling it runs ``model`` with its adapters off.

    It is the reference of DPO / GRPO / PPO under LoRA. Not an ``nn.Module`` (it owns no weights: they are
    the policy's), so it adds nothing to state dicts, optimizers or ``.to()``; ``eval()`` is a no-op because
    the base path has no dropout (adapter dropout is bypassed with the adapters).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def eval(self) -> AdaptersOff:
        return self


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each adapter merged into its base weight (W + scaling B A) and the
    lora_A / lora_B entries dropped: the state dict of the plain model that computes the same function."""
    state = model.state_dict()
    for name, layer in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        w = state[prefix + "weight"]
        state[prefix + "weight"] = (w.float() + layer.delta_weight().float()).to(w.dtype)
        for key in ("lora_A.weight", "lora_B.weight"):
            del state[prefix + key]
    return state


def save_peft_adapter(model: nn.Module, cfg: LoRAConfig, path, base_model_name_or_path: str | None = None) -> None:
    """Write the adapters of a LoRA-adapted Transformer in PEFT's format (a LoRA for CAUSAL_LM).

    Keys: ours ``layers.0.self_attn.q_proj.lora_A.weight`` -> PEFT's
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (PeftModel wraps LlamaForCausalLM,
    whose decoder is ``model``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in lora_layers(model).items():
        for key in ("lora_A", "lora_B"):
            w = getattr(layer, key).weight
            tensors[f"base_model.model.model.{name}.{key}.weight"] = w.detach().cpu().contiguous()
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with open(path / ADAPTER_CONFIG, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
