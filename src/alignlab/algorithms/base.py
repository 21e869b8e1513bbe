"""PolicyModule: what every algorithm shares.

The policy (a hand-written ``Transformer``, fresh or loaded from an HF export; with ``lora`` only its
adapters train), an optional frozen reference (a copy, or with LoRA the policy with its adapters off), the
tokenizer, per-token log-probs of completions, AdamW with warm-up, validation by greedy generation
(``val/accuracy`` and a text table of samples), and the HF export at the end of training. Subclasses add a
``training_step``; their ``__init__`` arguments are their config.

Its pieces elsewhere: the NaN/Inf guard and gradient clipping (``nonfinite.py``), validation by greedy
generation (``validation.py``).
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from alignlab.algorithms.nonfinite import NonFiniteError, NonFiniteGuard  # noqa: F401 (NonFiniteError: re-exported)
from alignlab.algorithms.validation import GenerativeValidation, token_lists  # noqa: F401 (token_lists: re-exported)
from alignlab.checkpoint import weights_digest
from alignlab.data.tokenizer import load_tokenizer
from alignlab.losses.lm import chunked_token_logps
from alignlab.model.generate import GenerationOutput, generate
from alignlab.model.hf import load_hf, save_hf
from alignlab.model.lora import AdaptersOff, LoRAConfig, apply_lora, save_peft_adapter
from alignlab.model.speed import PrefixCache
from alignlab.model.transformer import Transformer, TransformerConfig


def resolve_callable(path: str, arg: str) -> Callable:
    """``"package.module.fn"`` -> the function; an unresolvable path fails naming the argument."""
    module_name, _, attr = path.rpartition(".")
    try:
        if not module_name:
            raise ImportError(f"{path!r} is not a dotted import path")
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.{arg}: cannot import {path!r} ({e})") from None
    if not callable(fn):
        raise ValueError(f"model.{arg}: {path!r} is not callable")
    return fn


def check(condition: bool, name: str, message: str) -> None:
    """Config validation: one line naming the argument."""
    if not condition:
        raise ValueError(f"model.{name}: {message}")


def check_kind(module, dm) -> None:
    """The DataModule serves the rows ``module`` trains on (``data.kind`` == ``module.data_kind``)."""
    kind = getattr(getattr(dm, "hparams", None), "kind", None)
    if kind is not None and kind != module.data_kind:
        raise ValueError(f"data.kind is {kind!r} but {type(module).__name__} trains on {module.data_kind!r} rows; "
                         f"set data.kind: {module.data_kind}")


class PolicyModule(NonFiniteGuard, GenerativeValidation, L.LightningModule):
    data_kind = "sft"  # rows this algorithm needs from the DataModule

    def __init__(
        self,
        init_from: str | None = None,
        arch: TransformerConfig | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        max_grad_norm: float = 1.0,
        val_max_new_tokens: int = 24,
        val_reward: str = "alignlab.rewards.rules.accuracy_reward",
        num_logged_samples: int = 8,
        sampling_seed: int = 0,
        nonfinite: Literal["skip", "stop"] = "skip",
        nonfinite_patience: int = 10,
        lora: LoRAConfig | None = None,
        activation_checkpointing: bool = False,
        logits_chunk_size: int | None = None,
        fused_optimizer: bool = False,
    ):
        """
        Args:
            init_from: local HF directory (an alignlab export or a Llama/Qwen checkpoint); None = fresh model.
            arch: architecture of a fresh model (ignored with init_from); default TransformerConfig().
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay (applied to matrices only).
            warmup_steps: linear warm-up optimizer steps.
            lr_schedule: constant after warm-up, or cosine decay to 10% over the run.
            max_grad_norm: gradient clipping norm (0 = off).
            val_max_new_tokens: tokens generated per validation prompt.
            val_reward: import path of the verifier behind ``val/accuracy`` (a reward function, called with the
                batch's columns): ``...rules.answer_accuracy_reward`` for free-text (chat) answers.
            num_logged_samples: validation samples written to TensorBoard as text.
            sampling_seed: seed of the generator that drives sampling (rollouts).
            nonfinite: a NaN/Inf loss, reward or gradient norm skips the optimizer step with a warning ("skip"),
                or stops the run with an error naming the step and the quantity ("stop").
            nonfinite_patience: with "skip", stop anyway after this many consecutive skipped steps.
            lora: train low-rank adapters instead of the weights (``{r, alpha, dropout, target_modules}``, see
                model/lora.py); the reference is then the policy with its adapters off. None = full fine-tuning.
            activation_checkpointing: recompute each Transformer block's activations in the backward instead of
                keeping them (less memory, one more forward of the blocks).
            logits_chunk_size: the LM head runs on the scored positions only (always), this many at a time,
                each chunk recomputed in the backward (memory: chunk x vocabulary floats; e.g. 256 for a real
                vocabulary). None = all scored positions at once, their logits kept for the backward.
            fused_optimizer: AdamW as one fused kernel (torch's ``fused=True``) instead of multi-tensor ops
                (``foreach=True``): the same update up to float rounding (tested), 3-6x faster optimizer steps on
                the CPU (0.08 s against 0.27-0.48 s for SmolLM2-135M's parameters). Off by default, so that
                runs reproduce the recorded curves bit for bit.
        """
        super().__init__()
        check(lr > 0, "lr", f"must be > 0, got {lr}")
        check(weight_decay >= 0, "weight_decay", f"must be >= 0, got {weight_decay}")
        check(warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {warmup_steps}")
        check(max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {max_grad_norm}")
        check(val_max_new_tokens >= 1, "val_max_new_tokens", f"must be >= 1, got {val_max_new_tokens}")
        check(init_from is None or Path(init_from).is_dir(), "init_from",
              f"{init_from}: no such directory (an alignlab export or a local HF checkpoint; "
              f"`make model` builds models/smollm2-135m-instruct)")
        check(nonfinite in ("skip", "stop"), "nonfinite", f"must be skip|stop, got {nonfinite!r}")
        check(nonfinite_patience >= 1, "nonfinite_patience", f"must be >= 1, got {nonfinite_patience}")
        check(logits_chunk_size is None or logits_chunk_size >= 1, "logits_chunk_size",
              f"must be >= 1 or null, got {logits_chunk_size}")
        for key, message in (lora.errors() if lora is not None else []):
            check(False, f"lora.{key}", message)
        self.val_reward_fn = resolve_callable(val_reward, "val_reward")
        self.save_hyperparameters()
        self.lora = lora  # the LoRAConfig (under LightningCLI hparams hold its plain dict)
        self.tokenizer = load_tokenizer(init_from)
        # frozen models that equal a directory: left out of checkpoints, reloaded from it (on_save_checkpoint)
        self._rebuildable: list[tuple[torch.nn.Module, str, str]] = []  # (module, directory, weights digest)
        self._frozen: list = []  # models kept in eval mode and out of the optimizer (``frozen``)
        self.build_model(init_from, arch)
        self.ref = self.build_reference(init_from) if self.needs_reference() else None
        self.init_validation()
        self.generator = torch.Generator().manual_seed(sampling_seed)

    # ------------------------------------------------------------------------------ models
    def build_model(self, init_from: str | None, arch: TransformerConfig | None) -> None:
        """The model(s) to train: here ``self.policy``. RewardModel builds its scalar model instead."""
        self.policy = self.new_transformer(init_from, arch)

    def needs_reference(self) -> bool:
        """Does the algorithm keep a frozen copy of the starting policy (``self.ref``)? Read once the
        hyper-parameters are saved: GRPO's depends on ``beta``, DPO's on ``precompute_ref_logps``."""
        return False

    def build_reference(self, init_from: str | None):
        """The frozen reference pi_ref: with LoRA the policy with its adapters off (no copy), else a copy."""
        if self.lora is not None:
            return AdaptersOff(self.policy)  # the same weights, adapters off: no copy
        ref = self.frozen(copy.deepcopy(self.policy))
        self.rebuildable(ref, init_from)
        return ref

    def new_transformer(self, init_from: str | None, arch: TransformerConfig | None) -> Transformer:
        """A Transformer loaded from ``init_from`` (or fresh, of ``arch``) with the memory options applied."""
        if init_from is not None:
            model = load_hf(init_from)
        else:
            arch = copy.deepcopy(arch) if arch is not None else TransformerConfig()
            check(arch.vocab_size >= len(self.tokenizer), "arch.vocab_size",
                  f"{arch.vocab_size} is smaller than the tokenizer's {len(self.tokenizer)} tokens")
            model = Transformer(arch)
        self.adapt(model, init_from)
        return model

    def adapt(self, trunk: Transformer, source: str | None) -> None:
        """Apply the memory options to a Transformer to be trained, loaded from ``source`` (a directory or None): LoRA
        adapters (its frozen base weights are then rebuilt from ``source`` on resume) and activation
        checkpointing."""
        if self.lora is not None:
            apply_lora(trunk, self.lora)
            self.rebuildable(trunk, source)
        trunk.activation_checkpointing = self.hparams.activation_checkpointing

    def rebuildable(self, module: torch.nn.Module, source: str | None) -> None:
        """``module``'s frozen parameters equal what ``source`` holds: checkpoints leave them out and store a
        digest of the directory instead, which resume checks before the directory's weights are used."""
        if source is not None:  # one digest per directory (a LoRA base and PPO's critic share init_from)
            known = {d: h for _, d, h in self._rebuildable}
            digest = known.get(str(source)) or weights_digest(source)
            self._rebuildable.append((module, str(source), digest))

    def frozen(self, model):
        """``model``, never trained: eval mode (kept so by ``train``), no grads, so out of the optimizer."""
        model.eval().requires_grad_(False)
        self._frozen.append(model)
        return model

    def train(self, mode: bool = True):
        super().train(mode)
        for model in self._frozen:
            model.eval()
        return self

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    # -------------------------------------------------------------------------- log-probs
    def completion_states(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                          prompt_index: torch.Tensor | None = None, hidden: bool = False):
        """Logits (B, C, V) that predict each completion token, or with ``hidden`` the final hidden states
        (B, C, D) at those positions (the LM head left to ``token_logps``).

        Without ``prompt_index``: one forward over prompt + completion. With it, (B,) ids where equal ids
        mean the same prompt (a GRPO group): each distinct prompt goes through the model once, its keys and
        values are shared by its rows' completions (``PrefixCache``), and gradients add up in the prompt.
        Same values and gradients, (B - U) x P fewer token positions computed (U distinct prompts).
        """
        C = completion_ids.shape[1]
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        uniq, inverse = torch.unique(prompt_index, return_inverse=True) if prompt_index is not None else (None, None)
        if uniq is None or len(uniq) == len(inverse):  # no prompt is shared: one forward over the full rows
            return model(torch.cat([prompt_ids, completion_ids], dim=1), mask, logits_to_keep=C + 1,
                         return_hidden=hidden)[:, :-1]
        rows = torch.arange(len(inverse), device=inverse.device)
        first = torch.full_like(uniq, len(inverse)).scatter_reduce(0, inverse, rows, "amin")  # a row per prompt
        cache = PrefixCache()
        last = model(prompt_ids[first], prompt_mask[first], cache=cache, logits_to_keep=1,
                     return_hidden=hidden)  # predicts token 0
        last = last.index_select(0, inverse)
        if C == 1:
            return last
        cache.select_rows(inverse)
        rest = model(completion_ids[:, :-1], mask[:, :-1], cache=cache, return_hidden=hidden)  # tokens 1 .. C-1
        return torch.cat([last, rest], dim=1)

    def token_logps(self, model, hidden, targets, mask, temperature: float = 1.0, with_entropy: bool = False,
                    entropy_grad: bool = False):
        """Log-probs (B, T) of ``targets`` under softmax(logits / temperature) [, entropies (B, T)].

        ``hidden`` are the final hidden states (B, T, D): the LM head runs at the positions where ``mask`` is 1
        only (never at padding or prompt tokens), ``logits_chunk_size`` of them at a time if set
        (``chunked_token_logps``: no (N, V) tensor is kept for the backward); the other positions hold 0.
        The entropies are detached unless ``entropy_grad``.
        """
        real = mask.bool()
        logps, ent = chunked_token_logps(hidden[real], model.lm_head.weight, targets[real], temperature,
                                         self.hparams.logits_chunk_size, with_entropy)
        zeros = hidden.new_zeros(real.shape, dtype=torch.float32)
        logps = zeros.masked_scatter(real, logps)
        if not with_entropy:
            return logps
        ent = zeros.masked_scatter(real, ent)
        return logps, ent if entropy_grad else ent.detach()

    def completion_logps(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                         temperature: float = 1.0, with_entropy: bool = False,
                         prompt_index: torch.Tensor | None = None, entropy_grad: bool = False):
        """Per-token log-probs of the completion under softmax(logits / temperature): (B, C) [, entropy].
        ``prompt_index``: see ``completion_states``; ``entropy_grad``: see ``token_logps``."""
        states = self.completion_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                        prompt_index, hidden=True)
        return self.token_logps(model, states, completion_ids, completion_mask, temperature, with_entropy,
                                entropy_grad)

    def sequence_token_logps(self, model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
        """Log-probs (B, T-1) of tokens 1.. of right-padded full sequences where loss_mask is 1 (0 elsewhere)."""
        states = model(input_ids[:, :-1], attention_mask[:, :-1], return_hidden=True)  # t -> t + 1
        return self.token_logps(model, states, input_ids[:, 1:], loss_mask[:, 1:])

    def sequence_logps(self, model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
        """Summed log-probs of the tokens where loss_mask is 1, for right-padded full sequences: (B,)."""
        logps = self.sequence_token_logps(model, input_ids, attention_mask, loss_mask)
        return (logps * loss_mask[:, 1:]).sum(-1)

    # ------------------------------------------------------------------------- generation
    def generate(self, prompt_ids, prompt_mask, max_new_tokens: int, greedy: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
                 model=None) -> GenerationOutput:
        """Sample with the policy (or ``model``, a sampler's copy of it: the int8 rollout engine's)."""
        model = self.policy if model is None else model
        was_training = model.training
        model.eval()
        out = generate(model, prompt_ids, prompt_mask, max_new_tokens, self.eos_id, self.pad_id,
                       temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                       generator=self.generator if prompt_ids.device.type == "cpu" else None,
                       num_samples=num_samples)
        model.train(was_training)
        return out

    # -------------------------------------------------------------------------- optimizer
    def trainable_parameters(self):
        return self.policy.parameters()

    def param_groups(self, params, lr: float) -> list[dict]:
        """Weight decay on matrices only (not norms, biases)."""
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": self.hparams.weight_decay, "lr": lr},
                {"params": no_decay, "weight_decay": 0.0, "lr": lr}]

    def lr_lambda(self, step: int) -> float:
        h = self.hparams
        if step < h.warmup_steps:
            return (step + 1) / (h.warmup_steps + 1)
        if h.lr_schedule == "constant":
            return 1.0
        total = max(1, self.trainer.estimated_stepping_batches * self.optimizer_steps_per_batch() - h.warmup_steps)
        progress = min(1.0, (step - h.warmup_steps) / total)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def optimizer_steps_per_batch(self) -> int:
        return 1

    def adamw(self, groups: list[dict]) -> torch.optim.AdamW:
        """AdamW over the parameter groups, betas (0.9, 0.95), fused or multi-tensor (``fused_optimizer``)."""
        how = {"fused": True} if self.hparams.fused_optimizer else {"foreach": True}
        return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=(0.9, 0.95), **how)

    def configure_optimizers(self):
        groups = self.param_groups(self.trainable_parameters(), self.hparams.lr)
        opt = self.adamw(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def logging_step(self) -> bool:
        """Will Lightning write this training step's metrics to the logger (every trainer.log_every_n_steps-th)?
        Diagnostics are logged only then: each self.log costs ~0.3 ms of Lightning's bookkeeping.

        The one private Lightning attribute alignlab reads: the logger connector's own decision (it also
        counts ``trainer.should_stop``), which no public API exposes. Tested by
        ``test_every_metric_reaches_the_logger_on_its_logging_steps``: if Lightning renames it, every step
        logs (the default below) and that test fails."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return getattr(connector, "should_update_logs", True)

    # ----------------------------------------------------------------------------- export
    def export(self, path: str | Path) -> None:
        """HF-format policy + tokenizer: what the next stage (or transformers) loads. With LoRA the policy is
        written merged, and its adapters alone in PEFT's format under ``<path>/adapter`` (a subdirectory:
        an adapter_config.json beside config.json would make transformers load the directory as an adapter)."""
        save_hf(self.policy, path, tokenizer=self.tokenizer)
        if self.lora is not None:
            base = self.hparams.init_from
            save_peft_adapter(self.policy, self.lora, Path(path) / "adapter",
                              base_model_name_or_path=str(Path(base).resolve()) if base is not None else None)

    # ---------------------------------------------------------------------- checkpoints
    def rebuildable_keys(self) -> dict[str, tuple[str, str, list[str]]]:
        """State-dict prefix -> (directory, digest, keys of the frozen parameters under it): what checkpoints
        leave out because the directory holds it (a frozen reference or reward model, a LoRA base)."""
        named = {id(m): name for name, m in self.named_modules()}
        params = dict(self.named_parameters(remove_duplicate=False))
        out = {}
        for module, directory, digest in self._rebuildable:
            prefix = f"{named[id(module)]}."
            keys = [k for k, p in params.items() if k.startswith(prefix) and not p.requires_grad]
            out[prefix] = (directory, digest, keys)
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Beyond what Lightning saves (weights, optimizer, scheduler, loops, data position): the sampling
        generator of every rank, (world, state bytes), for an exact resume. Frozen weights that a directory
        holds are left out; ``rebuilt_from`` keeps each one's directory and weights digest instead."""
        state = self.generator.get_state()
        checkpoint["sampling_generator"] = self.all_gather(state) if self.world_size > 1 else state[None]
        # torch's own stream drives dropout (LoRA's): restored at the next training batch (below)
        state = torch.get_rng_state().to(self.device)
        checkpoint["torch_rng_state"] = self.all_gather(state) if self.world_size > 1 else state[None]
        weights, rebuilt = checkpoint.get("state_dict", {}), {}
        for prefix, (directory, digest, keys) in self.rebuildable_keys().items():
            for k in keys:
                weights.pop(k, None)
            rebuilt[prefix] = {"directory": directory, "digest": digest}
        checkpoint["rebuilt_from"] = rebuilt

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.restore_rebuilt(checkpoint)
        rng = checkpoint.get("torch_rng_state")
        if rng is not None:
            self._resume_rng_state = rng[self.global_rank % len(rng)].to("cpu", torch.uint8).clone()
        states = checkpoint.get("sampling_generator")
        if states is None:
            return
        if len(states) != self.world_size:
            rank_zero_warn(f"the checkpoint holds the sampling generators of {len(states)} ranks, this run has "
                           f"{self.world_size}: rank r continues rank r mod {len(states)}'s stream")
        # clone: set_state on a view with a storage offset (a row of the (world, N) tensor) segfaults
        self.generator.set_state(states[self.global_rank % len(states)].to("cpu", torch.uint8).clone())

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """After a resume, torch's random stream continues where the checkpointed run was at this point: set
        here rather than at load time, since Lightning draws from it in between (starting the data loader)."""
        if getattr(self, "_resume_rng_state", None) is not None:
            torch.set_rng_state(self._resume_rng_state)
            self._resume_rng_state = None

    def restore_rebuilt(self, checkpoint: dict) -> None:
        """Put the weights a checkpoint left out back into it, from this run's models, after checking that they
        were loaded from a directory with the same weights digest (else one line naming the directory)."""
        where = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        ours, weights = self.rebuildable_keys(), checkpoint.get("state_dict", {})
        current = self.state_dict()
        for prefix, saved in checkpoint.get("rebuilt_from", {}).items():
            if prefix not in ours:
                raise ValueError(f"ckpt_path: {where} left out the frozen weights of {prefix.rstrip('.')} to be "
                                 f"reloaded from {saved['directory']}, but this run loads no such model from a "
                                 f"directory; resume with the run's own config")
            directory, digest, keys = ours[prefix]
            if digest != saved["digest"]:
                raise ValueError(f"ckpt_path: {where} expects the frozen weights of {prefix.rstrip('.')} from "
                                 f"{saved['directory']}, but {directory} now holds other weights (digest "
                                 f"{digest[:12]} != {saved['digest'][:12]}); restore that directory to resume")
            for k in keys:
                weights.setdefault(k, current[k])

    @property
    def world_size(self) -> int:
        """Number of DDP processes (1 before the module is attached to a Trainer)."""
        return self.trainer.world_size if self._trainer is not None else 1

    # ------------------------------------------------------------------------ data checks
    def generation_budget(self) -> tuple[int, str]:
        """The most tokens generated after a prompt, and the arguments that set it (validation's here)."""
        return self.hparams.val_max_new_tokens, "model.val_max_new_tokens"

    def check_data(self, dm) -> None:
        """The DataModule's rows fit this module: their kind, and every sequence within the model's context.

        Called from ``setup`` and, by the CLI, before the run directory is written.
        """
        check_kind(self, dm)
        rows = (getattr(dm, "train_rows", None) or []) + (getattr(dm, "val_rows", None) or [])
        if not rows:
            return
        context = next(m for m in self.modules() if isinstance(m, Transformer)).config.max_seq_len
        longest = max(len(r["prompt_ids"]) + max((len(r[k]) for k in r if k.endswith("_ids") and k != "prompt_ids"),
                                                 default=0) for r in rows)
        if longest > context:
            raise ValueError(f"data: a prompt + completion of {longest} tokens exceeds the model's context "
                             f"max_seq_len={context} (model.arch.max_seq_len, or init_from's max_position_embeddings);"
                             f" lower data.max_prompt_length / data.max_completion_length")
        prompt, (new, args) = max(len(r["prompt_ids"]) for r in rows), self.generation_budget()
        if prompt + new > context:
            raise ValueError(f"data: the longest prompt ({prompt} tokens) + {new} generated tokens = {prompt + new} "
                             f"exceeds the model's context max_seq_len={context} (model.arch.max_seq_len, or "
                             f"init_from's max_position_embeddings); lower data.max_prompt_length or {args}")

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1 and hasattr(self, "generator"):  # one sampling stream per rank
            self.generator.manual_seed(self.hparams.sampling_seed + self.global_rank)
        self.check_data(getattr(self.trainer, "datamodule", None))
