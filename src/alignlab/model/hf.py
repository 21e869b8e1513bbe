"""Hugging Face checkpoints <-> our Transformer: Llama, Mistral, Qwen2 and Qwen3.

The two entry points: ``load_hf(path, dtype=None)`` builds a ``Transformer`` from a checkpoint directory and
``save_hf(model, path, tokenizer=None, overwrite=False)`` writes one (``transformer.py`` itself does no I/O).

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), optionally a tokenizer. Because our module names mirror the HF ones,
the weights are a rename (``model.layers.0.self_attn.q_proj.weight`` -> ``layers.0.self_attn.q_proj.weight``);
all the work is in the config, which this file maps field by field:

    HF config.json                          TransformerConfig
    vocab_size / hidden_size                vocab_size / dim
    num_hidden_layers / num_attention_heads n_layers / n_heads
    num_key_value_heads / head_dim          n_kv_heads / head_dim
    intermediate_size                       hidden_dim
    max_position_embeddings                 max_seq_len
    rope_parameters (v5) or                 rope_theta, rope_scaling
      rope_theta + rope_scaling (v4)
    rms_norm_eps                            norm_eps
    tie_word_embeddings                     tie_embeddings
    qwen2 (always) q/k/v bias               qkv_bias
    qwen3 per-head q/k RMSNorm              qk_norm
    mistral sliding_window;                 sliding_window
      qwen2/3 only with use_sliding_window

Anything the Transformer cannot reproduce exactly (another model_type, a non-SiLU MLP, MLP or output
biases, YaRN / dynamic RoPE, sliding windows on some layers only, quantised weights ...) raises an error
that names the file and the key: a checkpoint either loads exactly or not at all.

Only safetensors are read (no pickle, no ``torch.load``) and no remote code is ever run.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alignlab.model.lora import merged_state_dict
from alignlab.model.transformer import Transformer, TransformerConfig, rope_inv_freq

# model_type -> the transformers class that reads it
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Defaults of the transformers config classes for the optional keys (v5.x)
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}
_SUPPORTED_ROPE = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class _ConfigReader:
    """Reads keys of one config.json; every error names the file and the key."""

    def __init__(self, hf_config: dict, where):
        self.c, self.where = hf_config, where

    def required(self, key: str):
        if self.c.get(key) is None:
            raise ValueError(f"{self.where}: required key {key!r} is missing")
        return self.c[key]

    def get(self, key: str, default=None):
        value = self.c.get(key)
        return default if value is None else value

    def unsupported(self, key: str, why: str):
        return NotImplementedError(
            f"{self.where}: key {key!r} = {self.c.get(key)!r} is not supported ({why})"
        )


def _rope_from_hf(r: _ConfigReader) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from v5 ``rope_parameters`` or v4 ``rope_theta`` + ``rope_scaling``."""
    key = "rope_scaling" if r.c.get("rope_scaling") else "rope_parameters"  # v5 gives rope_scaling priority
    params = dict(r.get(key, {}))
    if any(isinstance(v, dict) for v in params.values()):
        raise r.unsupported(key, "RoPE parameters per layer type")
    theta = float(params.pop("rope_theta", r.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    if kind not in _SUPPORTED_ROPE:
        raise NotImplementedError(
            f"{r.where}: key {key!r} has rope_type {kind!r}, which is not supported "
            f"(supported: {', '.join(_SUPPORTED_ROPE)})"
        )
    partial = params.pop("partial_rotary_factor", r.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise NotImplementedError(
            f"{r.where}: key 'partial_rotary_factor' = {partial!r} is not supported (only 1.0)"
        )
    if kind == "default":
        return theta, None
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", r.required("max_position_embeddings"))
        missing = {"factor", "low_freq_factor", "high_freq_factor"} - params.keys()
        if missing:
            raise ValueError(f"{r.where}: key {key!r} with rope_type 'llama3' lacks {sorted(missing)}")
    elif "factor" not in params:
        raise ValueError(f"{r.where}: key {key!r} with rope_type {kind!r} lacks 'factor'")
    return theta, {"rope_type": kind, **params}


def _sliding_window_from_hf(r: _ConfigReader, model_type: str, n_layers: int) -> int | None:
    if model_type == "mistral":  # one window for every layer (MistralModel ignores layer_types)
        return r.get("sliding_window")
    if model_type == "llama":
        return None
    # Qwen2/Qwen3: the window is used only with use_sliding_window, and then only on the layers marked
    # "sliding_attention" -- by default layers i >= max_window_layers (transformers' Qwen2Config).
    if not r.get("use_sliding_window", False) or r.get("sliding_window") is None:
        return None
    window = r.get("sliding_window")
    types = r.get("layer_types") or [
        "sliding_attention" if i >= r.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layers)
    ]
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"}:
        return window
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    raise NotImplementedError(
        f"{r.where}: keys 'use_sliding_window'/'max_window_layers'/'layer_types' put a sliding window of "
        f"{window} on layers {sliding} only; a window on some layers but not others is not supported"
    )


def config_from_hf(hf_config: dict, path_for_errors="config.json") -> TransformerConfig:
    """Map a Llama / Mistral / Qwen2 / Qwen3 ``config.json`` dict to a TransformerConfig, or raise."""
    r = _ConfigReader(hf_config, path_for_errors)
    model_type = r.required("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise r.unsupported("model_type", f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    archs = r.get("architectures", [])
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise r.unsupported("architectures", "only *ForCausalLM checkpoints have an LM head to load")
    if r.get("hidden_act", "silu") not in ("silu", "swish"):
        raise r.unsupported("hidden_act", "the MLP is SwiGLU: silu only")
    if r.get("mlp_bias", False):
        raise r.unsupported("mlp_bias", "the MLP has no biases")
    if r.get("attention_bias", False):  # llama/qwen3: bias on q, k, v AND o_proj; ours has none on o_proj
        raise r.unsupported("attention_bias", "o_proj has no bias; only Qwen2's q/k/v biases are supported")
    if r.get("quantization_config") is not None:
        raise r.unsupported("quantization_config", "load a full-precision checkpoint")
    if r.get("attention_dropout", 0.0):
        warnings.warn(
            f"{path_for_errors}: attention_dropout={r.get('attention_dropout')} is ignored (no dropout)"
        )

    n_heads = r.required("num_attention_heads")
    dim = r.required("hidden_size")
    default_head_dim = 128 if model_type == "qwen3" else dim // n_heads  # Qwen3Config's default is 128
    n_layers = r.required("num_hidden_layers")
    rope_theta, rope_scaling = _rope_from_hf(r)
    return TransformerConfig(
        vocab_size=r.required("vocab_size"),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=r.get("num_key_value_heads", n_heads),
        head_dim=r.get("head_dim", default_head_dim),
        hidden_dim=r.required("intermediate_size"),
        max_seq_len=r.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type]),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=r.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window_from_hf(r, model_type, n_layers),
    )


def config_to_hf(cfg: TransformerConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict transformers reads back as the same architecture.

    Plain models are written as Llama; a sliding window alone makes them Mistral; q/k/v biases need Qwen2
    and per-head q/k norms need Qwen3 (which has no q/k/v-only bias, so both at once cannot be exported).
    """
    if cfg.qkv_bias and cfg.qk_norm:
        raise NotImplementedError(
            "qkv_bias together with qk_norm has no HF architecture (Qwen3 has no q/k/v bias)"
        )
    model_type = (
        "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
    )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type", "default"))
        rest = {k: v for k, v in cfg.rope_scaling.items() if k not in ("rope_type", "type")}
        rope = {"rope_type": kind, "rope_theta": cfg.rope_theta, **rest}
    out = {
        "architectures": [SUPPORTED_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,  # transformers v5
        "rope_theta": cfg.rope_theta,  # v4 readers (older transformers, vLLM) look here ...
        **(
            {"rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}} if cfg.rope_scaling else {}
        ),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type in ("llama", "qwen3"):
        out["attention_bias"] = False
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3"):
        sliding = cfg.sliding_window is not None
        out.update(
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window,
            max_window_layers=0 if sliding else cfg.n_layers,  # layers i >= max_window_layers slide
            layer_types=[("sliding_attention" if sliding else "full_attention")] * cfg.n_layers,
        )
    return out


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory not found: {path}")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not an HF checkpoint directory")
    with open(config_file) as f:
        return json.load(f)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards listed in model.safetensors.index.json."""
    if (path / WEIGHTS_NAME).is_file():
        files = [path / WEIGHTS_NAME]
    elif (path / INDEX_NAME).is_file():
        with open(path / INDEX_NAME) as f:
            weight_map = json.load(f)["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    else:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = (
            f" (found {pickles}: pickled weights are not loaded; convert them to safetensors)"
            if pickles
            else ""
        )
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found{hint}")
    tensors = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} (listed in {path / INDEX_NAME}) not found")
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[name] = f.get_tensor(name)
    return tensors


def _rename_from_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ours: drop the ``model.`` prefix and the rotary ``inv_freq`` buffers (recomputed)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        out[name.removeprefix("model.")] = t
    return out


def load_hf(path, dtype: torch.dtype | None = None) -> Transformer:
    """Build a Transformer from a local HF checkpoint directory (safetensors only).

    dtype=None keeps the checkpoint's dtype (config ``dtype``/``torch_dtype``, else the stored tensors'),
    like transformers v5's ``dtype="auto"``; pass ``torch.float32`` to train in full precision.
    """
    path = Path(path)
    hf_config = _read_config(path)
    cfg = config_from_hf(hf_config, path / CONFIG_NAME)
    state = _rename_from_hf(_read_tensors(path))

    with torch.device("meta"):  # no random init of weights about to be replaced
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        del expected["lm_head.weight"]
        head = state.pop("lm_head.weight", None)  # some tied checkpoints store the head too
        if head is not None and not torch.equal(head, state.get("embed_tokens.weight", head)):
            raise ValueError(
                f"{path}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens"
            )
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        missing_s, unexpected_s = (f"{n[:8]}{'...' if len(n) > 8 else ''}" for n in (missing, unexpected))
        raise ValueError(
            f"{path}: weights do not match config.json: missing {missing_s}, unexpected {unexpected_s}"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(state[name].shape)}, config.json implies {tuple(shape)}"
            )

    if dtype is None:
        stored = hf_config.get("dtype") or hf_config.get("torch_dtype")
        dtype = _DTYPES.get(stored, state["embed_tokens.weight"].dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # RoPE frequencies stay fp32 whatever the weights' dtype
    model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return model


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under their HF checkpoint names (``model.layers.0.self_attn.q_proj.weight``, ...),
    LoRA merged (W + scaling B A), without ``lm_head.weight`` when the embeddings are tied (HF re-ties it
    from ``tie_word_embeddings``): what ``save_hf`` writes, and what a rollout engine's weight sync sends."""
    out = {}
    for name, t in merged_state_dict(model).items():
        if name != "lm_head.weight":
            out["model." + name] = t
        elif not model.config.tie_embeddings:
            out[name] = t
    return out


def save_hf(model: Transformer, path, tokenizer=None, overwrite: bool = False) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) that transformers' AutoModel loads.

    Refuses to replace existing weights in ``path`` unless ``overwrite=True``. A LoRA-adapted model is written
    merged (W + scaling B A): a plain checkpoint of the same function.
    """
    path = Path(path)
    cfg = model.config
    existing = [p for p in (path / WEIGHTS_NAME, path / INDEX_NAME) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)

    shared = model.lm_head.weight is model.embed_tokens.weight
    if cfg.tie_embeddings and not shared:
        raise ValueError("config.tie_embeddings is true but lm_head.weight is not embed_tokens.weight")
    tensors = {}
    for name, t in hf_state_dict(model).items():
        t = t.detach().cpu().contiguous()
        tensors[name] = t.clone() if name == "lm_head.weight" and shared else t  # safetensors refuses shared storage

    hf_config = config_to_hf(cfg, dtype=model.embed_tokens.weight.dtype)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf_config[key] = getattr(tokenizer, key, None) if tokenizer is not None else None

    if overwrite and (path / INDEX_NAME).exists():  # stale shards would shadow nothing but mislead readers
        with open(path / INDEX_NAME) as f:
            for shard in set(json.load(f)["weight_map"].values()):
                (path / shard).unlink(missing_ok=True)
        (path / INDEX_NAME).unlink()
    tmp = path / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS_NAME)
    with open(path / CONFIG_NAME, "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
