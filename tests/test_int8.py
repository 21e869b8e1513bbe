"""The int8 rollout copy (model/int8.py) and its engine: the quantizers keep their error bound, a layer
computes exactly its formula (int32 sums), the migration is exact before rounding and lowers the error on
an outlier channel, the copy leaves the policy alone and merges LoRA, its decoded log-probs are its own
one-pass log-probs, and in GRPO it is an inexact engine whose mismatch is measured and corrected. The
learning run: test_grpo.py::test_grpo_learns_as_much_with_the_int8_sampler_and_token_tis (slow). Where an int8
matmul is slower than fp32 (an AVX2-only CPU), the engine says so when it is made."""

import time
import warnings

import pytest
import torch

from alignlab.algorithms import GRPO
from alignlab.losses.lm import selective_log_softmax
from alignlab.model import engines
from alignlab.model.engines import Int8Engine
from alignlab.model.generate import generate
from alignlab.model.int8 import QMAX, Int8Config, Int8Linear, input_amax, int8_copy, int8_matmul_speedup, quantize_rows
from alignlab.model.lora import LoRAConfig, apply_lora, merged_state_dict
from alignlab.model.transformer import Transformer
from conftest import datamodule, tiny_arch
from test_grpo import first_batch


def test_quantize_rows_is_within_half_a_step_and_uses_the_whole_range():
    x = torch.randn(32, 100) * torch.logspace(-3, 2, 32)[:, None]
    x[3] = 0.0
    xq, s = quantize_rows(x)
    assert xq.dtype == torch.int8 and s.shape == (32, 1)
    assert ((x - xq.float() * s).abs() <= s / 2 * (1 + 1e-5)).all()
    nonzero = torch.arange(32) != 3
    assert (xq[nonzero].abs().amax(-1) == QMAX).all()  # each row's largest value maps to +-127
    assert (xq[3] == 0).all() and s[3] == 1.0  # an all-zero row: no division by zero


@pytest.mark.parametrize("smoothed", [False, True])
def test_an_int8_layer_computes_its_formula_with_exact_integer_sums(smoothed):
    torch.manual_seed(0)
    w, b, x = torch.randn(24, 40), torch.randn(24), torch.randn(3, 5, 40)
    amax = x.abs().amax((0, 1)) if smoothed else None
    layer = Int8Linear(w, b, amax, smoothing=0.5)
    c = layer.input_divisor if smoothed else torch.ones(40)
    xq, t = quantize_rows(x.reshape(-1, 40) / c)
    acc = xq.double() @ layer.weight_int8.double().T  # the exact integer sums
    expected = (acc * t.double() * layer.weight_scale.double() + b.double()).view(3, 5, 24)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-6)
    # the migration is exact before rounding: W c / c = W up to the weight's half step
    half_step = (layer.weight_scale.T / 2) / c
    assert ((layer.dequantized_weight() - w).abs() <= half_step * (1 + 1e-5)).all()
    rel = (layer(x) - (x @ w.T + b)).norm() / (x @ w.T + b).norm()
    assert rel < 0.02


