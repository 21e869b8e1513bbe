"""An int8 copy of a Transformer, for sampling rollouts only (``model.rollout_engine: int8``).

W8A8 dynamic quantization with SmoothQuant's migration, written out. Every linear layer y = x W^T + b
of the copy first moves part of its input's range into its weight, per input channel k,

    c_k = max|x_k|^alpha / max_n|W_nk|^(1 - alpha),       y = (x / c) (W c)^T + b      (exact),

where max|x_k| is measured on calibration inputs (the rollout's prompts, run through the trainer's model):
a few channels of a real checkpoint's activations are 10-100x larger than the rest, and without c they would
take the int8 range of every token. Then W c (N, K) is held in int8 with one scale per output channel n,

    s_n = max_k |(W c)_nk| / 127,        Wq_nk = round((W c)_nk / s_n)   in [-127, 127],

and the input x / c is quantized the same way per row (token) m, on the fly, at every call,

    t_m = max_k |x_mk / c_k| / 127,      xq_mk = round(x_mk / (c_k t_m)),

so that

    y_mn ~= t_m s_n sum_k xq_mk Wq_nk + b_n

with the sum over k done exactly, in int32 (``torch._int_mm``: int8 x int8 products, 4x the values per
vector instruction of fp32). Each factor is off by at most half a step (s_n / 2, t_m / 2). Per-row scales
make a row's result independent of the other rows in the batch, so the copy's log-prob of a token does not
depend on whether it was decoded step by step or scored in one pass. Measured on SmolLM2-135M: 2x our fp32
sampler, log-probs of sampled tokens off by a few hundredths (docs/scaling.md).

Everything else of the copy (embedding, RMSNorm, RoPE, attention over the KV cache, softmax) stays fp32.
The copy is not the trainer's model: its log-probs are not pi_old. The trainer therefore recomputes pi_old
itself and the truncated importance weights of ``model.rollout_correction`` correct for the difference
(``OnPolicyModule.correct_rollout``, as for vLLM). CPU only (``torch._int_mm``'s CUDA kernel has shape limits;
on GPUs use the vLLM engine). The speed needs an int8 dot-product instruction (AVX-VNNI, AVX512-VNNI, AMX): on
an AVX2-only CPU such as AMD Zen 3, ``torch._int_mm`` takes a slow path, ~20x slower than an fp32 matmul, and
the copy makes sampling slower, not faster; ``int8_matmul_speedup`` measures this and the engine warns.
"""

from __future__ import annotations

import functools
import statistics
import timeit
from dataclasses import dataclass

import torch
from torch import nn

from alignlab.model.lora import merged_state_dict
from alignlab.model.transformer import Transformer

QMAX = 127  # symmetric int8: -128 is never used, so -x quantizes to -q
TINY = 1e-5  # floor of max|x_k| and max|W_k| in the migration factors (a channel that is always 0)


@dataclass
class Int8Config:
    """Options of the int8 rollout engine (``model.int8``)."""

    smoothing: float = 0.5  # SmoothQuant's alpha: 0 = no migration (c = 1), 1 = all of the input's range moved
    head: bool = True  # quantize the LM head too (49152 x 576 on SmolLM2: a fifth of a decode step's FLOPs)

    def errors(self) -> list[tuple[str, str]]:
        """(key, message) for every invalid field (reported as ``model.int8.<key>``)."""
        return [] if 0 <= self.smoothing <= 1 else [("smoothing", f"must be in [0, 1], got {self.smoothing}")]


torch.serialization.add_safe_globals([Int8Config])  # held in checkpoints' hyper-parameters


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (xq (M, K) int8, scale (M, 1) fp32) with x ~= xq * scale, |x - xq * scale| <= scale / 2.
    An all-zero row gets scale 1 (and xq 0)."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


