import lightning as L
import pytest
import torch

from alignlab.algorithms import SFT
from alignlab.model.hf import load_hf

from conftest import datamodule, fit, learning_seeds, tiny_arch, val_accuracy


def test_sft_loss_ignores_prompt_tokens():
    module = SFT(arch=tiny_arch())
    dm = datamodule("sft", batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = module.policy(ids[:, :-1], mask[:, :-1])
    from alignlab.losses.lm import sft_loss

    base, _ = sft_loss(logits, ids[:, 1:], batch["loss_mask"][:, 1:])
    # perturbing the logits at prompt positions does not change the loss
    prompt_pos = (batch["loss_mask"][:, 1:] == 0)
    bumped = logits + 5.0 * torch.randn_like(logits) * prompt_pos[..., None]
    again, _ = sft_loss(bumped, ids[:, 1:], batch["loss_mask"][:, 1:])
    assert torch.allclose(base, again)


def test_sft_smoke_20_steps_lowers_loss_and_changes_weights(tmp_path):
    L.seed_everything(0)
    module = SFT(arch=tiny_arch(), lr=3e-3)
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    dm = datamodule("sft")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        start = module.loss(batch)[0].item()
    trainer = fit(module, dm, max_steps=20, root=tmp_path, log_every_n_steps=5)
    with torch.no_grad():
        end = module.loss(batch)[0].item()
    assert end < start - 0.5
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())
    assert trainer.global_step == 20
    assert "val/accuracy" in trainer.callback_metrics
    assert (tmp_path / "lightning_logs").exists()


@learning_seeds()
def test_sft_learns_the_default_task(seed, record):
    """The tiny model (2 layers, dim 64) trained for 800 steps on 1-2 digit addition, from scratch.

    Where 800 steps land depends on the seed and on the CPU's last bits (whether the carry is learned yet).
    Measured over seeds 0-4 at 1 and 2 threads (10 runs, results/learning/spread.md): 0.50 +- 0.22, between 0.23 and
    0.73 (the same at 1 and 2 threads; 0.19-0.70 over seeds 0-9 earlier). We require 0.12 (from 0.0 at
    init): it holds for every seed and thread count measured; with lr ~0 the test fails (0.0).
    """
    L.seed_everything(seed)
    module = SFT(arch=tiny_arch(), lr=3e-3, warmup_steps=20, lr_schedule="cosine")
    dm = datamodule("sft")
    init = val_accuracy(module, dm)
    fit(module, dm, max_steps=800)
    end = val_accuracy(module, dm)
    record(start=init, end=end)
    assert end >= 0.12, (init, end)
    assert init < 0.05


def test_export_round_trip_is_exact(sft_export, tmp_path):
    module = SFT(init_from=sft_export)
    module.export(tmp_path / "again")
    a, b = load_hf(sft_export), load_hf(tmp_path / "again")
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("algo", ["sft", "ppo"])
def test_fused_optimizer_is_the_same_adamw_up_to_rounding(algo):
    """fused_optimizer: torch's fused AdamW instead of the multi-tensor one; five steps on the same gradients
    end at the same weights up to float rounding, with the same parameter groups (PPO: its critic's too)."""
    from alignlab.algorithms import PPO

    def build(fused):
        torch.manual_seed(0)
        cls = SFT if algo == "sft" else PPO
        return cls(arch=tiny_arch(), lr=1e-2, weight_decay=0.1, lr_schedule="constant", fused_optimizer=fused)

    runs = []
    for fused in (False, True):
        module = build(fused)
        opt = module.configure_optimizers()["optimizer"]
        assert opt.defaults["fused"] is (True if fused else None) and opt.defaults["foreach"] is (None if fused else True)
        params = [p for g in opt.param_groups for p in g["params"]]
        start = [p.detach().clone() for p in params]
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs.append(([len(g["params"]) for g in opt.param_groups], [p.detach().clone() for p in params]))
    (groups0, weights0), (groups1, weights1) = runs
    assert groups0 == groups1
    assert max((a - b).abs().max().item() for a, b in zip(weights1, start)) > 1e-2  # the steps moved them
    for a, b in zip(weights0, weights1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
