"""One LightningDataModule for every algorithm.

It serves three kinds of rows, from a built-in task or from JSONL files in TRL's standard columns:

- ``sft``: ``prompt`` + ``completion`` (or conversational ``messages`` whose last turn is the assistant's)
- ``prompt``: ``prompt`` plus any extra columns (e.g. ``answer``) handed to the reward functions
- ``preference``: ``prompt`` + ``chosen`` + ``rejected`` (optional ``margin``)

Every text field may be a string or a conversational list of ``{"role", "content"}`` messages (rendered
with the tokenizer's chat template). Bad rows stop the run with ``file:line: field 'x': what is wrong``.
Rows longer than the limits are an error, or, with ``truncation=True``, are cut and counted.

Validation batches always carry left-padded prompts plus ``answer`` so every algorithm can generate and
report ``val/accuracy``; preference validation batches also carry the chosen/rejected pairs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from alignlab.data.tasks import ANSWER_FORMATS, get_task
from alignlab.data.tokenizer import load_tokenizer, render_completion, render_prompt

KINDS = ("sft", "prompt", "preference")
REQUIRED = {"sft": ("prompt", "completion"), "prompt": ("prompt",), "preference": ("prompt", "chosen", "rejected")}


class DataError(ValueError):
    """A bad input row: the message names the file, the line and the field."""


# ---------------------------------------------------------------------------------------------- reading
def _check_text(value: Any, where: str, field: str) -> None:
    """A field is a non-empty string or a non-empty list of {role: str, content: str} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        return
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: field '{field}' message {i} must be an object with string 'role' and 'content'")
        return
    if isinstance(value, list):
        raise DataError(f"{where}: field '{field}' is empty")
    raise DataError(f"{where}: field '{field}' must be a string or a list of messages, got {type(value).__name__}")


def validate_row(row: Any, kind: str, where: str) -> dict:
    """Check one row of ``kind`` and normalise conversational SFT rows to prompt/completion."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if kind == "sft" and "messages" in row and "prompt" not in row:
        msgs = row["messages"]
        _check_text(msgs, where, "messages")
        if isinstance(msgs, str) or msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise DataError(f"{where}: field 'messages' must end with an assistant turn after at least one other")
        row = {**{k: v for k, v in row.items() if k != "messages"}, "prompt": msgs[:-1], "completion": msgs[-1:]}
    for field in REQUIRED[kind]:
        if field not in row:
            raise DataError(f"{where}: missing field '{field}' (a {kind} row needs {', '.join(REQUIRED[kind])})")
        _check_text(row[field], where, field)
    if "answer" in row and not isinstance(row["answer"], str):
        raise DataError(f"{where}: field 'answer' must be a string, got {type(row['answer']).__name__}")
    if "margin" in row and (isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float))):
        raise DataError(f"{where}: field 'margin' must be a number, got {type(row['margin']).__name__}")
    return row


def read_jsonl(path: str | Path, kind: str) -> list[tuple[str, dict]]:
    """Rows of a JSONL file as ``(where, row)`` with ``where = 'file:line'``; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            rows.append((where, validate_row(row, kind, where)))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# ----------------------------------------------------------------------------------------- collating
