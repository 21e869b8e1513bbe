"""Batched sampling on the KV cache.

One prefill pass over the (left-padded) prompts fills the cache, then one token per step for every row.
With ``num_samples=G`` each prompt is prefilled once and its cache rows repeated G times (a GRPO group).
Each row stops at EOS (later positions are padding with mask 0); the loop stops when every row is done.
Once a quarter of the rows in the batch are done, they are dropped from it (and from the KV cache), so
a batch of ragged lengths does not keep paying for finished rows.
Returned log-probs are those of the sampled tokens under ``softmax(logits / temperature)`` -- the same
distribution the trainers score, so with one update per rollout ``logp - logp_old`` is exactly 0.
(top-k / top-p only decide which tokens may be drawn; like TRL we do not renormalise the log-probs.)

Both decoders (``generate`` here and ``Seq2SeqTransformer.generate``) choose tokens with one ``Sampler``
and keep them in one ``Completions`` (EOS bookkeeping, completion mask, truncation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch

from alignlab.model.transformer import KVCache, Transformer


@dataclass
class GenerationOutput:
    completion_ids: torch.Tensor  # (B, T_new) sampled tokens, pad after EOS
    completion_mask: torch.Tensor  # (B, T_new) 1 up to and including EOS
    logprobs: torch.Tensor  # (B, T_new) log-prob of each sampled token (0 where masked)
    truncated: torch.Tensor  # (B,) bool: row hit max_new_tokens without emitting EOS

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest top-p nucleus. (B, V)"""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V), drawn by inverting the CDF at a uniform u ~ U[0, 1): the first v
    with cdf_v > u * cdf_V. Exactly the categorical distribution; a zero-probability token (top-k/top-p)
    is never drawn. One random number per row (torch.multinomial: ~10x slower here, benchmarks/bench_kernels.py).
    The rows need not be normalised."""
    return draw(probs.cumsum(-1), generator)


def draw(cdf: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``sample`` given the (unnormalised) cumulative sums cdf (B, V) of each row's probabilities."""
    total = cdf[:, -1:]
    return torch.searchsorted(cdf, below(uniform(total, generator) * total, total), right=True).squeeze(-1)


def uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def below(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """x, made strictly less than total (a u * total that rounds up to the total)."""
    return torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))


BLOCK = 256  # the blocked draw's block width (a real vocabulary is 49152 = 192 blocks)


