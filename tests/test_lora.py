"""LoRA: zero-initialised adapters are the base model; adapters off is the reference (no copy); the merged export
computes the adapted function; only adapter parameters train; the PEFT export loads in ``peft`` on the
transformers base model with the same logits; bad settings are one line naming the key.

Models are tiny random Llama-shaped Transformers (grouped-query heads, tied embeddings); nothing is downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers and peft read only local directories here

import pytest  # noqa: E402
import torch  # noqa: E402

from alignlab.algorithms import DPO, GRPO, PPO, SFT  # noqa: E402
from alignlab.algorithms.on_policy import Rollout  # noqa: E402
from alignlab.model.hf import load_hf, save_hf  # noqa: E402
from alignlab.model.lora import LORA_TARGETS, AdaptersOff, LoRAConfig, LoRALinear, adapters_off, apply_lora  # noqa: E402
from alignlab.model.transformer import Transformer, TransformerConfig  # noqa: E402

from conftest import datamodule, tiny_arch  # noqa: E402

LLAMA = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)  # GQA, tied


def base_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(**LLAMA)).eval()
    with torch.no_grad():  # norms away from 1, so that every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def nonzero_adapters_(model, scale=0.1):
    """Random B (it starts at 0): the adapted model now differs from its base."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, scale)


def batch(seed=0, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    return ids * mask, mask


def test_zero_initialised_adapters_give_the_base_models_logits():
    model = base_model()
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, mask)
    names = apply_lora(model, LoRAConfig(r=4, alpha=8))
    assert len(names) == 2 * len(LORA_TARGETS)  # every projection of both blocks
    with torch.no_grad():
        after = model(ids, mask)
    assert torch.equal(after, before)
    nonzero_adapters_(model)
    with torch.no_grad():
        assert (model(ids, mask) - before).abs().max() > 1e-2  # the adapters do act once B != 0


def test_adapters_off_is_the_base_model_and_the_reference_is_no_copy():
    base = base_model()
    ids, mask = batch()
    with torch.no_grad():
        ref = base(ids, mask)
    model = base_model()
    apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    nonzero_adapters_(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids, mask), ref, atol=1e-3)
        with adapters_off(model):
            assert torch.equal(model(ids, mask), ref)
        assert not torch.allclose(model(ids, mask), ref, atol=1e-3)  # back on after the block
        assert torch.equal(AdaptersOff(model)(ids, mask), ref)

    # in the algorithms: the reference is the policy with its adapters off, sharing every tensor
    for module in (GRPO(arch=tiny_arch(), lora=LoRAConfig(r=4)), DPO(arch=tiny_arch(), lora=LoRAConfig(r=4)),
                   PPO(arch=tiny_arch(), lora=LoRAConfig(r=4), reward_model=None)):
        assert isinstance(module.ref, AdaptersOff) and module.ref.model is module.policy
        assert not any(k.startswith("ref.") for k in module.state_dict())
        nonzero_adapters_(module.policy)
        plain = Transformer(module.policy.config)
        plain.load_state_dict({k: v for k, v in module.policy.state_dict().items() if "lora_" not in k})
        with torch.no_grad():
            torch.testing.assert_close(module.ref(ids, mask), plain(ids, mask), atol=0, rtol=0)


def test_only_adapter_parameters_get_gradients_and_reach_the_optimizer():
    module = SFT(arch=tiny_arch(), lora=LoRAConfig(r=4, alpha=8, dropout=0.1))
    nonzero_adapters_(module.policy)  # else A's gradient is 0 (B = 0) and the test would prove less
    dm = datamodule("sft", batch_size=8)
    dm.setup("fit")
    loss, _ = module.loss(next(iter(dm.train_dataloader())))
    loss.backward()
    grads = {n for n, p in module.named_parameters() if p.grad is not None}
    lora = {n for n, _ in module.named_parameters() if ".lora_" in n}
    assert grads == lora and len(lora) == 2 * 2 * len(LORA_TARGETS)  # A and B of 7 projections x 2 blocks
    assert all(module.policy.get_parameter(n.removeprefix("policy.")).grad.abs().sum() > 0 for n in grads)
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in module.named_parameters() if n in lora}


def test_merged_export_equals_the_unmerged_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = base_model()
    apply_lora(model, LoRAConfig(r=4, alpha=16))
    nonzero_adapters_(model)
    save_hf(model, tmp_path / "merged")
    ids, mask = batch()
    with torch.no_grad():
        want = model(ids, mask)
        ours = load_hf(tmp_path / "merged")(ids, mask)
        assert not any(isinstance(m, LoRALinear) for m in load_hf(tmp_path / "merged").modules())
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], want[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs[real], want[real], atol=1e-4, rtol=0)