def pad(seqs: list[list[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists -> (ids, mask) of shape (B, max_len), padded on ``side`` ('left' or 'right')."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int, length: int | None = None):
    """prompt + completion, right-padded: (input_ids, attention_mask, loss_mask) with loss on completions."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    ids, mask = pad(seqs, pad_id, "right")
    if length is not None and ids.shape[1] < length:
        extra = length - ids.shape[1]
        ids = torch.cat([ids, ids.new_full((len(seqs), extra), pad_id)], 1)
        mask = torch.cat([mask, mask.new_zeros(len(seqs), extra)], 1)
    loss_mask = torch.zeros_like(mask)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        loss_mask[i, len(p) : len(p) + len(c)] = 1
    return ids, mask, loss_mask


class Collator:
    """Turns a list of tokenized rows into the batch dict for ``kind`` (see module docstring)."""

    TOKEN_KEYS = ("prompt_ids", "completion_ids", "chosen_ids", "rejected_ids")

    def __init__(self, kind: str, pad_id: int):
        self.kind, self.pad_id = kind, pad_id

    def __call__(self, rows: list[dict]) -> dict:
        batch: dict[str, Any] = {}
        prompts = [r["prompt_ids"] for r in rows]
        batch["prompt_ids"], batch["prompt_mask"] = pad(prompts, self.pad_id, "left")
        if self.kind == "sft":
            comps = [r["completion_ids"] for r in rows]
            batch["input_ids"], batch["attention_mask"], batch["loss_mask"] = sequences(prompts, comps, self.pad_id)
            batch["completion_ids"], batch["completion_mask"] = pad(comps, self.pad_id, "right")
        elif self.kind == "preference":
            chosen = [r["chosen_ids"] for r in rows]
            rejected = [r["rejected_ids"] for r in rows]
            T = max(len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected))
            both, both_mask = pad(chosen + rejected, self.pad_id, "right")  # the completions alone, one width
            for i, (name, comps) in enumerate((("chosen", chosen), ("rejected", rejected))):
                ids, mask, loss_mask = sequences(prompts, comps, self.pad_id, length=T)
                batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"], batch[f"{name}_loss_mask"] = ids, mask, loss_mask
                rows_i = slice(i * len(rows), (i + 1) * len(rows))
                batch[f"{name}_completion_ids"], batch[f"{name}_completion_mask"] = both[rows_i], both_mask[rows_i]
            if "margin" in rows[0]:
                batch["margin"] = torch.tensor([float(r.get("margin", 0.0)) for r in rows])
        for key in rows[0]:  # text and extra columns travel as lists
            if key not in self.TOKEN_KEYS and key not in batch:
                batch[key] = [r.get(key) for r in rows]
        return batch


# ------------------------------------------------------------------------------------------ sampling
class ResumableSampler(DistributedSampler):
    """The training order as a function of (seed, epoch), of which rank r takes every world-th index, and
    which can start in the middle of an epoch.

    Epoch e's permutation is the one ``DataLoader(shuffle=True, generator=manual_seed(seed))`` gave for its
    e-th epoch under Lightning (each epoch's iterator draws one int64, then ``randperm``): runs made before
    this sampler existed keep their data order. ``start(epoch, skip)`` makes the next pass be ``epoch``'s
    order without its first ``skip`` indices (of this rank): a run resumed after k batches sees exactly the
    batches the uninterrupted run saw after k. Lightning keeps it under DDP (it is a DistributedSampler) and
    calls ``set_epoch`` before each epoch; used on its own, the epoch advances after each full pass.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def start(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):  # O(epoch x n), microseconds per epoch for our sizes
            torch.empty((), dtype=torch.int64).random_(generator=g)
            perm = torch.randperm(len(self.dataset), generator=g)
        return perm.tolist()

    def __iter__(self):
        indices = self.permutation(self.epoch)[: self.total_size][self.rank :: self.num_replicas]
        indices = indices[self.skip :]
        self.skip = 0
        self.epoch += 1
        return iter(indices)

    # __len__ stays the whole epoch's: Lightning counts a resumed epoch's batches from the restored progress


# -------------------------------------------------------------------------------------- the module
class AlignDataModule(L.LightningDataModule):
    def __init__(
        self,
        kind: Literal["sft", "prompt", "preference"] = "sft",
        task: str = "addition",
        task_args: dict | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        tokenizer: str | None = None,
        batch_size: int = 64,
        val_batch_size: int = 100,
        num_train: int = 20000,
        num_val: int = 200,
        max_prompt_length: int = 64,
        max_completion_length: int = 32,
        truncation: bool = False,
        chat: bool = False,
        answer_format: Literal["boxed", "hash"] = "boxed",
        seed: int = 1234,
        num_workers: int = 0,
        pairs_from: str | None = None,
        pairs_samples: int = 4,
        pairs_reward: str = "alignlab.rewards.rules.accuracy_reward",
        pairs_dir: str = "logs/pairs",
        pairs_val: bool = False,
    ):
        """
        Args:
            kind: which rows to serve for training: sft, prompt (RL) or preference (DPO / reward model).
            task: built-in task name, used when ``train_file`` is not given.
            task_args: keyword arguments of the task (e.g. ``{"max_digits": 3}``).
            train_file: JSONL training rows in TRL's column names (overrides ``task``).
            val_file: JSONL validation rows (defaults to the task's validation split when using a task).
            tokenizer: local HF tokenizer directory; None = the built-in char tokenizer.
            batch_size: training rows per step (prompts per step for RL).
            val_batch_size: validation rows per step.
            num_train: built-in task: number of training examples.
            num_val: built-in task: number of (distinct) validation problems.
            max_prompt_length: prompts longer than this (in tokens) are an error, or truncated on the left.
            max_completion_length: completions longer than this are an error, or truncated on the right.
            truncation: cut over-long rows (counted and reported) instead of failing.
            chat: built-in task as conversations for instruct models: the problem in words as a user turn
                (rendered by the tokenizer's chat template) with an instruction on the answer format; SFT
                targets end with the marked answer. Score with ``alignlab.rewards.rules.answer_*_reward``.
            answer_format: with chat, the final answer the instruction asks for: ``\\boxed{95}`` or ``#### 95``.
            seed: seed of the built-in data and of the training shuffle.
            num_workers: DataLoader workers.
            pairs_from: kind preference from a built-in task: instead of the task's templated training pairs,
                pairs of this policy's own samples (an HF directory, e.g. ``logs/sft/latest_hf``),
                ``pairs_samples`` per prompt ranked by ``pairs_reward`` (see ``data/policy_pairs.py``), kept in
                ``pairs_dir``. Validation keeps the task's rows (every held-out prompt once, unbiased) unless
                ``pairs_val``.
            pairs_samples: completions sampled per prompt for ``pairs_from`` (temperature 1).
            pairs_reward: import path of the verifier that ranks them (1 = right, 0 = wrong).
            pairs_dir: where the sampled pairs are written as JSONL (TRL's columns) and found again.
            pairs_val: with ``pairs_from``, the validation pairs too are the policy's own samples (of the
                held-out prompts, paired the same way): the reward model is then judged on the kind of pairs
                it is trained on and will score in PPO. Off for DPO, whose greedy validation needs every
                held-out prompt once. Without ``pairs_from`` (the task's templated pairs) it changes nothing.
        """
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"data.kind must be one of {KINDS}, got {kind!r}")
        for name, v in (("batch_size", batch_size), ("val_batch_size", val_batch_size),
                        ("max_prompt_length", max_prompt_length), ("max_completion_length", max_completion_length)):
            if v < 1:
                raise ValueError(f"data.{name} must be >= 1, got {v}")
        if pairs_from is not None and (kind != "preference" or train_file is not None):
            raise ValueError("data.pairs_from: samples preference pairs for a built-in task: needs data.kind="
                             "preference and no data.train_file")
        if pairs_samples < 2:
            raise ValueError(f"data.pairs_samples must be >= 2 (a pair needs two samples), got {pairs_samples}")
        if train_file is not None and val_file is None:
            rank_zero_warn("data.train_file is set but data.val_file is not: validation uses the built-in task")
        self.save_hyperparameters()
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"data.answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        self.tokenizer = load_tokenizer(tokenizer)
        if chat and train_file is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("data.chat: the tokenizer has no chat template (chat tasks need an instruct model's "
                             "tokenizer: model.init_args.init_from)")
        self.task = get_task(task, **(task_args or {}))
        self.truncated: dict[str, int] = {}
        self.pairs_stats: dict[str, dict[str, int]] = {}  # split -> counts of the sampled pairs
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done in it), from a checkpoint

    # -- raw rows
    def _task_rows(self, split: str, kind: str) -> list[tuple[str, dict]]:
        h = self.hparams
        n = h.num_train if split == "train" else h.num_val
        rng = random.Random(f"pairs-{split}-{h.seed}")
        rows = []
        task, fmt = self.task, h.answer_format
        for i, ex in enumerate(task.examples(n, split, h.seed)):
            if h.chat:
                prompt = [{"role": "user", "content": task.chat_prompt(ex, fmt)}]
                completion = task.chat_completion(ex, fmt)
            else:
                prompt, completion = ex.prompt, ex.completion
            row = {"prompt": prompt, "completion": completion, "answer": ex.answer}
            if kind == "preference":
                rejected = task.chat_near_miss(ex, rng, fmt) if h.chat else task.near_miss(ex, rng)
                row = {"prompt": prompt, "chosen": completion, "rejected": rejected, "answer": ex.answer}
            rows.append((f"task:{task.name}:{split}:{i}", {**row, **ex.columns}))
        return rows

    # -- tokenizing
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _tokenize(self, rows: list[tuple[str, dict]], kind: str, source: str) -> list[dict]:
        h, eos = self.hparams, self.tokenizer.eos_token_id
        out = []
        for where, row in rows:
            ids = self._encode(render_prompt(self.tokenizer, row["prompt"]))
            if len(ids) > h.max_prompt_length:
                if not h.truncation:
                    raise DataError(f"{where}: field 'prompt' has {len(ids)} tokens > data.max_prompt_length="
                                    f"{h.max_prompt_length} (raise it or set data.truncation=true)")
                ids = ids[-h.max_prompt_length :]
                self.truncated[source] = self.truncated.get(source, 0) + 1
            item = {"prompt_ids": ids, "prompt": render_prompt(self.tokenizer, row["prompt"])}
            fields = {"sft": ("completion",), "preference": ("chosen", "rejected"), "prompt": ()}[kind]
            for field in fields:
                comp = self._encode(render_completion(row[field])) + [eos]
                if len(comp) > h.max_completion_length + 1:
                    if not h.truncation:
                        raise DataError(f"{where}: field '{field}' has {len(comp) - 1} tokens > "
                                        f"data.max_completion_length={h.max_completion_length}")
                    comp = comp[: h.max_completion_length]  # no EOS: the cut is visible to the model
                    self.truncated[source] = self.truncated.get(source, 0) + 1
                item[f"{field}_ids"] = comp
            if "answer" not in row and "completion" in row:  # JSONL without answers: the completion is it
                item["answer"] = render_completion(row["completion"])
            for k, v in row.items():
                if k not in ("prompt", "completion", "chosen", "rejected"):
                    item[k] = v
            out.append(item)
        if self.truncated.get(source):
            rank_zero_warn(f"{source}: truncated {self.truncated[source]} over-long rows (data.truncation=true)")
        return out

    def _policy_pairs_file(self, split: str) -> Path:
        """Where the pairs of ``pairs_from`` for ``split`` are kept: ``pairs_dir/<split>-<digest>.jsonl``, the
        digest covering the policy's weights and every setting that changes the rows."""
        from alignlab.checkpoint import weights_digest

        h = self.hparams
        settings = [weights_digest(h.pairs_from), h.task, h.task_args, h.num_train if split == "train" else h.num_val,
                    h.chat, h.answer_format, h.seed, h.pairs_samples, h.pairs_reward, h.max_completion_length]
        digest = hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=8)
        return Path(h.pairs_dir) / f"{split}-{digest.hexdigest()}.jsonl"

    def _policy_pair_rows(self, split: str, path: Path) -> list[tuple[str, dict]]:
        """The task's prompts of ``split``, paired from ``pairs_from``'s own samples (``data/policy_pairs.py``);
        sampled once into ``path`` (``_policy_pairs_file``), then read back from it."""
        from alignlab.data.policy_pairs import sample_pairs
        from alignlab.model.hf import load_hf

        h = self.hparams
        if not path.is_file():
            if not Path(h.pairs_from, "config.json").is_file():
                raise FileNotFoundError(f"data.pairs_from: {h.pairs_from}: no HF model directory (config.json)")
            task_rows = self._task_rows(split, "prompt")
            prompt_rows = [row for _, row in task_rows]
            ids = [item["prompt_ids"] for item in self._tokenize(task_rows, "prompt", f"task:{self.task.name}:{split}")]
            module, _, name = h.pairs_reward.rpartition(".")
            try:
                reward = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError, ValueError) as e:
                raise ValueError(f"data.pairs_reward: cannot import {h.pairs_reward!r} ({e})") from None
            rows, stats = sample_pairs(load_hf(h.pairs_from), self.tokenizer, prompt_rows, ids, h.pairs_samples,
                                       h.max_completion_length, reward, seed=h.seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, path)  # atomic: a reader sees all of it or nothing
            self.pairs_stats[split] = stats
            rank_zero_info(f"data.pairs_from: {stats['prompts']} {split} prompts x {h.pairs_samples} samples of "
                           f"{h.pairs_from} -> {stats['pairs']} pairs ({stats['all_right']} prompts all right, "
                           f"{stats['all_wrong']} all wrong: no pair) in {path}")
        rows = read_jsonl(path, "preference")
        if not rows:
            raise DataError(f"{path}: no pairs: every prompt's {h.pairs_samples} samples from {h.pairs_from} were "
                            f"all right or all wrong (raise data.pairs_samples)")
        return rows

    def _rows(self, split: str, kind: str) -> list[dict]:
        file = self.hparams.train_file if split == "train" else self.hparams.val_file
        if file is not None:
            return self._tokenize(read_jsonl(file, kind), kind, f"{file} ({split})")
        own = self.hparams.pairs_from is not None and (split == "train" or self.hparams.pairs_val)
        if kind == "preference" and own:
            path = self._policy_pairs_file(split)  # hashes the policy's weights: once per setup
            return self._tokenize(self._policy_pair_rows(split, path), kind, str(path))
        return self._tokenize(self._task_rows(split, kind), kind, f"task:{self.task.name}:{split}")

    def setup(self, stage: str | None = None) -> None:
        kind = self.hparams.kind
        if self.train_rows is None and stage in (None, "fit"):
            self.train_rows = self._rows("train", kind)
            if len(self.train_rows) < self.hparams.batch_size:
                source = self.hparams.train_file or f"task {self.task.name!r}"
                raise DataError(f"{source}: {len(self.train_rows)} training rows < data.batch_size="
                                f"{self.hparams.batch_size}")
        if self.val_rows is None:
            self.val_rows = self._rows("val", kind)

    @property
    def val_kind(self) -> str:
        return "preference" if self.hparams.kind == "preference" else "prompt"

    # -- loaders
    def train_dataloader(self) -> DataLoader:
        """Shuffled by (data.seed, epoch), this rank's share under DDP, resumed where a checkpoint left off."""
        t = self.trainer
        world, rank = (t.world_size, t.global_rank) if t is not None else (1, 0)
        sampler = ResumableSampler(self.train_rows, num_replicas=world, rank=rank, seed=self.hparams.seed)
        bs = self.hparams.batch_size
        if self._resume_at is not None:
            epoch, batches = self._resume_at
            if batches >= sampler.num_samples // bs:  # the checkpoint closed an epoch: the next one starts
                epoch, batches = epoch + 1, 0
            sampler.start(epoch, batches * bs)
        # the generator only feeds the iterator's worker base seed, which would otherwise come from (and
        # advance) the global torch RNG
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_rows, batch_size=bs, sampler=sampler, drop_last=True, generator=g,
                          num_workers=self.hparams.num_workers,
                          collate_fn=Collator(self.hparams.kind, self.tokenizer.pad_token_id))

    def state_dict(self) -> dict:
        """The data position, saved by Lightning in every checkpoint: the epoch and the batches trained in it."""
        t = self.trainer
        if t is None or t.state.fn != "fit":
            return {}
        return {"epoch": t.current_epoch, "batches": t.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_at = (int(state["epoch"]), int(state["batches"]))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows, batch_size=self.hparams.val_batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers,
                          collate_fn=Collator(self.val_kind, self.tokenizer.pad_token_id))
