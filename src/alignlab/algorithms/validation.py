"""Validation by greedy generation: ``val/accuracy`` and a table of samples in TensorBoard's Text tab.

A mixin of every generating module (``PolicyModule``, ``Seq2Seq``). The host provides ``generate(prompt_ids,
prompt_mask, max_new_tokens, greedy=True)`` returning a ``GenerationOutput``, ``tokenizer``,
``val_reward_fn`` (the verifier: a reward function called with the batch's columns, 1.0 = correct) and the
hyper-parameters ``val_max_new_tokens`` and ``num_logged_samples``; it calls ``init_validation()`` in its
``__init__``.
"""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import MeanMetric


def token_lists(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's ids where mask is 1, as Python lists (the batch converted at once, not row by row)."""
    return [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids.tolist(), mask.tolist())]


class GenerativeValidation:
    def init_validation(self) -> None:
        self.val_accuracy = MeanMetric()
        self._val_samples: list[tuple] = []

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(token_lists(ids, mask), skip_special_tokens=True)

    def validation_step(self, batch, batch_idx):
        out = self.generate(batch["prompt_ids"], batch["prompt_mask"], self.hparams.val_max_new_tokens, greedy=True)
        completions = self.decode(out.completion_ids, out.completion_mask)
        columns = {k: v for k, v in batch.items() if isinstance(v, list) and k != "prompt"}  # answer, ...
        correct = torch.tensor(self.val_reward_fn(batch["prompt"], completions, **columns), device=self.device)
        self.val_accuracy.update(correct)
        for p, c, a, r in zip(batch["prompt"], completions, batch["answer"], correct.tolist()):
            if len(self._val_samples) < self.hparams.num_logged_samples:
                self._val_samples.append((p, c, a, r))
        return correct.mean()

    def on_validation_epoch_end(self):
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True, sync_dist=False)
        with torch.inference_mode(False):  # validation runs in inference mode; keep metric state trainable-safe
            self.val_accuracy.reset()
        self.log_text("val/samples", ["prompt", "completion", "answer", "correct"], self._val_samples)
        self._val_samples = []

    def log_text(self, tag: str, header: list[str], rows: list[tuple]) -> None:
        """A markdown table in TensorBoard's Text tab."""
        if not rows or not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        esc = lambda x: str(x).replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(esc(x) for x in row) + " |" for row in rows]
        self.logger.experiment.add_text(tag, "\n".join(lines), self.global_step)