def draw_blocked(weights: torch.Tensor, generator: torch.Generator | None = None,
                 block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample`` from unnormalised weights (B, V) >= 0 and their row sums (B, 1), in two levels instead of
    one cumulative sum over the whole vocabulary (a sequential scan of B x V: the slowest part of a draw
    at V = 49152): the cumulative sums C of the block sums (C_0 = 0) pick the block j with
    C_j <= u * total < C_{j+1}, and the cumulative sum inside block j picks the token (the last block may
    be shorter). The same inverse CDF at the same u, so the same categorical distribution (a draw differs
    from ``sample``'s only where rounding moves a CDF boundary); a zero-weight token is never drawn, nor
    is a zero-weight block."""
    B, V = weights.shape
    n_full = V // block
    sums = weights[:, : n_full * block].view(B, n_full, block).sum(-1)
    if V > n_full * block:
        sums = torch.cat([sums, weights[:, n_full * block:].sum(-1, keepdim=True)], dim=-1)
    cum = torch.nn.functional.pad(sums, (1, 0)).cumsum_(-1)  # (B, 1 + n_blocks): C_0 = 0, C_1, ...
    total = cum[:, -1:]
    x = below(uniform(total, generator) * total, total)  # x < total: j is a real block, k a real token
    j = torch.searchsorted(cum, x, right=True) - 1  # (B, 1): C_j <= x < C_{j+1}
    idx = j * block + torch.arange(block, device=weights.device)  # (B, block): the tokens of block j
    inside = weights.gather(-1, idx.clamp(max=V - 1)).masked_fill_(idx >= V, 0.0).cumsum_(-1)
    k = torch.searchsorted(inside, below(x - cum.gather(-1, j), inside[:, -1:]), right=True)
    return idx.gather(-1, k).squeeze(-1), total


@dataclass(frozen=True)
class Sampler:
    """How the next token is chosen from logits (B, V): the argmax with ``greedy``, else one draw (``sample``)
    from softmax(logits / temperature) restricted to the top-k / top-p tokens (``filter_logits``)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0 for sampling (got {self.temperature}); "
                             "use greedy=True")

    def __call__(self, logits: torch.Tensor, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen token of each row (B,) and its log-prob (B,) under softmax(logits / temperature), in
        fp32 (greedy: under softmax(logits)): logit - logsumexp(logits), never a full-vocab log-softmax.
        ``work``, an fp32 tensor shaped like logits, receives the draw's weights instead of a new one (the same
        values: see ``DecodeBuffers``)."""
        scaled = logits.float()
        if not self.greedy and self.temperature != 1.0:  # x / 1 == x: the division is skipped, not changed
            scaled = scaled / self.temperature
        if self.greedy:
            next_tok, lse = scaled.argmax(-1), scaled.logsumexp(-1)
        elif self.top_k or self.top_p < 1.0:
            next_tok = sample(filter_logits(scaled, self.top_k, self.top_p).softmax(-1), self.generator)
            lse = scaled.logsumexp(-1)
        else:  # one pass serves the draw and the normaliser: the weights exp(scaled - max) sum to exp(lse - max)
            top = scaled.amax(-1, keepdim=True)
            weights = torch.sub(scaled, top, out=work).exp_() if work is not None else (scaled - top).exp_()
            if weights.shape[-1] >= 4 * BLOCK:  # a real vocabulary: two short scans instead of one long one
                next_tok, total = draw_blocked(weights, self.generator)
            else:
                cdf = weights.cumsum_(-1)
                next_tok, total = draw(cdf, self.generator), cdf[:, -1:]
            lse = (top + total.log()).squeeze(-1)
        return next_tok, scaled.gather(-1, next_tok[:, None]).squeeze(-1) - lse


class Completions:
    """The tokens chosen so far for B rows, one step at a time; a row is done once it chose EOS, and every
    later step of it holds padding (log-prob 0). ``output`` adds the completion mask and truncation."""

    def __init__(self, batch_size: int, max_new_tokens: int, eos_token_id: int, pad_token_id: int, device):
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.tokens = torch.full((batch_size, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(batch_size, max_new_tokens, device=device)
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.n_steps = 0

    def add(self, t: int, next_tok: torch.Tensor, logp: torch.Tensor, rows=slice(None)) -> bool:
        """Step t's tokens and log-probs (B',) of the batch rows ``rows`` (all by default); True when every
        row is done."""
        was_done = self.done[rows]
        self.tokens[rows, t] = torch.where(was_done, self.pad_token_id, next_tok)
        self.logprobs[rows, t] = torch.where(was_done, 0.0, logp)
        self.n_steps = t + 1
        self.done[rows] = was_done | (next_tok == self.eos_token_id)
        return bool(self.done.all())

    def output(self) -> GenerationOutput:
        """The steps taken so far; mask 1 up to and including the first EOS, truncated where there is none."""
        tokens, logprobs = self.tokens[:, : self.n_steps], self.logprobs[:, : self.n_steps]
        is_eos = tokens == self.eos_token_id
        completion_mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
        truncated = ~is_eos.any(-1)
        return GenerationOutput(tokens, completion_mask.long(), logprobs * completion_mask, truncated)


class DecodeBuffers:
    """The two (B, V) fp32 tensors each decoding step writes, allocated once per ``generate``: the LM head's
    logits and the sampler's weights exp(logits - max). At a real vocabulary they are 50 MB each for 256 rows,
    above glibc's largest mmap threshold (32 MB), so a fresh tensor per step is a fresh mmap whose every page
    faults in as it is written (~30 ms a step on the 2-core VM: as long as the sampler's arithmetic). Row
    views ``[:B]`` serve the shrinking batch. Same values as without them: ``head`` is the same matmul
    (``torch.mm`` into ``out``, bitwise F.linear's result: tests/test_generate.py), the weights the same
    subtraction. A head that is not a plain bias-free ``nn.Linear`` (the int8 copy's) runs as itself."""

    def __init__(self, model: Transformer, rows: int):
        head = model.lm_head
        self.weight = head.weight if type(head) is torch.nn.Linear and head.bias is None else None
        V, device = model.config.vocab_size, model.embed_tokens.weight.device
        self.logits = None if self.weight is None else torch.empty(rows, V, dtype=self.weight.dtype, device=device)
        self.work = torch.empty(rows, V, device=device)  # the sampler works in fp32 whatever the model's dtype

    def head(self, model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the last position's final hidden state (B, 1, C)."""
        h = hidden[:, -1]
        if self.weight is None:
            return model.lm_head(h)
        return torch.mm(h, self.weight.t(), out=self.logits[: h.shape[0]])

    def work_for(self, logits: torch.Tensor) -> torch.Tensor:
        return self.work[: logits.shape[0]]


def in_inference_mode(fn):
    """Run ``fn`` in inference mode (no autograd bookkeeping at all: faster than no_grad for a small model)
    and copy its GenerationOutput out of it, so a trainer can use the tensors in a graph (inference tensors
    cannot be saved for backward)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> GenerationOutput:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return GenerationOutput(*(getattr(out, f.name).clone() for f in fields(out)))

    return wrapper


@in_inference_mode
def generate(
    model: Transformer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` for each left-padded prompt (B, P), ``num_samples`` times each
    (rows b * num_samples ... (b + 1) * num_samples - 1 of the output). See ``GenerationOutput``."""
    choose = Sampler(temperature, top_k, top_p, greedy, generator)
    P, device = prompt_ids.shape[1], prompt_ids.device
    cache = KVCache(model.config, prompt_ids.shape[0], P + max_new_tokens, next(model.parameters()).dtype, device)
    logits = model(prompt_ids, prompt_mask, cache=cache, logits_to_keep=1)[:, -1]  # (B, V)
    if num_samples > 1:  # the prefill is shared; each copy samples on its own
        cache.repeat_rows(num_samples)
        logits, prompt_mask = logits.repeat_interleave(num_samples, 0), prompt_mask.repeat_interleave(num_samples, 0)
    B = prompt_mask.shape[0]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)  # (B, P + N)

    out = Completions(B, max_new_tokens, eos_token_id, pad_token_id, device)
    rows = torch.arange(B, device=device)  # the batch row of each row still in the cache
    buffers = DecodeBuffers(model, B)
    for t in range(max_new_tokens):
        next_tok, logp = choose(logits, buffers.work_for(logits))
        if out.add(t, next_tok, logp, rows) or t == max_new_tokens - 1:
            break
        live = ~out.done[rows]
        if int(live.sum()) <= 3 * len(rows) // 4:  # a quarter of the rows are done: drop them from the batch
            rows, next_tok, mask = rows[live], next_tok[live], mask[live]
            cache.keep_rows(live)
        logits = buffers.head(model, model(next_tok[:, None], mask[:, : P + t + 1], cache=cache, return_hidden=True))
    return out.output()
