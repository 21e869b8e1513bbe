"""Seq2Seq: the encoder-decoder Transformer of "Attention Is All You Need", trained as in the paper.

Source = the prompt ("reverse 4821="), target = the completion ("1284" + EOS). Teacher forcing: the decoder
reads BOS + y_<t and predicts y_t at every position in one pass.

Label smoothing (section 5.4, epsilon_ls = 0.1): the target distribution is q = (1 - eps) * onehot(y) + eps / V,

    L = - 1/|y| * sum_t [ (1 - eps) * log p(y_t | x, y_<t) + eps * 1/V * sum_v log p(v | x, y_<t) ]

Learning rate (section 5.3, equation 3), with step counted from 1 and Adam(beta1=0.9, beta2=0.98, eps=1e-9):

    lr(step) = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)

i.e. linear warm-up to lr_scale * (d_model * warmup_steps)^-0.5 at step = warmup_steps, then 1/sqrt(step) decay.

Validation: greedy decoding on the cache, exact match of the answer (``val/accuracy``) and a text table of
samples in TensorBoard, as every other algorithm does.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F

from alignlab.algorithms.base import check, check_kind
from alignlab.algorithms.validation import GenerativeValidation
from alignlab.data.tokenizer import load_tokenizer
from alignlab.losses.lm import masked_mean
from alignlab.model.generate import GenerationOutput
from alignlab.model.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from alignlab.rewards.rules import accuracy_reward


def noam_lr(step: int, d_model: int, warmup_steps: int, lr_scale: float = 1.0) -> float:
    """lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), for optimizer step >= 1."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    return lr_scale * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