def test_the_migration_protects_the_other_channels_from_an_outlier_channel():
    """One input channel 100x the others (as in a real checkpoint's RMSNorm outputs): without migration it
    takes the int8 range of every token; with it the error falls several-fold."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 128) * 0.05, torch.randn(256, 128)
    x[:, 7] *= 100
    exact = x @ w.T
    plain = Int8Linear(w)(x)
    smooth = Int8Linear(w, None, x.abs().amax(0), smoothing=0.5)(x)
    err_plain, err_smooth = (plain - exact).norm(), (smooth - exact).norm()
    assert err_smooth < err_plain / 3, (err_plain, err_smooth)


def model_and_prompts(seed=0):
    torch.manual_seed(seed)
    model = Transformer(tiny_arch()).eval()
    ids = torch.randint(1, 128, (4, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return model, ids.masked_fill(mask == 0, 0), mask


def test_the_copy_is_close_to_the_model_and_leaves_it_alone():
    model, ids, mask = model_and_prompts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = int8_copy(model, calibration=(ids, mask))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the policy unchanged
    linear = [m for m in copy.modules() if isinstance(m, Int8Linear)]
    assert len(linear) == 2 * 7 + 1 and isinstance(copy.lm_head, Int8Linear)  # 7 per block and the head
    assert not [m for m in copy.modules() if type(m) is torch.nn.Linear]
    assert all(m.input_divisor is not None for m in linear)  # every layer was calibrated
    ours = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not ours & {t.data_ptr() for t in list(copy.parameters()) + list(copy.buffers())}  # no shared storage
    assert not any(p.requires_grad for p in copy.parameters())
    with torch.no_grad():
        a, b = model(ids, mask), copy(ids, mask)
    real = mask.bool()
    kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1)[real]
    assert float(kl.mean()) < 1e-3, kl
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.mul_(2)  # the copy does not follow later changes of the policy
        assert torch.equal(copy(ids, mask), b)


def test_without_the_head_the_copy_keeps_a_tied_fp32_head():
    model, ids, mask = model_and_prompts()
    copy = int8_copy(model, Int8Config(head=False))
    assert type(copy.lm_head) is torch.nn.Linear and copy.lm_head.weight is copy.embed_tokens.weight
    torch.testing.assert_close(copy.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)


def test_the_copy_of_a_lora_model_is_the_copy_of_its_merged_weights():
    model, ids, mask = model_and_prompts()
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # a trained adapter (B = 0 would merge to nothing)
    plain = Transformer(tiny_arch()).eval()
    plain.load_state_dict(merged_state_dict(model))
    a = int8_copy(model, calibration=(ids, mask))
    b = int8_copy(plain, calibration=(ids, mask))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and "layers.0.self_attn.q_proj.lora_A.weight" not in sa
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-5)


def test_calibration_records_the_input_range_of_each_layer():
    model, ids, mask = model_and_prompts()
    seen = {}
    h = model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    amax = input_amax(model, ["layers.1.mlp.down_proj", "lm_head"], ids, mask)
    h.remove()
    torch.testing.assert_close(amax["layers.1.mlp.down_proj"], seen["x"].reshape(-1, seen["x"].shape[-1]).abs().amax(0))
    assert amax["lm_head"].shape == (64,)


def test_the_copys_decoded_log_probs_are_its_one_pass_log_probs():
    """Per-row scales: a token's log-prob under the copy does not depend on decoding step by step (KV cache,
    rows dropped as they finish) or scoring the whole sequence at once."""
    model, ids, mask = model_and_prompts()
    copy = int8_copy(model, calibration=(ids, mask))
    g = torch.Generator().manual_seed(0)
    out = generate(copy, ids, mask, 12, eos_token_id=5, pad_token_id=0, generator=g, num_samples=2)
    p_ids, p_mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    with torch.no_grad():
        full = torch.cat([p_ids, out.completion_ids], 1)
        logits = copy(full, torch.cat([p_mask, out.completion_mask], 1))[:, ids.shape[1] - 1: -1]
        scored = selective_log_softmax(logits, out.completion_ids) * out.completion_mask
    torch.testing.assert_close(scored, out.logprobs, atol=1e-4, rtol=0)


def grpo(**kw) -> GRPO:
    return GRPO(arch=tiny_arch(), num_generations=4, reward_funcs=["test_grpo.length_reward"],
                rollout_engine="int8", **kw)


def test_in_grpo_the_int8_engine_is_measured_and_corrected():
    module = grpo(rollout_correction="token_tis")
    assert isinstance(module.engine, Int8Engine) and not module.engine.exact
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))
    module.prepare(r)
    real = r.completion_mask.bool()
    assert r.logp_old is not None  # the trainer's pi_old, not the sampler's
    d = (r.logp_old - r.sampler_logp)[real].abs()
    assert float(d.max()) > 0  # the copy is not the policy ...
    assert float(r.stats["sampling/logp_difference/mean"]) == pytest.approx(float(d.mean()), rel=1e-5)
    assert float(d.mean()) < 0.05  # ... but close to it
    expected = (r.logp_old - r.sampler_logp).exp().clamp(max=3.0)
    torch.testing.assert_close(r.is_weights[real], expected[real])
    assert float(r.stats["sampling/engine_memory_mb"]) > 0 and float(r.stats["sampling/weight_sync_s"]) >= 0


def test_the_copy_is_remade_from_the_policy_every_sync_every_steps():
    module = grpo(rollout_sync_every=2)
    engine, batch = module.engine, first_batch(datamodule("prompt", batch_size=4))
    assert engine.maybe_sync(0)
    engine.generate(batch["prompt_ids"], batch["prompt_mask"], 4)
    first = engine.copy
    w = module.policy.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w.mul_(3)  # an optimizer step
    assert not engine.maybe_sync(1)  # one step old: still sampling with the first copy
    engine.generate(batch["prompt_ids"], batch["prompt_mask"], 4)
    assert engine.copy is first
    assert engine.maybe_sync(2)
    engine.generate(batch["prompt_ids"], batch["prompt_mask"], 4)
    assert engine.copy is not first
    new = engine.copy.layers[0].mlp.up_proj
    half_step = (new.weight_scale.T / 2) / new.input_divisor
    assert ((new.dequantized_weight() - w.detach()).abs() <= half_step * (1 + 1e-5)).all()


@pytest.mark.parametrize("kw", [{"smoothing": 1.5}, {"smoothing": -0.1}])
def test_bad_int8_options_name_the_key(kw):
    with pytest.raises(ValueError, match="model.int8.smoothing:"):
        grpo(int8=kw)


@pytest.mark.real_model
def test_on_the_real_model_the_int8_copy_keeps_the_next_token_distribution(smollm2_dir):
    """SmolLM2-135M-Instruct on chat prompts: calibrated on the prompts, the copy's next-token distributions
    are close to the fp32 model's (measured: mean KL 0.01-0.03 nats; greedy tokens agree at ~95% of
    positions)."""
    from alignlab.model.hf import load_hf
    from alignlab.data.tokenizer import load_tokenizer
    model = load_hf(smollm2_dir).eval()
    tok = load_tokenizer(str(smollm2_dir))
    texts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}], tokenize=False,
                                     add_generation_prompt=True) + f"{a} + {b} = {a + b}"
             for a, b in ((3, 4), (12, 30), (57, 8), (21, 21))]
    enc = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, enc))
    ids = torch.tensor([[0] * (T - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in enc])
    copy = int8_copy(model, calibration=(ids, mask))
    with torch.inference_mode():
        a, b = model(ids, mask)[mask.bool()], copy(ids, mask)[mask.bool()]
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1)
    assert float(kl.mean()) < 0.06, kl
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.85


def test_the_int8_options_parse_from_the_command_line_and_survive_a_checkpoint(capsys, tmp_path):
    from pathlib import Path

    import yaml

    from alignlab.cli import main
    root = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", f"{root}/base.yaml", "--config", f"{root}/algo/grpo.yaml",
              "--model.rollout_engine", "int8", "--model.int8.smoothing", "0.3", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert printed["rollout_engine"] == "int8" and printed["int8"]["smoothing"] == 0.3
    cfg = Int8Config(smoothing=0.3, head=False)
    torch.save({"hyper_parameters": {"int8": cfg}}, tmp_path / "c.ckpt")
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["hyper_parameters"]["int8"] == cfg


def test_int8_matmul_speedup_is_below_one_where_the_int8_matmul_is_the_slower(monkeypatch):
    int_mm = torch._int_mm

    def slow_int_mm(a, b):
        time.sleep(0.01)
        return int_mm(a, b)

    speedup = int8_matmul_speedup.__wrapped__  # uncached
    monkeypatch.setattr(torch, "_int_mm", slow_int_mm)
    assert 0 < speedup(8, 32, 32, repeats=3) < 0.5  # an 8x32x32 fp32 matmul takes microseconds, not 10 ms


@pytest.mark.parametrize("ratio,warns", [(0.04, True), (1.8, False)])
def test_the_int8_engine_warns_where_its_matmul_is_slower_than_fp32(monkeypatch, ratio, warns):
    monkeypatch.setattr(engines, "int8_matmul_speedup", lambda: ratio)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = grpo()
    said = [str(w.message) for w in caught if "rollout_engine=int8" in str(w.message)]
    assert said == ([f"model.rollout_engine=int8: an int8 matmul (torch._int_mm) is 25x slower than fp32 on this "
                     f"CPU (no int8 dot-product instruction such as AVX-VNNI): the int8 copy will make sampling "
                     f"slower, not faster; model.rollout_engine=native is the fast choice here"] if warns else [])
    assert module.engine.stats()["int8_matmul_speedup"] == ratio  # logged as sampling/int8_matmul_speedup
