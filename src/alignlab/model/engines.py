"""Rollout engines: what samples the on-policy trainers' completions, behind one seam.

An engine's ``generate`` returns what ``model.generate.generate`` returns, a ``GenerationOutput``
(completion ids, completion mask with EOS included, the sampler's log-probs of the drawn tokens, truncation),
so scoring, advantages and losses never know which engine sampled.

    AlignlabEngine   the hand-written sampler on the policy itself (``generate.py``): the reference and the
                     default. ``exact``: its log-probs are the trainer's softmax(logits / T), so pi_old needs
                     no second forward and ``logp - logp_old`` is 0 with one update per rollout.
    Int8Engine       alignlab's sampler on an int8 copy of the policy (``int8.py``: W8A8 with SmoothQuant's
                     migration, calibrated on each rollout's prompts), re-made from the policy when it has taken
                     ``sync_every`` optimizer steps since the last copy. ~2x the fp32 sampler on a CPU; not
                     ``exact``, so pi_old is recomputed by the trainer and the mismatch measured and correctable,
                     as for vLLM.
    VLLMEngine       a vLLM engine colocated in the trainer's process (``import vllm`` only when chosen),
                     loaded from ``init_from`` and kept in step with the policy by an in-memory weight sync
                     (``sync``: the policy's HF-named weights, LoRA merged, through vLLM's in-place
                     ``reload_weights``; no file is written). Not ``exact``: its kernels (and its dtype) differ
                     from the trainer's, so ``OnPolicyModule.prepare`` recomputes pi_old with the trainer and
                     measures the difference (``sampling/logp_difference/*``), which truncated importance
                     sampling can correct (``model.rollout_correction``).

vLLM specifics, each chosen to reproduce alignlab's sampler:
- prompts go in as token ids (``TokensPrompt``, left padding stripped); vLLM's own tokenizer is never loaded
  and ``generation_config="vllm"`` ignores the checkpoint's generation_config.json (its sampling defaults and
  extra stop ids): the only stop token is the tokenizer's EOS, kept in the completion like ours;
- ``SamplingParams(n=G, temperature, top_k, top_p, max_tokens, logprobs=0, seed)``: logprobs=0 returns the
  drawn token's log-prob only; the engine runs with ``logprobs_mode="processed_logprobs"``, the log-prob under
  the distribution actually sampled (after temperature, and top-k/top-p). With top_k = 0 and top_p = 1 that is
  exactly our sampler's softmax(logits / T); with top-k/top-p vLLM renormalises over the kept tokens and
  alignlab does not (as TRL), so the measured difference then includes log(kept probability mass);
- seeds: each call draws one base seed from the module's sampling generator (``model.sampling_seed``, saved
  in checkpoints), prompt i gets base + i * G and vLLM gives its G samples base + i * G + j: a run is
  reproducible for one seed, machine and thread count;
- memory: the KV cache is bounded by ``VLLMConfig.kv_cache_memory_gb`` (CPU and GPU) or, on GPUs, by
  ``gpu_memory_utilization``; ``memory_mb`` reports the process memory the engine took at start-up (RSS on
  CPU, weights and KV cache included).
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn

from alignlab.model.generate import GenerationOutput
from alignlab.model.hf import hf_state_dict
from alignlab.model.int8 import Int8Config, int8_copy, int8_matmul_speedup, tensor_bytes

VLLM_MISSING = ("model.rollout_engine: vllm is not installed in this environment; run `make vllm` "
                "(a separate .venv-vllm, see docs/vllm.md) and train with .venv-vllm/bin/python")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass
class VLLMConfig:
    """Options of the colocated vLLM engine (``model.vllm``)."""

    dtype: str = "float32"  # float32 | bfloat16 | float16: the engine's weights and compute
    kv_cache_memory_gb: float | None = 1.0  # bound on the KV cache; None = vLLM's default (GPU: the share below)
    gpu_memory_utilization: float = 0.3  # GPU only: share of the GPU's memory vLLM may take (TRL's colocate default)
    tensor_parallel_size: int = 1  # GPUs per engine
    max_model_len: int | None = None  # longest prompt + completion; None = the checkpoint's context
    enforce_eager: bool = True  # no torch.compile / CUDA graphs (fast start-up; off for speed on GPUs)

    def errors(self) -> list[tuple[str, str]]:
        """(key, message) for every invalid field (reported as ``model.vllm.<key>``)."""
        out = []
        if self.dtype not in ("float32", "bfloat16", "float16"):
            out.append(("dtype", f"must be float32|bfloat16|float16, got {self.dtype!r}"))
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            out.append(("kv_cache_memory_gb", f"must be > 0 or null, got {self.kv_cache_memory_gb}"))
        if not 0 < self.gpu_memory_utilization <= 1:
            out.append(("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}"))
        if self.tensor_parallel_size < 1:
            out.append(("tensor_parallel_size", f"must be >= 1, got {self.tensor_parallel_size}"))
        if self.max_model_len is not None and self.max_model_len < 2:
            out.append(("max_model_len", f"must be >= 2 or null, got {self.max_model_len}"))
        return out


torch.serialization.add_safe_globals([VLLMConfig])  # held in checkpoints' hyper-parameters


class AlignlabEngine:
    """The hand-written sampler (``PolicyModule.generate``): always in step with the policy, exact."""

    name = "alignlab"
    exact = True  # its log-probs are the trainer's: no recomputation, no mismatch

    def __init__(self, module):
        self.module = module

    def generate(self, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, num_samples: int = 1, greedy: bool = False) -> GenerationOutput:
        return self.module.generate(prompt_ids, prompt_mask, max_new_tokens, greedy=greedy, temperature=temperature,
                                    top_k=top_k, top_p=top_p, num_samples=num_samples)

    def maybe_sync(self, step: int) -> bool:
        return False  # samples with the policy itself

    def stats(self) -> dict[str, float]:
        return {}


class SyncedEngine:
    """What the engines that sample with their own copy of the weights share: the copy is due once the
    policy has taken ``sync_every`` optimizer steps since it was made, and the cost of making it is logged."""

    def __init__(self, module, sync_every: int = 1):
        self.module, self.sync_every = module, sync_every
        self.synced_step: int | None = None  # global step of the weights the engine holds (None: none yet)
        self.memory_mb = 0.0
        self.last_sync_s = 0.0

    def due(self, step: int) -> bool:
        """Is the engine's copy ``sync_every`` steps old (or missing)? If so it counts as made at ``step``."""
        if self.synced_step is None or step - self.synced_step >= self.sync_every:
            self.synced_step = step
            return True
        return False

    def stats(self) -> dict[str, float]:
        """Logged under ``sampling/`` with each rollout."""
        return {"engine_memory_mb": self.memory_mb, "weight_sync_s": self.last_sync_s}


