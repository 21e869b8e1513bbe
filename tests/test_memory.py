"""What real model sizes need, each shown to leave the update unchanged: chunked LM-head log-probs equal the full
(B, T, V) computation in values and gradients and never keep a logits tensor for the backward; activation
checkpointing gives the same loss and gradients while keeping fewer activations; checkpoints leave out the
frozen weights a directory holds (reference, LoRA base), check that directory's digest on resume, and resume
to the same metrics."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from resume_helpers import StepMetrics, read_metrics
from safetensors.torch import load_file, save_file

from alignlab.algorithms import DPO, GRPO, PPO, SFT
from alignlab.algorithms.on_policy import Rollout
from alignlab.checkpoint import AtomicCheckpointIO
from alignlab.data.tokenizer import char_tokenizer
from alignlab.losses.lm import chunked_token_logps, entropy_from_logits, selective_log_softmax, sft_loss
from alignlab.model.hf import load_hf, save_hf
from alignlab.model.lora import LoRAConfig, LoRALinear
from alignlab.model.transformer import Transformer

from conftest import datamodule, fit, tiny_arch

V = tiny_arch().vocab_size  # 128: no other dimension of the tiny model has this size


def rollout(N=6, P=5, C=7, seed=0) -> Rollout:
    """Groups of 2 rows sharing a left-padded prompt; right-padded completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_index = torch.arange(N // 2).repeat_interleave(2)
    starts = torch.tensor([0, 2, 1])[prompt_index]
    prompt_mask = (torch.arange(P) >= starts[:, None]).long()
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])[:N]
    completion_mask = (torch.arange(C) < lengths[:, None]).long()
    return Rollout(prompt_ids=torch.randint(4, V, (N // 2, P), generator=g)[prompt_index] * prompt_mask,
                   prompt_mask=prompt_mask, completion_ids=torch.randint(4, V, (N, C), generator=g) * completion_mask,
                   completion_mask=completion_mask, truncated=lengths == C, prompts=[""] * N, completions=[""] * N,
                   prompt_index=prompt_index)


def twins(cls, a: dict, b: dict, **kw):
    """Two modules with the same weights, differing in the options a / b."""
    torch.manual_seed(0)
    first = cls(arch=tiny_arch(), **kw, **a)
    second = cls(arch=tiny_arch(), **kw, **b)
    second.load_state_dict(first.state_dict())
    return first, second


def grads(module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def assert_same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def saved_for_backward(fn) -> list[torch.Size]:
    """Shapes of the tensors autograd keeps for the backward while fn() runs (outside checkpointed regions)."""
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        out = fn()
    return shapes, out


# ---------------------------------------------------------------------------------------- chunked logps
def test_chunked_token_logps_equal_the_full_log_softmax_in_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    N, C = 11, 16
    hidden = torch.randn(N, C, generator=g, requires_grad=True)
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    index = torch.randint(0, V, (N,), generator=g)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)

    logits = (hidden @ weight.T) / 0.7
    full_lp, full_ent = selective_log_softmax(logits, index), entropy_from_logits(logits)
    ((full_lp * w_lp).sum() + (full_ent * w_ent).sum()).backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    lp, ent = chunked_token_logps(hidden, weight, index, temperature=0.7, chunk_size=4, with_entropy=True)
    torch.testing.assert_close(lp, full_lp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, full_ent, atol=1e-6, rtol=1e-6)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    torch.testing.assert_close(hidden.grad, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, want[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_logps(hidden, weight, index, 0.7, chunk_size=100)[0], full_lp,
                                   atol=1e-6, rtol=1e-6)


def test_chunked_completion_logps_equal_the_full_ones_and_keep_no_logits_for_backward():
    """GRPO's and PPO's path (shared prompts, padding, temperature, entropy with gradients)."""
    full, chunked = twins(GRPO, {}, {"logits_chunk_size": 5}, num_generations=2)
    r = rollout()
    real = r.completion_mask.bool()
    w = torch.randn(r.completion_mask.shape)

    def run(m):
        lp, ent = m.completion_logps(m.policy, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                     temperature=0.8, with_entropy=True, prompt_index=r.prompt_index,
                                     entropy_grad=True)
        ((lp * w * real).sum() + 0.1 * (ent * real).sum()).backward()
        return lp.detach(), ent.detach()

    saved_full, (lp_a, ent_a) = saved_for_backward(lambda: run(full))
    saved_chunked, (lp_b, ent_b) = saved_for_backward(lambda: run(chunked))
    with torch.no_grad():  # the formula on the full (B, C, V) logits, padding positions included
        logits = full.completion_states(full.policy, r.prompt_ids, r.prompt_mask, r.completion_ids,
                                        r.completion_mask, r.prompt_index) / 0.8
        want_lp, want_ent = selective_log_softmax(logits, r.completion_ids), entropy_from_logits(logits)
    torch.testing.assert_close(lp_a[real], want_lp[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_a[real], want_ent[real], atol=1e-5, rtol=1e-5)
    assert (lp_a[~real] == 0).all() and (lp_b[~real] == 0).all()  # padding is never scored
    torch.testing.assert_close(lp_b[real], lp_a[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_b[real], ent_a[real], atol=1e-5, rtol=1e-5)
    assert_same(grads(full), grads(chunked), atol=1e-5)
    logits_like = [s for s in saved_full if len(s) >= 2 and s[-1] == V]
    assert logits_like  # the full computation keeps (.., V) logits for the backward ...
    assert not [s for s in saved_chunked if len(s) >= 2 and s[-1] == V]  # ... the chunked one none


def test_chunked_sequence_logps_and_sft_loss_equal_the_full_ones():
    dm = datamodule("preference", batch_size=6)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    full, chunked = twins(DPO, {}, {"logits_chunk_size": 7})
    for m in (full, chunked):
        m.sequence_logps(m.policy, b["chosen_input_ids"], b["chosen_attention_mask"], b["chosen_loss_mask"]).sum().backward()
    assert_same(grads(full), grads(chunked), atol=1e-5)
    with torch.no_grad():
        a = full.sequence_logps(full.policy, b["chosen_input_ids"], b["chosen_attention_mask"], b["chosen_loss_mask"])
        c = chunked.sequence_logps(chunked.policy, b["chosen_input_ids"], b["chosen_attention_mask"],
                                   b["chosen_loss_mask"])
    torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-6)

    dm = datamodule("sft", batch_size=6)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    full, chunked = twins(SFT, {}, {"logits_chunk_size": 16})
    (loss_a, m_a), (loss_b, m_b) = full.loss(b), chunked.loss(b)
    with torch.no_grad():  # sft_loss on the full (B, T, V) logits
        want, _ = sft_loss(full.policy(b["input_ids"][:, :-1], b["attention_mask"][:, :-1]), b["input_ids"][:, 1:],
                           b["loss_mask"][:, 1:])
    torch.testing.assert_close(loss_a, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert m_a["num_tokens"] == m_b["num_tokens"]
    loss_a.backward()
    loss_b.backward()
    assert_same(grads(full), grads(chunked), atol=1e-6)


# ------------------------------------------------------------------------------ activation checkpointing
def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_fewer_saved_activations():
    dm = datamodule("sft", batch_size=8)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    plain, ckpt = twins(SFT, {}, {"activation_checkpointing": True})
    assert ckpt.policy.activation_checkpointing and not plain.policy.activation_checkpointing
    saved_plain, loss_a = saved_for_backward(lambda: plain.loss(b)[0])
    saved_ckpt, loss_b = saved_for_backward(lambda: ckpt.loss(b)[0])
    assert loss_a.item() == loss_b.item()
    loss_a.backward()
    loss_b.backward()
    assert_same(grads(plain), grads(ckpt), atol=1e-6)
    numel = lambda shapes: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    assert numel(saved_ckpt) < 0.5 * numel(saved_plain)

    # GRPO's shared-prompt path (PrefixCache; the prompts' pass keeps its activations, the completions are
    # recomputed), with LoRA: the same gradients with checkpointing on and off
    module = GRPO(arch=tiny_arch(), num_generations=2, activation_checkpointing=True, lora=LoRAConfig(r=4))
    r = rollout()
    out = {}
    for on in (True, False):
        module.policy.activation_checkpointing = on
        saved, lp = saved_for_backward(lambda: module.completion_logps(
            module.policy, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
            prompt_index=r.prompt_index))
        (lp * r.completion_mask).sum().backward()
        out[on] = lp.detach(), grads(module), numel(saved)
    assert torch.equal(out[True][0], out[False][0])
    assert_same(out[True][1], out[False][1], atol=1e-6)
    assert all(".lora_" in k for k in out[True][1])
    assert out[True][2] < out[False][2]


# --------------------------------------------------------------------------------------- slim checkpoints
@pytest.fixture
def start_dir(tmp_path):
    """A random tiny policy exported in HF format: the init_from of the runs below."""
    torch.manual_seed(1)
    save_hf(Transformer(tiny_arch()), tmp_path / "start", tokenizer=char_tokenizer())
    return str(tmp_path / "start")


PARITY = ["resume_helpers.length_parity_reward"]  # mixed rewards in every group even for a random policy
RUNS = {  # name -> (class, module kwargs, data kind)
    "grpo_full": (GRPO, dict(num_generations=4, max_new_tokens=6, beta=0.04, lr=1e-3, reward_funcs=PARITY), "prompt"),
    "grpo_lora": (GRPO, dict(num_generations=4, max_new_tokens=6, beta=0.04, lr=1e-2, reward_funcs=PARITY,
                             lora=LoRAConfig(r=4)), "prompt"),
    "dpo_lora": (DPO, dict(lr=1e-2, lora=LoRAConfig(r=4, dropout=0.1)), "preference"),
    "ppo_lora": (PPO, dict(num_generations=2, max_new_tokens=6, lr=1e-2, reward_model=None, num_iterations=2,
                           reward_funcs=PARITY, lora=LoRAConfig(r=4)), "prompt"),
}


def run(name, start, root, max_steps, ckpt_path=None):
    cls, kw, kind = RUNS[name]
    L.seed_everything(0)
    module = cls(init_from=start, **kw)
    dm = datamodule(kind, tokenizer=start, batch_size=4, num_train=40, num_val=4)
    ck = ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    fit(module, dm, max_steps=max_steps, root=root, callbacks=[ck, StepMetrics(str(root / "metrics.jsonl"))],
        plugins=[AtomicCheckpointIO()], ckpt_path=ckpt_path, limit_val_batches=0)
    return module


@pytest.mark.parametrize("name", list(RUNS))
def test_checkpoints_hold_no_frozen_weights_and_resume_exactly(name, start_dir, tmp_path):
    full = run(name, start_dir, tmp_path / "full", 4)
    ckpt_file = next((tmp_path / "full" / "ckpt").glob("*step=2.ckpt"))
    ckpt = torch.load(ckpt_file, weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith("ref.") for k in keys)
    lora = "lora" in name
    trained = {n for n, p in full.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert set(keys) == trained  # only what training changes: no reference, no frozen LoRA base
    if lora:
        assert all(".lora_" in k or k.startswith("critic.head.") for k in keys)
        n_opt = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
        assert n_opt == len(trained)  # the optimizer holds the adapters (and PPO's critic head) only
    start = load_hf(start_dir).state_dict()
    moved = [k for k, v in ckpt["state_dict"].items() if k.startswith("policy.") and (  # B starts at 0
             v.abs().max() > 0 if ".lora_B." in k else ".lora_A." not in k and not torch.equal(v, start[k[7:]]))]
    assert moved  # training changed the policy by step 2: the resume below has something to restore
    assert ckpt["rebuilt_from"]  # ... and the digest of the directory that holds the rest
    assert all(v["directory"] == start_dir for v in ckpt["rebuilt_from"].values())

    run(name, start_dir, tmp_path / "resumed", 4, ckpt_path=ckpt_file)
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert sorted(b) == [s for s in sorted(a) if s > 2] and b  # PPO: 2 optimizer steps (num_iterations) per batch
    for step in b:
        assert b[step].keys() == a[step].keys()
        for k, v in a[step].items():
            assert b[step][k] == pytest.approx(v, abs=1e-6), (step, k)


def test_resume_refuses_a_changed_init_from_directory(start_dir, tmp_path):
    run("grpo_lora", start_dir, tmp_path / "full", 2)
    ckpt_file = next((tmp_path / "full" / "ckpt").glob("*step=2.ckpt"))
    weights = load_file(f"{start_dir}/model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] += 0.01
    save_file(weights, f"{start_dir}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^ckpt_path: .*step=2\.ckpt expects the frozen weights of policy from .*start, "
                                         r"but .*start now holds other weights"):
        run("grpo_lora", start_dir, tmp_path / "resumed", 4, ckpt_path=ckpt_file)


def test_lora_runs_train_the_adapters_only(start_dir, tmp_path):
    module = run("grpo_lora", start_dir, tmp_path / "run", 2)
    base = load_hf(start_dir).state_dict()
    for k, v in module.policy.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, base[k]), k
    assert any(isinstance(m, LoRALinear) and m.lora_B.weight.abs().max() > 0 for m in module.policy.modules())
