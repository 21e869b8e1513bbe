"""OnPolicyModule: the online-RL loop shared by GRPO, DAPO and PPO.

One ``training_step`` is one iteration of, in the order the papers write it,

    1. rollout     repeat each prompt G times and sample completions with the rollout engine (no grad)
                   (alignlab's sampler on the KV cache, or vLLM: model/engines.py)
    2. score       reward functions -> one scalar reward per completion                       (no grad)
    3. prepare     what stays fixed during the updates: pi_old's and pi_ref's log-probs,      (no grad)
                   PPO's rollout-time values
    4. advantages  GRPO: rewards normalised within each group; PPO: KL-shaped rewards + GAE   (no grad)
    5. update      num_iterations passes x minibatches optimizer steps on the rollout          (manual)

``make_rollout`` is steps 1-2 (DAPO's dynamic sampling repeats them until its groups are mixed), and every
step is a method a subclass overrides to change that step alone: ``compute_advantages`` is where another
advantage estimator (RLOO, REINFORCE++) goes, ``compute_loss`` where another policy loss (GSPO, CISPO) goes.
Everything a rollout carries -- its tensors, its rewards, the statistics each step measured
(``Rollout.stats``, logged once after the update) -- lives on the ``Rollout``, not on the module.

Rewards are configured by import path, e.g. ``alignlab.rewards.rules.accuracy_reward``, with optional
weights; several functions are summed. A function is called as TRL calls it,

    fn(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]

where ``columns`` are the batch's extra columns (``answer``, ...) repeated G times.

DDP: every rank generates whole groups for its own prompts, so group statistics are local. Token means
(``token-mean``) divide by the token count summed over ranks, and the loss is multiplied by the world
size because DDP averages gradients: the update is then exactly the full-batch update.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from alignlab.algorithms.base import PolicyModule, check, resolve_callable
from alignlab.algorithms.validation import token_lists
from alignlab.losses.policy import ROLLOUT_CORRECTIONS, logp_difference, truncated_importance_weights
from alignlab.model.engines import VLLM_MISSING, VLLMConfig, make_engine, vllm_available
from alignlab.model.int8 import Int8Config


# ----------------------------------------------------------------------------------- the rollout
@dataclass
class Rollout:
    """N = prompts x G completions. Prompts are left-padded, per-token tensors right-padded."""

    prompt_ids: torch.Tensor  # (N, P)
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C)
    completion_mask: torch.Tensor  # (N, C) 1 up to and including EOS
    truncated: torch.Tensor  # (N,) bool: no EOS within max_new_tokens
    prompts: list[str]  # (N,)
    completions: list[str]  # (N,)
    prompt_index: torch.Tensor | None = None  # (N,) rows with equal values share one prompt (a group)
    columns: dict[str, list] = field(default_factory=dict)  # extra dataset columns, (N,) each
    rewards: torch.Tensor | None = None  # (N,) weighted sum of the reward functions
    rewards_per_func: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N,) raw values
    advantages: torch.Tensor | None = None  # (N,) or (N, C)
    sampler_logp: torch.Tensor | None = None  # (N, C) the rollout engine's log-probs of the drawn tokens
    logp_old: torch.Tensor | None = None  # (N, C) the trainer's, when the policy moves before the last update
    #                                       or the engine is not exact (``prepare``)
    is_weights: torch.Tensor | None = None  # (N, C) truncated importance weights (``model.rollout_correction``)
    ref_logp: torch.Tensor | None = None  # (N, C), only with a reference model
    loss_mask: torch.Tensor | None = None  # (N, C) tokens that carry loss (default: completion_mask)
    values: torch.Tensor | None = None  # (N, C) PPO: the critic's values at rollout time
    returns: torch.Tensor | None = None  # (N, C) PPO: GAE's returns, the critic's targets
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # scalar statistics of the whole rollout

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def select(self, idx: torch.Tensor | list[int]) -> Rollout:
        """The rows in ``idx`` (a minibatch or the kept groups)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "stats":  # of the whole rollout, not per row
                out[f.name] = dict(v)
            elif isinstance(v, torch.Tensor):
                out[f.name] = v[idx.to(v.device)]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx.tolist()]
            elif isinstance(v, dict):
                out[f.name] = {k: (x[idx.to(x.device)] if isinstance(x, torch.Tensor) else [x[i] for i in idx.tolist()])
                               for k, x in v.items()}
            else:
                out[f.name] = v
        return Rollout(**out)

    def trimmed(self) -> Rollout:
        """The same rows without the padding columns none of them uses: prompt columns on the left,
        per-token (N, C) columns on the right."""
        start = int(self.prompt_mask.any(0).long().argmax())  # first prompt column some row uses
        C, end = self.completion_ids.shape[1], max(1, int(self.lengths.max()))
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() == 2:
                v = v[:, start:] if f.name.startswith("prompt") else (v[:, :end] if v.shape[1] == C else v)
            out[f.name] = v
        return type(self)(**out)

    @staticmethod
    def cat(parts: list[Rollout], pad_id: int = 0) -> Rollout:
        """Concatenate rollouts of different padded lengths (prompts pad left, completions right)."""
        if len(parts) == 1:
            return parts[0]
        out = {}
        for f in fields(Rollout):
            vals = [getattr(p, f.name) for p in parts]
            if f.name == "prompt_index" and vals[0] is not None:  # each part numbers its prompts from 0
                offset, shifted = 0, []
                for v in vals:
                    shifted.append(v + offset)
                    offset += int(v.max()) + 1 if len(v) else 0
                vals = shifted
            if f.name == "stats":
                out[f.name] = {k: x for v in vals for k, x in v.items()}
            elif vals[0] is None:
                out[f.name] = None
            elif isinstance(vals[0], torch.Tensor):
                side = "left" if f.name.startswith("prompt") else "right"
                out[f.name] = _cat_padded(vals, side, pad=pad_id if f.name.endswith("_ids") else 0)
            elif isinstance(vals[0], list):
                out[f.name] = [x for v in vals for x in v]
            else:  # dict of columns / rewards
                out[f.name] = {k: (torch.cat([v[k] for v in vals]) if isinstance(vals[0][k], torch.Tensor)
                                   else [x for v in vals for x in v[k]]) for k in vals[0]}
        return Rollout(**out)