class Int8Engine(SyncedEngine):
    """alignlab's sampler on an int8 copy of the policy (``int8.int8_copy``), made at the first rollout after
    the policy has taken ``sync_every`` optimizer steps since the last copy, calibrated on that rollout's
    prompts."""

    name = "int8"
    exact = False  # the copy's log-probs differ from the trainer's by the quantization error

    def __init__(self, module, config: Int8Config, sync_every: int = 1):
        super().__init__(module, sync_every)
        self.config = config
        self.copy = None
        self.matmul_speedup = int8_matmul_speedup()
        if self.matmul_speedup < 1:
            rank_zero_warn(
                f"model.rollout_engine=int8: an int8 matmul (torch._int_mm) is {1 / self.matmul_speedup:.0f}x slower "
                f"than fp32 on this CPU (no int8 dot-product instruction such as AVX-VNNI): the int8 copy will make "
                f"sampling slower, not faster; model.rollout_engine=native is the fast choice here")

    def maybe_sync(self, step: int) -> bool:
        """Drop the copy if the policy has moved ``sync_every`` steps since it was made; the next ``generate``
        makes a new one (the calibration needs that rollout's prompts)."""
        if self.due(step):
            self.copy = None
            return True
        return False

    def generate(self, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, num_samples: int = 1, greedy: bool = False) -> GenerationOutput:
        if self.copy is None:
            t = time.perf_counter()
            self.copy = int8_copy(self.module.policy, self.config, calibration=(prompt_ids, prompt_mask))
            self.last_sync_s, self.memory_mb = time.perf_counter() - t, tensor_bytes(self.copy) / 2**20
        return self.module.generate(prompt_ids, prompt_mask, max_new_tokens, greedy=greedy, temperature=temperature,
                                    top_k=top_k, top_p=top_p, num_samples=num_samples, model=self.copy)

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "int8_matmul_speedup": self.matmul_speedup}


