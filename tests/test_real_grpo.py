"""A real-model smoke run in the default suite: 2 GRPO steps of full fine-tuning on SmolLM2-135M-Instruct
(``make model``), 2 chat prompts x 4 samples, <= 16 new tokens, 1 thread. Rewards come from the
free-text verifier on the decoded text, the weights move, the loss is finite, the metrics are logged."""

import math

import lightning as L
import pytest
import torch

from alignlab.algorithms import GRPO
from alignlab.data.datamodule import AlignDataModule
from alignlab.rewards.rules import answer_accuracy_reward, answer_format_reward
from conftest import fit

pytestmark = pytest.mark.real_model
NEW = 16
GRPO_KW = dict(num_generations=4, max_new_tokens=NEW, val_max_new_tokens=NEW, beta=0.04,
               reward_funcs=["alignlab.rewards.rules.answer_accuracy_reward",
                             "alignlab.rewards.rules.answer_format_reward"],
               val_reward="alignlab.rewards.rules.answer_accuracy_reward")


class RecordingGRPO(GRPO):
    """GRPO that keeps each scored rollout for the test to inspect."""

    def score(self, r):
        super().score(r)
        self.rollouts.append(r)


def chat_prompts(path: str) -> AlignDataModule:
    """2 chat-format 1-digit addition prompts per step (and 2 validation prompts) for the real model."""
    return AlignDataModule(kind="prompt", task="addition", task_args={"min_digits": 1, "max_digits": 1},
                           tokenizer=path, chat=True, batch_size=2, val_batch_size=2, num_train=50, num_val=2,
                           max_prompt_length=96, max_completion_length=NEW)


def test_two_grpo_steps_on_the_real_model(smollm2_dir):
    L.seed_everything(0)
    path = str(smollm2_dir)
    dm = chat_prompts(path)
    module = RecordingGRPO(init_from=path, **GRPO_KW, lr=1e-5)
    module.rollouts = []
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    ref_before = module.ref.layers[0].mlp.down_proj.weight.detach().clone()
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = fit(module, dm, max_steps=2, callbacks=[Losses()])

    # rewards: the free-text verifier on the decoded completions, which end at <|im_end|>
    assert len(module.rollouts) == 2
    tok, eos = module.tokenizer, module.eos_id
    for r in module.rollouts:
        assert len(r) == 8 and r.prompts[0].endswith("<|im_start|>assistant\n")
        for ids, mask, text, cut in zip(r.completion_ids, r.completion_mask, r.completions, r.truncated):
            kept = ids[mask.bool()].tolist()
            assert text == tok.decode(kept, skip_special_tokens=True) and "<|im_end|>" not in text
            assert bool(cut) == (kept[-1] != eos) and eos not in kept[:-1]
        acc = answer_accuracy_reward(r.prompts, r.completions, answer=r.columns["answer"])
        fmt = answer_format_reward(r.prompts, r.completions)
        assert r.rewards_per_func["answer_accuracy_reward"].tolist() == acc
        assert r.rewards_per_func["answer_format_reward"].tolist() == fmt
        torch.testing.assert_close(r.rewards, torch.tensor(acc) + torch.tensor(fmt))
    assert any(r.rewards.view(-1, 4).std(-1).gt(0).any() for r in module.rollouts)  # some group has a signal

    # the update: finite loss, the policy moved, the frozen reference did not
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    moved = [n for n, p in module.policy.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # full fine-tuning: every tensor
    assert torch.equal(module.ref.layers[0].mlp.down_proj.weight, ref_before)
    m = trainer.callback_metrics
    for key in ("train/loss", "train/reward", "train/kl", "train/grad_norm", "completions/mean_length",
                "rewards/answer_accuracy_reward/mean", "rewards/answer_format_reward/mean", "val/accuracy"):
        assert key in m and math.isfinite(float(m[key])), key


def test_two_grpo_steps_with_lora_on_the_real_model(smollm2_dir):
    """The same 2 steps with LoRA (r 8 on every projection, logits in chunks of 64 rows): only adapter tensors
    move, the reference (the policy with its adapters off, no copy) keeps the starting policy's log-probs."""
    from alignlab.model.lora import LoRAConfig

    L.seed_everything(0)
    path = str(smollm2_dir)
    dm = chat_prompts(path)
    module = RecordingGRPO(init_from=path, **GRPO_KW, lr=1e-4,
                           lora=LoRAConfig(r=8), logits_chunk_size=64)
    module.rollouts = []
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = fit(module, dm, max_steps=2)

    assert len(module.rollouts) == 2 and all(len(r) == 8 for r in module.rollouts)
    assert any(r.rewards.view(-1, 4).std(-1).gt(0).any() for r in module.rollouts)  # some group has a signal
    moved = {n for n, p in module.policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_" in n for n in moved)  # the base weights never move
    r = module.rollouts[0]
    with torch.no_grad():
        ref_now = module.logps_no_grad(module.ref, r)
    torch.testing.assert_close(ref_now, r.ref_logp, atol=1e-5, rtol=0)  # the reference is the start, still
    m = trainer.callback_metrics
    for key in ("train/loss", "train/reward", "train/kl", "train/grad_norm", "val/accuracy"):
        assert key in m and math.isfinite(float(m[key])), key
