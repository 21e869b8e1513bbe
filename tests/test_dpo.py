"""DPO as a LightningModule: one concatenated forward, masks, the frozen or precomputed reference, learning."""

import json
import math

import lightning as L
import pytest
import torch
from conftest import SCRATCHPAD, datamodule, fit, held_out_accuracy, held_out_prompts, learning_seeds, tiny_arch

from alignlab.algorithms import DPO
from alignlab.model.hf import load_hf


def first_batch(dm, split="train"):
    dm.setup("fit")
    return next(iter(dm.train_dataloader() if split == "train" else dm.val_dataloader()))


def tiny(**kw) -> DPO:
    torch.manual_seed(0)
    return DPO(arch=tiny_arch(), **kw)


def perturb(module: DPO, seed: int = 1, scale: float = 0.05) -> None:
    """The same random change of the policy's weights, as if it had trained a bit."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_config_is_validated():
    for kw, name in ((dict(beta=0), "beta"), (dict(loss_type="kto"), "loss_type"),
                     (dict(label_smoothing=0.5, loss_type="robust"), "label_smoothing"), (dict(rpo_alpha=-1), "rpo_alpha")):
        with pytest.raises(ValueError, match=f"model.{name}"):
            DPO(arch=tiny_arch(), **kw)


def test_starts_at_ln2_and_one_step_raises_chosen_over_rejected():
    m = tiny(lr=1e-3)
    batch = first_batch(datamodule("preference"))
    loss, metrics = m.dpo_step(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert metrics["rewards/margins"].item() == 0
    with torch.no_grad():
        c0, r0 = m.pair_logps(m.policy, batch)
    opt = m.configure_optimizers()["optimizer"]
    loss.backward()
    assert all(p.grad is None for p in m.ref.parameters())
    opt.step()
    with torch.no_grad():
        c1, r1 = m.pair_logps(m.policy, batch)
    gap0, gap1 = (c0 - r0).mean().item(), (c1 - r1).mean().item()
    # measured: the mean gap log pi(c) - log pi(r) grows by 0.28 nats in one AdamW step at lr 1e-3
    assert gap1 > gap0 + 0.1
    loss1, metrics1 = m.dpo_step(batch)
    assert loss1.item() < math.log(2) and metrics1["rewards/margins"].item() > 0


def test_one_concatenated_forward_with_shared_prompts_equals_two_separate_full_ones():
    """pair_logps: the B prompts once, then the 2B completions attending to them; the same log-probs and
    gradients as a forward over each full chosen / rejected sequence."""
    m = tiny()
    batch = first_batch(datamodule("preference"))
    calls = []
    hook = m.policy.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    chosen, rejected = m.pair_logps(m.policy, batch)
    hook.remove()
    B = batch["chosen_input_ids"].shape[0]
    C = batch["chosen_completion_ids"].shape[1]
    assert calls == [tuple(batch["prompt_ids"].shape), (2 * B, C - 1)]  # prompts once, then the completions
    (chosen.sum() - 0.5 * rejected.sum()).backward()
    shared = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    c = m.sequence_logps(m.policy, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"])
    r = m.sequence_logps(m.policy, batch["rejected_input_ids"], batch["rejected_attention_mask"],
                         batch["rejected_loss_mask"])
    (c.sum() - 0.5 * r.sum()).backward()
    torch.testing.assert_close(chosen.detach(), c.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected.detach(), r.detach(), atol=1e-5, rtol=0)
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(shared[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_masks_respected():
    m = tiny().eval()
    batch = first_batch(datamodule("preference"))
    ids, mask, loss_mask = batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"]
    assert (mask == 0).any()  # the shorter rows are right-padded
    with torch.no_grad():
        base = m.sequence_logps(m.policy, ids, mask, loss_mask)
        garbage = torch.where(mask.bool(), ids, torch.randint(4, 90, ids.shape))  # change every pad token
        torch.testing.assert_close(m.sequence_logps(m.policy, garbage, mask, loss_mask), base, atol=1e-5, rtol=0)
        # the sum covers completion tokens only: prompt tokens' log-probs are left out
        logps = torch.log_softmax(m.policy(ids[:, :-1], mask[:, :-1]).float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(base, (logps * loss_mask[:, 1:]).sum(-1), atol=1e-5, rtol=0)
        prompt_part = (logps * (mask[:, 1:] - loss_mask[:, 1:])).sum(-1)
        assert prompt_part.abs().min() > 1.0  # a real difference, which the loss ignores


def test_reference_is_frozen_and_never_updated():
    m = tiny(lr=1e-2)
    before = {k: v.clone() for k, v in m.ref.state_dict().items()}
    policy_before = m.policy.layers[0].mlp.up_proj.weight.clone()
    trainer = fit(m, datamodule("preference", batch_size=16), max_steps=5, limit_val_batches=0)
    assert all(torch.equal(before[k], v) for k, v in m.ref.state_dict().items())
    assert not torch.equal(policy_before, m.policy.layers[0].mlp.up_proj.weight)  # the policy did move
    assert not m.ref.training and not any(p.requires_grad for p in m.ref.parameters())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in m.ref.parameters()}


def test_precomputed_reference_gives_the_live_loss():
    dm = datamodule("preference", num_train=300, batch_size=32)
    live, pre = tiny(loss_type="sigmoid"), tiny(precompute_ref_logps=True)
    assert pre.ref is None  # no copy is ever made
    dm.setup("fit")
    pre.precompute_reference([dm.train_dataloader(), dm.val_dataloader()])
    assert len(pre.ref_table) >= 300  # every chosen/rejected sequence of both splits (duplicates share keys)
    perturb(live), perturb(pre)
    pre.ref_table.freeze()  # as after the first optimizer step
    for split in ("train", "val"):
        batch = first_batch(dm, split)  # a shuffled batch, another padding length than at precompute time
        loss_live, m_live = live.dpo_step(batch)
        loss_pre, m_pre = pre.dpo_step(batch)
        assert abs(loss_live.item() - math.log(2)) > 1e-3  # the policy has moved away from the reference
        torch.testing.assert_close(loss_pre, loss_live, atol=1e-5, rtol=0)
        torch.testing.assert_close(m_pre["rewards/margins"], m_live["rewards/margins"], atol=1e-5, rtol=0)
    unseen = first_batch(datamodule("preference", num_train=300, batch_size=32, seed=99))
    with pytest.raises(RuntimeError, match="not precomputed"):
        pre.dpo_step(unseen)
    # the table travels with Lightning checkpoints
    ckpt = {}
    pre.on_save_checkpoint(ckpt)
    again = tiny(precompute_ref_logps=True)
    again.on_load_checkpoint(ckpt)
    assert again.ref_table.logps == pytest.approx(pre.ref_table.logps) and again.ref_table.frozen


def test_precompute_runs_in_fit_without_a_reference_model():
    m = tiny(precompute_ref_logps=True, lr=1e-3)
    trainer = fit(m, datamodule("preference", num_train=200, batch_size=32, num_val=20), max_steps=6)
    assert m.ref is None
    assert len(m.ref_table) >= 200  # training rows that the dropped last batch skips are covered too
    assert trainer.callback_metrics["rewards/margins"] > 0


def test_jsonl_preference_file_through_the_datamodule(tmp_path):
    rows = []
    for i in range(40):
        a, b = i % 10, (3 * i) % 10
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)})
        rows.append({"prompt": [{"role": "user", "content": f"{b}+{a}="}],
                     "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": str(a + b + 2)}], "margin": 1.0})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = datamodule("preference", train_file=str(path), batch_size=16)
    m = tiny(lr=3e-3)
    batch = first_batch(dm)
    assert m.decode(batch["chosen_input_ids"], batch["chosen_loss_mask"])[0].isdigit()  # completion tokens only
    assert m.dpo_step(batch)[0].item() == pytest.approx(math.log(2), abs=1e-6)
    trainer = fit(m, dm, max_steps=15, limit_val_batches=0)
    # measured: train/loss 0.693 -> 0.37, rewards/accuracies 1.0 after 15 steps on these 80 pairs
    assert trainer.callback_metrics["train/loss"] < 0.5
    assert trainer.callback_metrics["rewards/accuracies"] >= 0.9
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "chosen": "2"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: missing field 'rejected'"):
        datamodule("preference", train_file=str(bad), batch_size=1).setup("fit")


def test_smoke_20_steps_logs_trl_metrics_and_exports(tmp_path):
    m = tiny(lr=1e-3)
    trainer = fit(m, datamodule("preference", batch_size=16, num_val=16), max_steps=20, root=tmp_path,
                  val_every=20, log_every_n_steps=5)
    logged = trainer.logged_metrics
    for key in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "val/accuracy", "val/rewards/accuracies", "val/loss"):
        assert key in logged and torch.isfinite(torch.as_tensor(logged[key])), key
    m.export(tmp_path / "hf")
    back = load_hf(tmp_path / "hf")
    torch.testing.assert_close(back.embed_tokens.weight, m.policy.embed_tokens.weight)


@learning_seeds(default_run=3)
def test_dpo_learns_from_sft(scratchpad_sft_export, onpolicy_pairs, seed, record):
    """DPO (+ RPO's NLL on chosen) from the scratchpad SFT policy on pairs of its own samples (chosen correct,
    rejected wrong: conftest.onpolicy_pairs), validated on the built-in near-miss pairs.

    Measured over seeds 0-4 at 1 and 2 threads (10 runs, results/learning/spread.md): sampled accuracy 0.124 -> 0.238 +- 0.004
    (smallest gain +0.109), greedy 0.362 -> 0.479 +- 0.014 (smallest +0.098), val/rewards/accuracies
    0.86 +- 0.02. We require +0.04 sampled and +0.02 greedy. Near-miss pairs (a correct answer vs one digit changed) teach telling pairs apart, not adding:
    greedy accuracy moved by +0.02 to +0.07 there, a margin inside the machine-to-machine noise.
    """
    path = scratchpad_sft_export
    dm = datamodule("preference", tokenizer=path, train_file=onpolicy_pairs["train"], val_file=onpolicy_pairs["val"],
                    seed=1234 + seed, **SCRATCHPAD)  # the seed shuffles the pairs (DPO samples nothing)
    kw = dict(init_from=path, beta=0.1, rpo_alpha=1.0, lr=1e-4, val_max_new_tokens=24)
    held_out = held_out_prompts(path)
    before = DPO(**kw)
    start, sampled_start = held_out_accuracy(before, held_out), held_out_accuracy(before, held_out, samples=4)
    L.seed_everything(seed)
    m = DPO(**kw)
    trainer = fit(m, dm, max_steps=100)
    metrics = trainer.callback_metrics
    end, sampled_end = held_out_accuracy(m, held_out), held_out_accuracy(m, held_out, samples=4)
    record(start=start, end=end, sampled_start=sampled_start, sampled_end=sampled_end,
           rewards_accuracies=metrics["val/rewards/accuracies"])
    assert sampled_end >= sampled_start + 0.04, (sampled_start, sampled_end)
    assert end >= start + 0.02, (start, end)
    assert metrics["val/rewards/accuracies"] >= 0.7
    assert metrics["val/rewards/margins"] > 0.1