class VLLMEngine(SyncedEngine):
    """A vLLM ``LLM`` in this process on ``directory``'s checkpoint, its weights replaced by the policy's
    whenever the policy has taken ``sync_every`` optimizer steps since the last sync."""

    name = "vllm"
    exact = False

    def __init__(self, module, directory: str, config: VLLMConfig, sync_every: int = 1):
        if not vllm_available():
            raise ImportError(VLLM_MISSING)
        super().__init__(module, sync_every)
        self.directory, self.config = str(directory), config
        self.llm = None

    # ------------------------------------------------------------------------------ start-up
    def start(self) -> None:
        """Build the engine (first rollout). In this process (colocated), sharing the trainer's threads."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # keep the trainer's threads and affinity
        import psutil
        from vllm import LLM

        c = self.config
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        rss = psutil.Process().memory_info().rss
        kwargs = dict(model=self.directory, dtype=c.dtype, enforce_eager=c.enforce_eager, seed=0,
                      logprobs_mode="processed_logprobs", skip_tokenizer_init=True, generation_config="vllm",
                      tensor_parallel_size=c.tensor_parallel_size, max_model_len=c.max_model_len,
                      # whole prompts only: a prompt split over two steps rewinds its seeded generator by an
                      # offset, which CPU generators do not have (vLLM 0.32: "CPU Generator does not use offset")
                      enable_chunked_prefill=False)
        if c.kv_cache_memory_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(c.kv_cache_memory_gb * 2**30)
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = c.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        # vLLM's CPU worker replaces torch.set_num_threads by a no-op: give the trainer its own back
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        self.memory_mb = (psutil.Process().memory_info().rss - rss) / 2**20
        kv = f"{c.kv_cache_memory_gb:g} GB" if c.kv_cache_memory_gb is not None else "vLLM's default"
        from lightning.pytorch.utilities import rank_zero_info
        rank_zero_info(f"vLLM rollout engine: {self.directory}, dtype {c.dtype}, KV cache bound {kv}; "
                       f"the engine took {self.memory_mb:.0f} MB of process memory (weights, KV cache, vLLM)")

    # ------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Send the policy's weights (HF names, LoRA merged) to the engine, in memory: vLLM's in-place
        ``reload_weights`` (a second plain ``load_weights`` fails on the CPU backend, whose weights are repacked
        after loading). The engine casts them to its dtype."""
        t = time.perf_counter()
        items = [(name, w.detach()) for name, w in hf_state_dict(policy).items()]
        self.llm.collective_rpc(_reload_weights, args=(items,))
        self.llm.reset_prefix_cache()  # cached prompt KV entries were computed with the old weights
        self.last_sync_s = time.perf_counter() - t

    def maybe_sync(self, step: int) -> bool:
        """Sync if the engine never had the policy's weights or they are ``sync_every`` steps old."""
        if self.llm is None:
            self.start()
        if self.due(step):
            self.sync(self.module.policy)
            return True
        return False

    # ------------------------------------------------------------------------------ sampling
    def generate(self, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, num_samples: int = 1, greedy: bool = False) -> GenerationOutput:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        m = self.module
        if self.llm is None:
            self.start()
        G, eos, pad, device = num_samples, m.eos_id, m.pad_id, prompt_ids.device
        prompts = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                   for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]  # left padding stripped
        base = int(torch.randint(0, 2**31 - 1 - len(prompts) * G, (1,), generator=m.generator))
        params = [SamplingParams(n=G, temperature=0.0 if greedy else temperature, top_k=top_k if top_k > 0 else 0,
                                 top_p=top_p, max_tokens=max_new_tokens, logprobs=0, seed=base + i * G,
                                 stop_token_ids=[eos], detokenize=False)
                  for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        rows = [c for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]  # prompt-major, like ours
        T = max(1, max(len(c.token_ids) for c in rows))
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        logps = torch.zeros(len(rows), T)
        for b, c in enumerate(rows):
            n = len(c.token_ids)
            ids[b, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            logps[b, :n] = torch.tensor([lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)])
        is_eos = ids == eos
        mask = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0) & (torch.arange(T) < torch.tensor(
            [len(c.token_ids) for c in rows])[:, None])  # up to and including the first EOS
        ids = torch.where(mask, ids, pad)
        return GenerationOutput(ids.to(device), mask.long().to(device), (logps * mask).to(device),
                                (~is_eos.any(-1)).to(device))


    def score(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """vLLM's log-probs (T - 1,) of tokens 1.. of each token sequence under softmax(logits) (its prompt
        log-probs): what the engine's current weights assign to a fixed sequence."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            self.start()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                 use_tqdm=False)
        return [torch.tensor([lp[tok].logprob for tok, lp in zip(s[1:], o.prompt_logprobs[1:])])
                for s, o in zip(sequences, outs)]


def _reload_weights(worker, items) -> None:
    """Runs in vLLM's worker: replace its weights in place with ``items`` ((HF name, tensor) pairs).

    A tied LM head is no weight of the checkpoint, so the reload does not process it again; on the CPU backend it
    multiplies with a packed copy of the embedding made at load time, which would keep the old embedding. It is
    packed again from the new one here (on GPUs that processing does nothing)."""
    worker.model_runner.reload_weights(weights_iterator=iter(items))
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        head.quant_method.process_weights_after_loading(head)


def make_engine(module, name: str, directory: str | None, config: VLLMConfig | None, sync_every: int,
                int8: Int8Config | None = None):
    """The engine ``name`` (``model.rollout_engine``) for ``module``."""
    if name == "alignlab":
        return AlignlabEngine(module)
    if name == "int8":
        return Int8Engine(module, int8 or Int8Config(), sync_every)
    return VLLMEngine(module, directory, config or VLLMConfig(), sync_every)