def _cat_padded(ts: list[torch.Tensor], side: str, pad: int | float = 0) -> torch.Tensor:
    if ts[0].dim() < 2:
        return torch.cat(ts)
    T = max(t.shape[1] for t in ts)
    padded = []
    for t in ts:
        extra = t.new_full((t.shape[0], T - t.shape[1]), pad)
        padded.append(torch.cat([extra, t] if side == "left" else [t, extra], dim=1))
    return torch.cat(padded)


def engine_options(value, cls, key: str):
    """An engine's options as ``cls`` (a dict: hyper-parameters read back from a checkpoint, or given plainly),
    every invalid field reported as ``model.<key>.<field>``."""
    if isinstance(value, dict):
        value = cls(**value)
    for field, message in (value.errors() if value is not None else []):
        check(False, f"{key}.{field}", message)
    return value


# ------------------------------------------------------------------------------------ the module
class OnPolicyModule(PolicyModule):
    data_kind = "prompt"

    def __init__(
        self,
        num_generations: int = 8,
        max_new_tokens: int = 8,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        reward_funcs: list[str] | None = None,
        reward_weights: list[float] | None = None,
        num_iterations: int = 1,
        minibatches: int = 1,
        micro_batch_size: int | None = None,
        log_completions_every_n_steps: int = 10,
        rollout_engine: Literal["alignlab", "int8", "vllm"] = "alignlab",
        rollout_sync_every: int = 1,
        vllm: VLLMConfig | None = None,
        int8: Int8Config | None = None,
        rollout_correction: Literal["none", "token_tis", "sequence_tis"] = "none",
        rollout_correction_cap: float = 3.0,
        **kwargs,
    ):
        """
        Args:
            num_generations: G, completions sampled per prompt (a group).
            max_new_tokens: L_max, the maximum completion length in tokens (EOS included).
            temperature: sampling temperature; log-probs in the loss use the same softmax(logits / T).
            top_k: sample only among the k most likely tokens (0 = off).
            top_p: nucleus sampling threshold (1.0 = off).
            reward_funcs: import paths of reward functions; default ["alignlab.rewards.rules.accuracy_reward"].
            reward_weights: one weight per reward function (default all 1.0); the reward is the weighted sum.
            num_iterations: mu, passes over each rollout (mu > 1 reuses it: ratios move away from 1).
            minibatches: optimizer steps per pass; the rollout's completions are split into this many parts.
            micro_batch_size: completions per forward (None = a whole minibatch): a minibatch is split into
                micro-batches, a group's completions kept together, whose gradients add up to the same update
                (less memory; the fixed log-probs of ``prepare`` use the same chunks).
            log_completions_every_n_steps: write sample completions with rewards to TensorBoard every n steps.
            rollout_engine: what samples the rollouts: ``alignlab`` (the hand-written sampler, exact), ``int8``
                (the same sampler on an int8 copy of the policy, ~2x faster on a CPU, not exact: model/int8.py,
                docs/scaling.md) or ``vllm`` (a colocated vLLM engine on ``init_from``, weights synced in memory;
                ``make vllm``, docs/vllm.md). Validation always samples with alignlab's, on the policy.
            rollout_sync_every: the engine receives the policy's weights before a rollout once the policy has
                taken this many optimizer steps since the last sync (1 = always current; k > 1 samples with
                weights up to k - 1 steps old, which the measured difference and the correction then see).
            vllm: options of the vLLM engine (``{dtype, kv_cache_memory_gb, gpu_memory_utilization,
                tensor_parallel_size, max_model_len, enforce_eager}``, see model/engines.py).
            int8: options of the int8 engine (``{smoothing, head}``, see model/int8.py).
            rollout_correction: none | token_tis | sequence_tis: multiply each token's policy loss by the
                truncated importance weight min(pi_old / pi_sampler, cap) of its token, or of its whole sequence
                (``losses.policy.truncated_importance_weights``). pi_old is then the trainer's.
            rollout_correction_cap: the truncation C of the importance weights (TRL's default, 3.0).
        """
        super().__init__(**kwargs)
        check(num_generations >= 1, "num_generations", f"must be >= 1, got {num_generations}")
        check(max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        check(temperature > 0, "temperature", f"must be > 0, got {temperature}")
        check(top_k >= 0, "top_k", f"must be >= 0, got {top_k}")
        check(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
        check(num_iterations >= 1, "num_iterations", f"must be >= 1, got {num_iterations}")
        check(minibatches >= 1, "minibatches", f"must be >= 1, got {minibatches}")
        check(micro_batch_size is None or micro_batch_size >= 1, "micro_batch_size",
              f"must be >= 1 or None, got {micro_batch_size}")
        check(log_completions_every_n_steps >= 1, "log_completions_every_n_steps",
              f"must be >= 1, got {log_completions_every_n_steps}")
        reward_funcs = ["alignlab.rewards.rules.accuracy_reward"] if reward_funcs is None else list(reward_funcs)
        check(len(reward_funcs) >= 1, "reward_funcs", "needs at least one reward function")
        if reward_weights is None:
            reward_weights = [1.0] * len(reward_funcs)
        check(len(reward_weights) == len(reward_funcs), "reward_weights",
              f"has {len(reward_weights)} weights for {len(reward_funcs)} reward_funcs")
        self.reward_paths = reward_funcs
        self.reward_fns = [resolve_callable(p, "reward_funcs") for p in reward_funcs]
        self.reward_weights = [float(w) for w in reward_weights]
        check(rollout_engine in ("alignlab", "int8", "vllm"), "rollout_engine",
              f"must be alignlab|int8|vllm, got {rollout_engine!r}")
        check(rollout_sync_every >= 1, "rollout_sync_every", f"must be >= 1, got {rollout_sync_every}")
        check(rollout_correction in ROLLOUT_CORRECTIONS, "rollout_correction",
              f"must be {'|'.join(ROLLOUT_CORRECTIONS)}, got {rollout_correction!r}")
        check(rollout_correction_cap > 0, "rollout_correction_cap", f"must be > 0, got {rollout_correction_cap}")
        vllm, int8 = engine_options(vllm, VLLMConfig, "vllm"), engine_options(int8, Int8Config, "int8")
        if rollout_engine == "vllm":
            check(vllm_available(), "rollout_engine", VLLM_MISSING.removeprefix("model.rollout_engine: "))
            check(self.hparams.init_from is not None, "rollout_engine",
                  "vllm loads the policy from a local HF directory: set model.init_from")
        self.rollout_correction, self.rollout_correction_cap = rollout_correction, rollout_correction_cap
        self.engine = make_engine(self, rollout_engine, self.hparams.init_from, vllm, rollout_sync_every, int8)
        self.micro_batch_size = micro_batch_size
        self.automatic_optimization = False
        self.rollout_skipped = False  # was the last rollout dropped for non-finite rewards?

    # ----------------------------------------------------------------------- the step
    def nonfinite_rewards(self, r: Rollout) -> tuple[str, torch.Tensor]:
        """("reward (<functions>)", is any reward NaN/Inf?): checked before any update on the rollout."""
        names = [n for n, v in r.rewards_per_func.items() if not torch.isfinite(v).all()]
        return f"reward ({', '.join(names) or 'total'})", ~torch.isfinite(r.rewards).all()

    def training_step(self, batch, batch_idx):
        r = self.make_rollout(batch)  # 1-2. sample G completions per prompt and score them
        self.rollout_skipped = self.nonfinite_step(*self.nonfinite_rewards(r))
        if self.rollout_skipped:  # no update on this rollout: the weights never see the NaN
            return
        self.prepare(r)  # 3. log-probs (and values) that stay fixed during the updates
        r.stats = {**self.compute_advantages(r), **r.stats}  # 4. (what sampling measured stands: DAPO's)
        self.policy.train()
        r.stats.update(self.update(r))  # 5. num_iterations x minibatches optimizer steps
        self.log_rollout(r)
        self.after_update(r)

    def after_update(self, r: Rollout) -> None:
        """After the rollout's updates and logging (PPO: the adaptive KL controller)."""

    # --------------------------------------------------------------------------- helpers
    def global_sum(self, x: torch.Tensor | float) -> torch.Tensor:
        """Sum over DDP ranks (the local value on one device)."""
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.trainer.strategy.reduce(x.clone(), reduce_op="sum")

    def optimizer_steps_per_batch(self) -> int:
        return self.hparams.num_iterations * self.hparams.minibatches

    def generation_budget(self) -> tuple[int, str]:
        h = self.hparams
        return max(h.max_new_tokens, h.val_max_new_tokens), "model.max_new_tokens / model.val_max_new_tokens"

    def check_data(self, dm) -> None:
        """As PolicyModule's, plus: the minibatches split each rollout (batch_size x G completions) evenly."""
        super().check_data(dm)
        batch_size = getattr(getattr(dm, "hparams", None), "batch_size", None)
        if batch_size is not None:
            n, mb = batch_size * self.hparams.num_generations, self.hparams.minibatches
            check(n % mb == 0, "minibatches", f"{mb} does not divide the {n} completions of a rollout "
                  f"(data.batch_size={batch_size} x model.num_generations={self.hparams.num_generations})")

    def reward_name(self, i: int) -> str:
        return getattr(self.reward_fns[i], "__name__", self.reward_paths[i].rsplit(".", 1)[-1])

    # --------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, batch: dict) -> Rollout:
        """Repeat each prompt G times (groups are consecutive) and sample one completion per row."""
        G, h = self.hparams.num_generations, self.hparams
        self.engine.maybe_sync(self.global_step)  # the engine's weights are the policy's (or k - 1 steps old)
        out = self.engine.generate(batch["prompt_ids"], batch["prompt_mask"], h.max_new_tokens,
                                   temperature=h.temperature, top_k=h.top_k, top_p=h.top_p, num_samples=G)
        prompt_ids = batch["prompt_ids"].repeat_interleave(G, dim=0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(G, dim=0)
        skip = {"prompt_ids", "prompt_mask", "prompt"}
        columns = {k: [x for x in v for _ in range(G)] for k, v in batch.items()
                   if k not in skip and isinstance(v, list)}
        return Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            completion_ids=out.completion_ids, completion_mask=out.completion_mask, truncated=out.truncated,
            sampler_logp=out.logprobs, prompts=[p for p in batch["prompt"] for _ in range(G)],
            prompt_index=torch.arange(len(batch["prompt"]), device=prompt_ids.device).repeat_interleave(G),
            completions=self.decode(out.completion_ids, out.completion_mask),
            columns=columns,
        )

    # ----------------------------------------------------------------------------- score
    @torch.no_grad()
    def score(self, r: Rollout) -> None:
        """r.rewards = sum_j w_j * fn_j(prompts, completions, **columns); raw values per function kept."""
        ids = token_lists(r.completion_ids, r.completion_mask)
        total = torch.zeros(len(r), device=self.device)
        for i, (fn, path, w) in enumerate(zip(self.reward_fns, self.reward_paths, self.reward_weights)):
            try:
                values = fn(list(r.prompts), list(r.completions), completion_ids=ids,
                            **{k: list(v) for k, v in r.columns.items()})
            except Exception as e:
                raise RuntimeError(f"reward function {path} raised {type(e).__name__}: {e}") from e
            try:
                values = [float(v) for v in values]
            except (TypeError, ValueError) as e:
                raise RuntimeError(f"reward function {path} must return a list of numbers: {e}") from None
            if len(values) != len(r):
                raise RuntimeError(f"reward function {path} returned {len(values)} rewards "
                                   f"for {len(r)} completions")
            values = torch.tensor(values, dtype=torch.float32, device=self.device)
            r.rewards_per_func[self.reward_name(i)] = values
            total = total + w * values
        r.rewards = total

    def make_rollout(self, batch: dict) -> Rollout:
        """Generate and score one batch of prompts (DAPO overrides this with dynamic sampling)."""
        r = self.rollout(batch)
        self.score(r)
        return r

    # --------------------------------------------------------------------------- prepare
    def reuses_rollout(self) -> bool:
        """Does the policy change before the last update on this rollout? Then logp_old must be stored."""
        return self.hparams.num_iterations > 1 or self.hparams.minibatches > 1

    def trainer_logp_old(self) -> bool:
        """Must pi_old's log-probs be computed by the trainer? When the policy moves before the last update,
        or the sampler's are not the trainer's (an engine that is not exact), or the correction needs them."""
        return self.reuses_rollout() or not self.engine.exact or self.rollout_correction != "none"

    @torch.no_grad()
    def prepare(self, r: Rollout) -> None:
        """What stays constant during the updates: pi_old's log-probs when ``trainer_logp_old`` (else
        ``logp.detach()`` IS pi_old), then the rollout correction. Subclasses add the reference's (GRPO), the
        values (PPO)."""
        r.loss_mask = r.completion_mask if r.loss_mask is None else r.loss_mask
        if self.trainer_logp_old():
            r.logp_old = self.logps_no_grad(self.policy, r)
        self.correct_rollout(r)

    @torch.no_grad()
    def correct_rollout(self, r: Rollout) -> None:
        """The sampler/trainer mismatch, measured (``sampling/logp_difference/{mean,max}``, real tokens only)
        when the sampler is not the trainer's, and with ``rollout_correction`` the truncated importance weights
        min(exp(logp_old - logp_sampler), cap) per token or per sequence (``r.is_weights``, multiplied into
        the policy loss by ``compute_loss``). One implementation for every engine and on-policy trainer."""
        if r.logp_old is None or r.sampler_logp is None or (self.engine.exact and self.rollout_correction == "none"):
            return
        mask = r.completion_mask
        r.stats.update({f"sampling/{k}": v for k, v in logp_difference(r.logp_old, r.sampler_logp, mask).items()})
        r.stats.update({f"sampling/{k}": torch.tensor(float(v)) for k, v in self.engine.stats().items()})
        if self.rollout_correction != "none":
            level = self.rollout_correction.removesuffix("_tis")
            r.is_weights, m = truncated_importance_weights(r.logp_old, r.sampler_logp, mask, level,
                                                           self.rollout_correction_cap)
            r.stats.update({f"sampling/{k}": v for k, v in m.items()})

    def row_chunks(self, r: Rollout, size: int | None) -> list[torch.Tensor]:
        """Row indices in chunks of ``size`` (None = one chunk), a group's rows together so that they share
        one prompt computation (``completion_states``). Padding costs nothing outside attention (the model
        packs real tokens), so chunks are for memory only."""
        if size is None or size >= len(r):
            return [torch.arange(len(r))]
        order = torch.arange(len(r)) if r.prompt_index is None else torch.argsort(r.prompt_index.cpu(), stable=True)
        return list(order.split(size))

    @torch.no_grad()
    def logps_no_grad(self, model, r: Rollout) -> torch.Tensor:
        """Per-token log-probs (N, C) of a fixed model, in chunks of ``micro_batch_size`` rows, each trimmed
        of the padding columns it does not need (0 where a chunk was trimmed: padding only)."""
        out = torch.zeros(r.completion_ids.shape, device=r.completion_ids.device)
        for idx in self.row_chunks(r, self.micro_batch_size):
            mb = r.select(idx).trimmed()
            out[idx.to(out.device), : mb.completion_ids.shape[1]] = self.completion_logps(
                model, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask,
                temperature=self.hparams.temperature, prompt_index=mb.prompt_index)
        return out

    def micro_batches(self, mb: Rollout) -> list[Rollout]:
        """mb in micro-batches of ``micro_batch_size`` rows (groups together), trimmed of padding (or mb itself)."""
        chunks = self.row_chunks(mb, self.micro_batch_size)
        return [mb] if len(chunks) == 1 else [mb.select(idx).trimmed() for idx in chunks]

    # ------------------------------------------------------------------------ advantages
    def compute_advantages(self, r: Rollout) -> dict[str, torch.Tensor]:
        """Set r.advantages ((N,) or (N, C)) from r.rewards (and what ``prepare`` stored); return statistics
        for ``r.stats``. GRPO: group-relative; PPO: GAE on KL-shaped per-token rewards."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ loss
    # metrics of compute_loss that are shares of the minibatch's aggregate (summed over micro-batches);
    # every other metric is a token mean (micro-batches weighted by their loss tokens)
    summed_metrics: tuple[str, ...] = ()

    def compute_loss(self, mb: Rollout, num_tokens: torch.Tensor, num_seqs: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a minibatch: this rank's share of the global (all-rank) minibatch loss."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------- update
    def update(self, r: Rollout) -> dict[str, torch.Tensor]:
        """num_iterations passes x minibatches optimizer steps; returns the metrics averaged over steps."""
        h = self.hparams
        opt = self.optimizers()
        sched = self.lr_schedulers()
        n = len(r)
        check(n >= h.minibatches, "minibatches", f"{h.minibatches} minibatches for only {n} completions")
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        for _ in range(h.num_iterations):
            order = torch.randperm(n, generator=self.generator) if h.minibatches > 1 else torch.arange(n)
            for idx in order.chunk(h.minibatches):
                mb = r.select(idx)
                num_tokens = self.global_sum(mb.loss_mask.sum())
                num_seqs = self.global_sum(len(mb))
                loss, metrics = torch.zeros((), device=self.device), {}
                for micro in self.micro_batches(mb):  # gradients add up: each loss is a share of the global mean
                    part, part_metrics = self.compute_loss(micro, num_tokens, num_seqs)
                    # DDP averages gradients over ranks; our loss is already a share of the global mean.
                    self.manual_backward(part * self.world_size)
                    loss = loss + part.detach()
                    w = micro.loss_mask.sum() / mb.loss_mask.sum().clamp(min=1)
                    for k, v in part_metrics.items():
                        metrics[k] = metrics.get(k, 0.0) + (v.detach() if k in self.summed_metrics else w * v.detach())
                opt.step()  # on_before_optimizer_step clips to max_grad_norm
                opt.zero_grad(set_to_none=True)
                if sched is not None:
                    sched.step()
                metrics = {"loss": loss.detach() * self.world_size, **metrics}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                steps += 1
        return {k: v / steps for k, v in sums.items()}

    # ---------------------------------------------------------------------------- logging
    def rollout_metrics(self, r: Rollout) -> dict[str, torch.Tensor]:
        lengths = r.lengths.float()
        m = {
            "train/reward": r.rewards.mean(),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": r.truncated.float().mean(),
        }
        for name, v in r.rewards_per_func.items():
            m[f"rewards/{name}/mean"] = v.mean()
        return m

    # Logged on every step (progress bar, checkpoint monitors, trainer.callback_metrics); every other metric
    # only on the steps Lightning writes to the logger (each trainer.log_every_n_steps-th): each self.log goes
    # through Lightning's bookkeeping (~0.3 ms here), ~5% of a default-model step for a dozen diagnostics.
    every_step_metrics = ("train/reward", "train/loss", "completions/mean_length")
    prog_bar_metrics = ("train/reward", "train/loss")

    def log_metrics(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """self.log each metric of this rollout (see ``every_step_metrics``)."""
        to_logger = self.logging_step()
        for k, v in metrics.items():
            if to_logger or k in self.every_step_metrics:
                self.log(k, torch.as_tensor(v, dtype=torch.float32, device=self.device), on_step=True,
                         prog_bar=k in self.prog_bar_metrics, batch_size=batch_size, sync_dist=self.world_size > 1)

    # a statistic named "<group>/..." for these groups is logged as it is; any other name as "train/<name>"
    metric_groups: tuple[str, ...] = ("train", "rewards", "completions", "sampling")

    def log_rollout(self, r: Rollout) -> None:
        """self.log the rollout's metrics and ``r.stats``; every n steps, a table of sample completions."""
        out = self.rollout_metrics(r)
        for k, v in r.stats.items():
            out[k if "/" in k and k.split("/")[0] in self.metric_groups else f"train/{k}"] = v
        self.log_metrics(out, len(r))
        if self.global_step % self.hparams.log_completions_every_n_steps < self.optimizer_steps_per_batch():
            names = list(r.rewards_per_func)
            rows = [(r.prompts[i], r.completions[i], *(f"{r.rewards_per_func[n][i].item():.3g}" for n in names),
                     f"{r.rewards[i].item():.3g}", f"{float(r.advantages.reshape(len(r), -1)[i, 0]):.3g}")
                    for i in range(min(len(r), self.hparams.num_logged_samples))]
            self.log_text("train/completions", ["prompt", "completion", *names, "reward", "advantage"], rows)