@functools.lru_cache(maxsize=None)
def int8_matmul_speedup(m: int = 64, k: int = 576, n: int = 1536, repeats: int = 5) -> float:
    """fp32 matmul time / ``torch._int_mm`` time (medians of ``repeats``) at one (m, k) x (k, n) shape, with the
    current threads: > 1 where int8 pays (a CPU with an int8 dot-product instruction), ~0.03-0.05 on an
    AVX2-only CPU (AMD Zen 3, measured). Once per process and shape (a few ms to ~100 ms)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-QMAX, QMAX + 1, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-QMAX, QMAX + 1, (n, k), dtype=torch.int8, generator=g)
    af, wf = a.float(), w.float()

    def median_s(fn) -> float:
        fn()  # warm-up (kernel selection, first-touch of the output)
        return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))

    with torch.inference_mode():
        return median_s(lambda: af @ wf.T) / median_s(lambda: torch._int_mm(a, w.T))


class Int8Linear(nn.Module):
    """``nn.Linear``'s y = x W^T + b with W c in int8 per output channel and x / c quantized per row at each
    call (c: the migration factors from ``input_amax``, max|x_k| per input channel; None = no migration);
    the output is fp32. Holds no parameters (a sampler's copy is never trained)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 input_amax: torch.Tensor | None = None, smoothing: float = 0.5):
        super().__init__()
        weight = weight.detach().float()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        c = None
        if input_amax is not None and smoothing > 0:
            w_amax = weight.abs().amax(0).clamp(min=TINY)
            c = input_amax.float().clamp(min=TINY).pow(smoothing) / w_amax.pow(1 - smoothing)
            weight = weight * c
        wq, scale = quantize_rows(weight)
        self.register_buffer("weight_int8", wq)  # (N, K)
        self.register_buffer("weight_scale", scale.view(1, -1))  # (1, N)
        self.register_buffer("input_divisor", c)  # (K,) or None
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        xq, t = quantize_rows(x2 if self.input_divisor is None else x2 / self.input_divisor)
        y = torch._int_mm(xq, self.weight_int8.T).to(torch.float32).mul_(t).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """(Wq s) / c (N, K): the weight this layer computes with, up to the rounding of its inputs."""
        w = self.weight_int8.float() * self.weight_scale.T
        return w if self.input_divisor is None else w / self.input_divisor

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"smoothed={self.input_divisor is not None}")


@torch.inference_mode()
def input_amax(model: Transformer, names: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """max|x_k| per input channel of each module in ``names`` over one forward of ``model`` on the (real tokens
    of the) prompts; the LM head sees the last position's (the one the first token is sampled from)."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            out[name] = a if name not in out else torch.maximum(out[name], a)
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        model(prompt_ids, prompt_mask, logits_to_keep=1)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: a.clone() for n, a in out.items()}


def int8_copy(model: Transformer, config: Int8Config | None = None, calibration: tuple | None = None) -> Transformer:
    """A new Transformer computing ``model``'s function (LoRA merged) with every linear layer an ``Int8Linear``
    (the LM head too if ``config.head``), migrated with the input ranges of ``model`` on ``calibration``
    (prompt_ids, prompt_mask) if given; everything else an fp32 copy. ``model`` is not changed and shares no
    storage with the copy."""
    config = config or Int8Config()
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("model.rollout_engine: int8 samples on the CPU (torch._int_mm); on a GPU use vllm")
    with torch.device("meta"):
        copy = Transformer(model.config)
    linear = [n for n, m in copy.named_modules() if isinstance(m, nn.Linear) and (config.head or n != "lm_head")]
    amax = input_amax(model, linear, *calibration) if calibration is not None else {}
    state = merged_state_dict(model)
    copy.rotary = type(model.rotary)(model.config)  # its inv_freq is a non-persistent buffer: built anew
    for n in linear:
        copy.set_submodule(n, Int8Linear(state[f"{n}.weight"], state.get(f"{n}.bias"), amax.get(n), config.smoothing))
    quantized = {f"{n}.{k}" for n in linear for k in ("weight", "bias")}
    tied = model.config.tie_embeddings and not config.head
    rest = {k: v.detach().float().clone() for k, v in state.items()
            if k not in quantized and not (tied and k == "lm_head.weight")}
    copy.load_state_dict(rest, strict=False, assign=True)
    if tied:
        copy.lm_head.weight = copy.embed_tokens.weight
    copy.eval()
    copy.requires_grad_(False)
    return copy


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a module's tensors (parameters and buffers, each storage once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