def test_peft_loads_the_adapter_export_on_the_transformers_base_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from alignlab.data.tokenizer import char_tokenizer

    save_hf(base_model(), tmp_path / "base", tokenizer=char_tokenizer())  # the model the run starts from (init_from)
    cfg = LoRAConfig(r=4, alpha=12, dropout=0.05, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"])
    module = SFT(init_from=str(tmp_path / "base"), lora=cfg)
    nonzero_adapters_(module.policy)
    module.export(tmp_path / "hf")  # merged weights + adapter/ in PEFT's format
    assert sorted(p.name for p in (tmp_path / "hf" / "adapter").iterdir()) == ["adapter_config.json",
                                                                              "adapter_model.safetensors"]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "hf" / "adapter").eval()
    from safetensors import safe_open
    with safe_open(tmp_path / "hf" / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 4
    ids, mask = batch()
    module.policy.eval()
    with torch.no_grad():
        want = module.policy(ids, mask)
        theirs = adapted(input_ids=ids, attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # adapter/ beside it
        merged = merged(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], want[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(merged[real], want[real], atol=1e-4, rtol=0)
    with torch.no_grad(), adapted.disable_adapter():  # and peft's base = our adapters-off reference
        base = adapted(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        ref = AdaptersOff(module.policy)(ids, mask)
    torch.testing.assert_close(base[real], ref[real], atol=1e-4, rtol=0)
    assert (want[real] - ref[real]).abs().max() > 1e-2  # the adapters matter: the two checks are different


def test_grpo_with_lora_keeps_the_reference_fixed_while_the_policy_moves():
    """One GRPO update with LoRA: only adapters change, the reference log-probs are the starting policy's."""
    module = GRPO(arch=tiny_arch(), lora=LoRAConfig(r=4), num_generations=2, beta=0.04)
    start = {k: v.clone() for k, v in module.policy.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    N, P, C = 4, 5, 6
    r = Rollout(prompt_ids=torch.randint(4, 128, (N, P), generator=g), prompt_mask=torch.ones(N, P, dtype=torch.long),
                completion_ids=torch.randint(4, 128, (N, C), generator=g), completion_mask=torch.ones(N, C, dtype=torch.long),
                truncated=torch.zeros(N, dtype=torch.bool), prompts=[""] * N, completions=[""] * N,
                prompt_index=torch.arange(2).repeat_interleave(2))
    with torch.no_grad():
        ref_before = module.logps_no_grad(module.ref, r)
    opt = torch.optim.SGD([p for p in module.policy.parameters() if p.requires_grad], lr=1.0)
    r.advantages, r.loss_mask = torch.tensor([1.0, -1.0, 1.0, -1.0]), r.completion_mask
    r.ref_logp = ref_before
    loss, _ = module.compute_loss(r, r.loss_mask.sum(), torch.tensor(float(N)))
    loss.backward()
    opt.step()
    changed = {k for k, v in module.policy.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(".lora_" in k for k in changed)
    with torch.no_grad():
        assert torch.equal(module.logps_no_grad(module.ref, r), ref_before)
        assert not torch.allclose(module.logps_no_grad(module.policy, r), ref_before, atol=1e-4)


def test_bad_lora_settings_are_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"^model\.lora\.r: must be >= 1, got 0$"):
        SFT(arch=tiny_arch(), lora=LoRAConfig(r=0))
    with pytest.raises(ValueError, match=r"^model\.lora\.target_modules: must be a non-empty subset of .*lm_head"):
        SFT(arch=tiny_arch(), lora=LoRAConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"^model\.lora\.dropout: must be in \[0, 1\)"):
        SFT(arch=tiny_arch(), lora=LoRAConfig(dropout=1.0))


def test_lora_is_a_config_key(tmp_path, monkeypatch):
    from pathlib import Path

    from alignlab.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(configs / "base.yaml"), "--config", str(configs / "algo" / "grpo.yaml"),
                "--config", str(configs / "model" / "tiny.yaml"), "--model.init_args.init_from=null",
                "--model.init_args.lora.r=8", "--model.init_args.lora.target_modules=[q_proj,v_proj]",
                "--model.init_args.activation_checkpointing=true", "--model.init_args.logits_chunk_size=64"],
               run=False)
    assert cli.model.lora == LoRAConfig(r=8, alpha=32.0, target_modules=["q_proj", "v_proj"])
    assert isinstance(cli.model.policy.layers[0].self_attn.q_proj, LoRALinear)
    assert type(cli.model.policy.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert cli.model.policy.activation_checkpointing and isinstance(cli.model.ref, AdaptersOff)