def label_smoothed_nll(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy against the smoothed target (1 - eps) * onehot + eps / V, averaged over real tokens.

    Args:
        logits: (B, T, V); logits[:, t] predicts targets[:, t].
        targets: (B, T) token ids (any value where mask is 0).
        mask: (B, T) 1 on target tokens that count (the completion up to and including EOS).
        epsilon: label-smoothing mass spread uniformly over the V classes (0 = plain cross-entropy).
    Returns:
        loss, {"nll": unsmoothed cross-entropy, "token_accuracy": argmax == target, "num_tokens"}.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    uniform = -logp.mean(-1)  # (B, T): cross-entropy against the uniform distribution
    loss = masked_mean((1 - epsilon) * nll + epsilon * uniform, mask)
    with torch.no_grad():
        metrics = {
            "nll": masked_mean(nll, mask),
            "token_accuracy": masked_mean((logits.argmax(-1) == targets).float(), mask),
            "num_tokens": mask.sum(),
        }
    return loss, metrics


class Seq2Seq(GenerativeValidation, L.LightningModule):
    data_kind = "sft"  # prompt = source, completion = target

    def __init__(
        self,
        init_from: str | None = None,
        arch: Seq2SeqConfig | None = None,
        label_smoothing: float = 0.1,
        warmup_steps: int = 4000,
        lr_scale: float = 1.0,
        adam_betas: tuple[float, float] = (0.9, 0.98),
        adam_eps: float = 1e-9,
        max_grad_norm: float = 0.0,
        val_max_new_tokens: int = 16,
        num_logged_samples: int = 8,
        sampling_seed: int = 0,
    ):
        """
        Args:
            init_from: local directory written by ``export`` (a Seq2Seq model + tokenizer); None = fresh model.
            arch: architecture of a fresh model (ignored with init_from); default Seq2SeqConfig().
            label_smoothing: epsilon_ls, the probability mass spread uniformly over the vocabulary (paper: 0.1).
            warmup_steps: optimizer steps of linear warm-up before the 1/sqrt(step) decay (paper: 4000).
            lr_scale: factor on the paper's schedule lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).
            adam_betas: Adam (beta1, beta2) (paper: 0.9, 0.98).
            adam_eps: Adam epsilon (paper: 1e-9).
            max_grad_norm: gradient clipping norm (0 = off, as in the paper).
            val_max_new_tokens: tokens decoded per validation source.
            num_logged_samples: validation samples written to TensorBoard as text.
            sampling_seed: seed of the generator used by ``generate(greedy=False)``.
        """
        super().__init__()
        check(0 <= label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {label_smoothing}")
        check(warmup_steps >= 1, "warmup_steps", f"must be >= 1, got {warmup_steps}")
        check(lr_scale > 0, "lr_scale", f"must be > 0, got {lr_scale}")
        check(len(adam_betas) == 2 and all(0 <= b < 1 for b in adam_betas), "adam_betas",
              f"must be two numbers in [0, 1), got {adam_betas}")
        check(adam_eps > 0, "adam_eps", f"must be > 0, got {adam_eps}")
        check(max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {max_grad_norm}")
        check(val_max_new_tokens >= 1, "val_max_new_tokens", f"must be >= 1, got {val_max_new_tokens}")
        check(num_logged_samples >= 0, "num_logged_samples", f"must be >= 0, got {num_logged_samples}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(init_from)
        check(self.tokenizer.bos_token_id is not None, "init_from",
              "the tokenizer has no BOS token (the decoder starts every target with it)")
        if init_from is not None:
            self.model = Seq2SeqTransformer.load(init_from)
        else:
            arch = copy.deepcopy(arch) if arch is not None else Seq2SeqConfig()
            check(arch.vocab_size >= len(self.tokenizer), "arch.vocab_size",
                  f"{arch.vocab_size} is smaller than the tokenizer's {len(self.tokenizer)} tokens")
            self.model = Seq2SeqTransformer(arch)
        self.init_validation()
        self.generator = torch.Generator().manual_seed(sampling_seed)

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    # ----------------------------------------------------------------------------- training
    def decoder_inputs(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: BOS + y_<t, the target shifted right by one. (B, T) -> (B, T)"""
        bos = completion_ids.new_full((completion_ids.shape[0], 1), self.bos_id)
        return torch.cat([bos, completion_ids[:, :-1]], dim=1)

    def training_step(self, batch, batch_idx):
        src, src_mask = batch["prompt_ids"], batch["prompt_mask"]  # (B, S), left-padded
        tgt, tgt_mask = batch["completion_ids"], batch["completion_mask"]  # (B, T), right-padded, ends in EOS
        logits = self.model(src, src_mask, self.decoder_inputs(tgt))  # (B, T, V)
        loss, metrics = label_smoothed_nll(logits, tgt, tgt_mask, self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/nll", metrics["nll"])
        self.log("train/token_accuracy", metrics["token_accuracy"])
        self.log("train/num_tokens", metrics["num_tokens"].float(), reduce_fx="sum")
        return loss

    # --------------------------------------------------------------------------- generation
    def generate(self, src_ids, src_mask, max_new_tokens: int, greedy: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0) -> GenerationOutput:
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(src_ids, src_mask, max_new_tokens, self.bos_id, self.eos_id, self.pad_id,
                                  greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=self.generator if src_ids.device.type == "cpu" else None)
        self.model.train(was_training)
        return out

    # --------------------------------------------------------------------------- validation
    # GenerativeValidation (val/accuracy + a table of samples, as every PolicyModule) needs only
    # self.generate (above), the tokenizer, the val_* hyper-parameters and the verifier: exact match of the
    # answer after the last "=".
    val_reward_fn = staticmethod(accuracy_reward)

    def check_data(self, dm) -> None:
        check_kind(self, dm)  # seq2seq trains on sft rows

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:  # one sampling stream per rank
            self.generator.manual_seed(self.hparams.sampling_seed + self.global_rank)
        self.check_data(getattr(self.trainer, "datamodule", None))

    # ---------------------------------------------------------------------------- optimizer
    def lr_lambda(self, step: int) -> float:
        """LambdaLR multiplier on a base lr of 1: LambdaLR's step 0 is the paper's step 1."""
        return noam_lr(step + 1, self.model.config.d_model, self.hparams.warmup_steps, self.hparams.lr_scale)

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.Adam(self.model.parameters(), lr=1.0, betas=tuple(h.adam_betas), eps=h.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm,
                                gradient_clip_algorithm="norm")

    # ------------------------------------------------------------------------------- export
    def export(self, path) -> None:
        """config.json + model.safetensors + tokenizer (what ``init_from`` loads; called by HFExport)."""
        self.model.save(path, tokenizer=self.tokenizer)
