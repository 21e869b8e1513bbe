"""The encoder-decoder Transformer (model/seq2seq.py) and its trainer (algorithms/seq2seq.py)."""

import math
import time

import lightning as L
import pytest
import torch
from conftest import datamodule, fit, learning_seeds, val_accuracy

from alignlab.algorithms.seq2seq import Seq2Seq, label_smoothed_nll, noam_lr
from alignlab.model.generate import Sampler
from alignlab.model.seq2seq import (
    DecoderCache,
    MultiHeadAttention,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    sinusoidal_encoding,
)

TINY = dict(vocab_size=32, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64,
            dropout=0.0, max_len=32)


def tiny(**overrides) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(Seq2SeqConfig(**{**TINY, **overrides})).eval()


def batch(B=3, S=7, T=5, pad_rows=((0, 3), (2, 1))):
    """Random source (left-padded: row r has n pads) and target prefix."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 32, (B, S), generator=g)
    src_mask = torch.ones(B, S, dtype=torch.long)
    for r, n in pad_rows:
        src_mask[r, :n] = 0
        src[r, :n] = 0
    tgt = torch.randint(4, 32, (B, T), generator=g)
    return src, src_mask, tgt


BOTH_NORMS = pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])


# ------------------------------------------------------------------------------ positional encoding
def test_sinusoidal_encoding_hand_checked_values():
    pe = sinusoidal_encoding(max_len=10, d_model=4)  # frequencies 10000^(0/4) = 1 and 10000^(-2/4) = 0.01
    assert pe.shape == (10, 4)
    assert torch.equal(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))  # sin 0, cos 0 in every pair
    expected_1 = torch.tensor([math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)])
    expected_5 = torch.tensor([math.sin(5), math.cos(5), math.sin(0.05), math.cos(0.05)])
    torch.testing.assert_close(pe[1], expected_1)  # [0.8415, 0.5403, 0.0100, 1.0000]
    torch.testing.assert_close(pe[5], expected_5)  # [-0.9589, 0.2837, 0.0500, 0.9988]
    pe512 = sinusoidal_encoding(max_len=101, d_model=512)  # paper size: dim 2i=2 has wavelength 2*pi*10000^(2/512)
    torch.testing.assert_close(pe512[100, 2], torch.tensor(math.sin(100 / 10000 ** (2 / 512))))
    torch.testing.assert_close(pe512[100, 511], torch.tensor(math.cos(100 / 10000 ** (510 / 512))))


# ----------------------------------------------------------------------------------------- masks
@BOTH_NORMS
def test_source_padding_is_invisible(norm_first):
    model = tiny(norm_first=norm_first)
    src, src_mask, tgt = batch()
    out = model(src, src_mask, tgt)
    changed = src.clone()
    changed[0, :3] = 17  # the pad positions of row 0 get real-looking tokens, still masked
    changed[2, 0] = 5
    torch.testing.assert_close(model(changed, src_mask, tgt), out, rtol=0, atol=1e-6)
    # more left padding (positions count real tokens only) changes nothing either
    padded = torch.cat([torch.zeros(3, 4, dtype=torch.long), src], 1)
    padded_mask = torch.cat([torch.zeros(3, 4, dtype=torch.long), src_mask], 1)
    torch.testing.assert_close(model(padded, padded_mask, tgt), out, rtol=0, atol=1e-5)
    # while changing a real source token does change the output (the check above is not vacuous)
    real = src.clone()
    real[0, 5] = (real[0, 5] + 1) % 28 + 4
    assert (model(real, src_mask, tgt)[0] - out[0]).abs().max() > 1e-3


@BOTH_NORMS
def test_decoder_is_causal(norm_first):
    model = tiny(norm_first=norm_first)
    src, src_mask, tgt = batch()
    out = model(src, src_mask, tgt)
    changed = tgt.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 28 + 4  # a future target token
    out2 = model(src, src_mask, changed)
    torch.testing.assert_close(out2[:, :3], out[:, :3], rtol=0, atol=1e-6)  # earlier positions: identical
    assert (out2[:, 3:] - out[:, 3:]).abs().amax(dim=(1, 2)).min() > 1e-3  # position 3 on: changed


def test_cross_attention_sees_only_the_source():
    model = tiny()
    src, src_mask, tgt = batch()
    memory = model.encode(src, src_mask)  # (B, S, C)
    out = model.decode(tgt, memory, src_mask)
    # perturbing the encoder output at a real source position changes every decoder position of that row
    poked = memory.clone()
    poked[1, 2] += 1.0
    diff = (model.decode(tgt, poked, src_mask) - out).abs().amax(-1)  # (B, T)
    assert diff[1].min() > 1e-3
    assert diff[0].max() == 0 and diff[2].max() == 0  # other rows untouched
    # at a padded source position it changes nothing: cross-attention masks source padding
    poked_pad = memory.clone()
    poked_pad[0, :3] += 100.0
    torch.testing.assert_close(model.decode(tgt, poked_pad, src_mask), out, rtol=0, atol=1e-6)
    # the attention weights themselves are exactly 0 on pad keys
    attn = model.decoder_layers[0].cross_attn
    q = attn.heads(attn.q_proj(torch.randn(3, 5, 32)))
    k = attn.heads(attn.k_proj(memory))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~src_mask[:, None, None].bool(), float("-inf"))
    assert scores.softmax(-1)[0, :, :, :3].abs().max() == 0


def test_attention_module_roles():
    cfg = Seq2SeqConfig(**TINY)
    with pytest.raises(ValueError, match="never causal"):
        MultiHeadAttention(cfg, causal=True, cross=True)
    torch.manual_seed(0)
    cross = MultiHeadAttention(cfg, cross=True)
    x, memory = torch.randn(2, 4, 32), torch.randn(2, 6, 32)
    assert cross(x, memory).shape == (2, 4, 32)  # queries' length, keys' source length 6
    # a query's output depends on its own projection and the memory, never on the other queries
    x2 = x.clone()
    x2[:, 0] += 1.0
    torch.testing.assert_close(cross(x2, memory)[:, 1:], cross(x, memory)[:, 1:])


# ------------------------------------------------------------------------------------ caching
@BOTH_NORMS
def test_cached_decoding_equals_full_forward(norm_first):
    model = tiny(norm_first=norm_first)
    src, src_mask, tgt = batch(T=6)
    full = model(src, src_mask, tgt)  # (B, T, V)
    memory = model.encode(src, src_mask)
    cache = DecoderCache(model.config, 3, 6, torch.float32, None)
    steps = [model.decode(tgt[:, t : t + 1], memory, src_mask, cache=cache) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    assert cache.cross[0] is not None and cache.length == 6
    # a chunk after a cached prefix (needs the offset causal mask) agrees too
    cache = DecoderCache(model.config, 3, 6, torch.float32, None)
    a = model.decode(tgt[:, :2], memory, src_mask, cache=cache)
    b = model.decode(tgt[:, 2:], memory, src_mask, cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=0, atol=1e-5)


def test_cross_keys_are_projected_once():
    model = tiny()
    src, src_mask, _ = batch()
    calls = []
    handle = model.decoder_layers[0].cross_attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    out = model.generate(src, src_mask, 6, bos_token_id=1, eos_token_id=2, pad_token_id=0, greedy=True)
    handle.remove()
    assert out.completion_ids.shape[1] == 6 and len(calls) == 1


def test_greedy_generation_matches_full_forward_argmax():
    model = tiny()
    src, src_mask, _ = batch()
    out = model.generate(src, src_mask, 6, bos_token_id=1, eos_token_id=2, pad_token_id=0, greedy=True)
    # re-score the generated sequence without a cache: each greedy token is the argmax of the full forward
    prefix = torch.cat([torch.ones(3, 1, dtype=torch.long), out.completion_ids[:, :-1]], 1)
    logits = model(src, src_mask, prefix)
    m = out.completion_mask.bool()
    assert torch.equal(logits.argmax(-1)[m], out.completion_ids[m])
    logps = logits.log_softmax(-1).gather(-1, out.completion_ids[..., None])[..., 0]  # (B, T)
    torch.testing.assert_close(out.logprobs[m], logps[m])


def test_sampling_is_seeded_and_stops_at_eos():
    model = tiny()
    src, src_mask, _ = batch()
    kw = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, temperature=1.5)
    a = model.generate(src, src_mask, 12, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(src, src_mask, 12, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    for row, m, trunc in zip(a.completion_ids, a.completion_mask, a.truncated):
        n = int(m.sum())
        assert (row[n:] == 0).all()  # pad after the stop
        assert bool(trunc) == (2 not in row[:n].tolist())
        if not trunc:
            assert row[n - 1] == 2


def test_sampling_draws_what_the_shared_sampler_draws_on_each_steps_logits():
    """Seq2seq sampling is ``generate.Sampler`` (the decoder-only sampler): replayed with the same seed on the
    teacher-forced logits of the sampled completions, it draws the same tokens, with the same log-probs."""
    model = tiny()
    src, src_mask, _ = batch()
    kw = dict(temperature=1.5, top_k=20, top_p=0.95)
    out = model.generate(src, src_mask, 12, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         generator=torch.Generator().manual_seed(3), **kw)
    prefix = torch.cat([torch.ones(3, 1, dtype=torch.long), out.completion_ids[:, :-1]], 1)
    with torch.no_grad():
        logits = model(src, src_mask, prefix)  # (B, T, V)
    choose = Sampler(generator=torch.Generator().manual_seed(3), **kw)
    tokens, logps = zip(*(choose(logits[:, t]) for t in range(logits.shape[1])))  # one draw per row per step
    m = out.completion_mask.bool()
    assert out.lengths.max() >= 3 and torch.equal(torch.stack(tokens, 1)[m], out.completion_ids[m])
    torch.testing.assert_close(torch.stack(logps, 1)[m], out.logprobs[m], atol=1e-5, rtol=1e-5)


def test_embeddings_are_tied_and_scaled():
    model = tiny()
    assert model.out_proj.weight is model.tgt_embed.weight is model.src_embed.weight
    ids = torch.tensor([[5, 6, 7]])
    x = model.embed(model.tgt_embed, ids, torch.arange(3)[None])
    expected = model.tgt_embed.weight[ids] * math.sqrt(32) + sinusoidal_encoding(3, 32)[None]
    torch.testing.assert_close(x, expected)
    untied = tiny(share_embeddings=False, tie_output=False)
    assert untied.src_embed is not untied.tgt_embed and untied.out_proj.weight is not untied.tgt_embed.weight


def test_save_load_roundtrip(tmp_path):
    model = tiny()
    src, src_mask, tgt = batch()
    model.save(tmp_path / "m")
    loaded = Seq2SeqTransformer.load(tmp_path / "m").eval()
    assert loaded.out_proj.weight is loaded.tgt_embed.weight
    torch.testing.assert_close(loaded(src, src_mask, tgt), model(src, src_mask, tgt), rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")


# -------------------------------------------------------------------------------- the trainer
def test_noam_schedule_hand_computed():
    # paper setting d_model=512, warmup 4000: d^-0.5 = 0.0441942
    assert noam_lr(1, 512, 4000) == pytest.approx(512**-0.5 * 4000**-1.5)  # 1.7469e-07
    assert noam_lr(1, 512, 4000) == pytest.approx(1.7469e-07, rel=1e-4)
    assert noam_lr(4000, 512, 4000) == pytest.approx(6.9877e-04, rel=1e-4)  # the peak: (512 * 4000)^-0.5
    assert noam_lr(16000, 512, 4000) == pytest.approx(3.4939e-04, rel=1e-4)  # half the peak at 4x warm-up
    assert noam_lr(2000, 512, 4000) == pytest.approx(3.4939e-04, rel=1e-4)  # linear warm-up: half-way
    assert noam_lr(100, 128, 100, lr_scale=0.5) == pytest.approx(0.5 / math.sqrt(128 * 100))  # 4.4194e-3
    with pytest.raises(ValueError, match="from 1"):
        noam_lr(0, 512, 4000)


def test_optimizer_follows_the_schedule():
    module = Seq2Seq(arch=Seq2SeqConfig(**{**TINY, "vocab_size": 128}), warmup_steps=10, lr_scale=2.0)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-9
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * 32**-0.5 * min(s**-0.5, s * 10**-1.5) for s in range(1, 21)]
    assert lrs == pytest.approx(expected)
    assert max(lrs) == lrs[9]  # the peak is at step = warmup_steps


def test_label_smoothing_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))  # (1, 2, 3)
    targets = torch.tensor([[0, 2]])
    mask = torch.tensor([[1, 0]])  # only the first token counts
    loss, m = label_smoothed_nll(logits, targets, mask, epsilon=0.1)
    expected = 0.9 * -math.log(0.5) + 0.1 * -(math.log(0.5) + 2 * math.log(0.25)) / 3  # 0.6700
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["nll"].item() == pytest.approx(math.log(2), rel=1e-5)
    assert m["token_accuracy"].item() == 1.0 and m["num_tokens"].item() == 1
    plain, _ = label_smoothed_nll(logits, targets, torch.ones(1, 2), epsilon=0.0)
    assert plain.item() == pytest.approx((math.log(2) - math.log(0.8)) / 2, rel=1e-5)


def test_config_errors_name_the_argument():
    for kwargs, name in [({"label_smoothing": 1.0}, "label_smoothing"), ({"warmup_steps": 0}, "warmup_steps"),
                         ({"lr_scale": 0.0}, "lr_scale"), ({"adam_betas": (0.9, 1.0)}, "adam_betas"),
                         ({"arch": Seq2SeqConfig(vocab_size=16)}, "arch.vocab_size")]:
        with pytest.raises(ValueError, match=f"model.{name}"):
            Seq2Seq(**kwargs)
    with pytest.raises(ValueError, match="n_heads"):
        Seq2SeqConfig(d_model=30, n_heads=4)


def test_teacher_forcing_inputs_and_initial_loss():
    module = Seq2Seq(arch=Seq2SeqConfig(**{**TINY, "vocab_size": 128}), label_smoothing=0.0)
    comp = torch.tensor([[7, 8, 2], [9, 2, 0]])
    assert module.decoder_inputs(comp).tolist() == [[1, 7, 8], [1, 9, 2]]  # BOS + y_<t
    dm = datamodule("sft", task="reverse", task_args={"min_len": 3, "max_len": 6}, num_train=64,
                    max_prompt_length=20, max_completion_length=10)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    module.log = lambda *a, **k: None
    loss = module.training_step(b, 0).item()
    assert abs(loss - math.log(128)) < 0.5  # ~ln V = 4.85 at init (unit-variance logits)


def test_smoke_20_steps(tmp_path):
    L.seed_everything(0)
    module = Seq2Seq(arch=Seq2SeqConfig(**{**TINY, "vocab_size": 128}), warmup_steps=10)
    dm = datamodule("sft", task="reverse", task_args={"min_len": 3, "max_len": 6}, num_train=640,
                    max_prompt_length=20, max_completion_length=10)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = fit(module, dm, max_steps=20, root=tmp_path, callbacks=[])
    assert trainer.global_step == 20
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert 0.0 <= trainer.callback_metrics["val/accuracy"].item() <= 1.0
    module.export(tmp_path / "hf")  # what the HFExport callback writes; init_from reads it back
    again = Seq2Seq(init_from=str(tmp_path / "hf"))
    src = dm.val_rows[0]["prompt_ids"]
    ids = torch.tensor([src])
    a = module.generate(ids, torch.ones_like(ids), 8, greedy=True)
    b = again.generate(ids, torch.ones_like(ids), 8, greedy=True)
    assert torch.equal(a.completion_ids, b.completion_ids)


@learning_seeds()
def test_learns_to_reverse(seed, record):
    """Exact match on 100 unseen 3-6 digit strings after 450 steps. Measured over seeds 0-4 at 1 and 2 threads (10 runs, results/learning/spread.md):
    0.98 +- 0.04, between 0.88 and 1.00. At 300 steps two seeds at 2 threads reached only 0.66 (post-norm
    and its warm-up: a trajectory that is slower on another machine would too), hence 450. We require 0.8."""
    L.seed_everything(seed)
    arch = Seq2SeqConfig(vocab_size=128, d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                         d_ff=256, dropout=0.0, max_len=32)
    module = Seq2Seq(arch=arch, warmup_steps=50, lr_scale=0.5)
    dm = datamodule("sft", task="reverse", task_args={"min_len": 3, "max_len": 6}, num_train=20000,
                    max_prompt_length=20, max_completion_length=10)
    start = time.time()
    fit(module, dm, max_steps=450)
    acc = val_accuracy(module, dm)
    record(end=acc)
    print(f"reverse 3-6 digits: val exact match {acc:.2f} after 450 steps in {time.time() - start:.1f} s")
    assert acc >= 0.8
