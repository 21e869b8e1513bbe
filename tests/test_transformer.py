import math

import pytest
import torch
import torch.nn.functional as F

import alignlab.model.speed as speed_module
import alignlab.model.transformer as transformer_module
from alignlab.model.speed import Packing, PrefixCache
from alignlab.model.transformer import (
    KVCache,
    RMSNorm,
    Transformer,
    TransformerConfig,
    attention_mask_4d,
    position_ids_from_mask,
    rope_inv_freq,
)


def model(**kw) -> Transformer:
    cfg = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return Transformer(TransformerConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True}, {"qk_norm": True, "head_dim": 32}, {"tie_embeddings": False}])
def test_causal_mask_holds(kw):
    m = model(**kw)
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(0, 97, (2, 4))  # change the future
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "qkv_bias": True}, {"sliding_window": 4}])
def test_kv_cache_decoding_equals_full_forward(kw):
    m = model(**kw)
    x = torch.randint(0, 97, (3, 14))
    cache = KVCache(m.config, 3, 20, torch.float32, None)
    with torch.no_grad():
        full = m(x)
        steps = [m(x[:, :5], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(5, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_real_logits():
    m = model()
    x = torch.randint(3, 97, (2, 9))
    pad = 4
    padded = torch.cat([torch.zeros(2, pad, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)], 1)
    padded[0, :pad] = torch.randint(0, 97, (pad,))  # whatever sits under the padding must not matter
    with torch.no_grad():
        torch.testing.assert_close(m(padded, mask)[:, pad:], m(x), atol=1e-5, rtol=1e-5)
        # and through the cache, token by token after a padded prefill
        cache = KVCache(m.config, 2, pad + 9, torch.float32, None)
        out = [m(padded[:, : pad + 3], mask[:, : pad + 3], cache=cache)[:, pad:]]
        for t in range(pad + 3, pad + 9):
            out.append(m(padded[:, t : t + 1], mask[:, : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(out, 1), m(x), atol=1e-5, rtol=1e-5)


def test_right_padding_does_not_change_real_logits():
    m = model()
    x = torch.randint(3, 97, (1, 6))
    padded = torch.cat([x, torch.randint(0, 97, (1, 5))], 1)
    mask = torch.tensor([[1] * 6 + [0] * 5])
    with torch.no_grad():
        torch.testing.assert_close(m(padded, mask)[:, :6], m(x), atol=1e-5, rtol=1e-5)


def grads(m: Transformer, out: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    return torch.autograd.grad((out * weight).sum(), list(m.parameters()))


def assert_grads_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5 * float(y.abs().max()) + 1e-7, rtol=1e-4)


def test_packing_pads_and_unpads_real_tokens():
    real = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    p = Packing(real)
    x = torch.arange(6.0).view(2, 3, 1)
    assert p.unpad(x).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert p.pad(p.unpad(x)).flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0]


def test_padded_batch_gives_each_rows_logits_and_gradients():
    """With padding in the batch the projections/MLPs run on real tokens only (Packing); logits and
    gradients of the real tokens equal those of each row run alone without padding."""
    m = model(qkv_bias=True)
    rows = [torch.randint(3, 97, (1, n)) for n in (7, 4, 9)]
    T = 9
    ids = torch.stack([torch.cat([r[0], torch.randint(0, 97, (T - r.shape[1],))]) for r in rows])  # right pad
    mask = (torch.arange(T) < torch.tensor([7, 4, 9])[:, None]).long()
    w = torch.randn(3, T, 97, generator=torch.Generator().manual_seed(0)) * mask[..., None]
    batched = m(ids, mask)
    alone = [m(r) for r in rows]
    for b, r in enumerate(alone):
        torch.testing.assert_close(batched[b, : r.shape[1]], r[0], atol=1e-5, rtol=1e-5)
    g_batched = grads(m, batched, w)
    g_alone = torch.autograd.grad(sum((r * w[b, : r.shape[1]]).sum() for b, r in enumerate(alone)), list(m.parameters()))
    assert_grads_close(g_batched, g_alone)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "qkv_bias": True}])
def test_prefix_cache_shares_a_prompt_with_the_same_logits_and_gradients(kw):
    """U prompts through the model once, their keys/values selected for B rows: the completions' logits and the
    gradients (summed into the shared prompt) equal one forward over each row's prompt + completion."""
    m = model(**kw)
    g = torch.Generator().manual_seed(1)
    U, P, C = 3, 5, 6
    pmask = (torch.arange(P) >= torch.tensor([2, 0, 1])[:, None]).long()  # left-padded prompts
    prompts = torch.randint(3, 97, (U, P), generator=g) * pmask
    index = torch.tensor([1, 0, 2, 1, 0, 1])  # B = 6 rows, prompt of each
    cmask = (torch.arange(C) < torch.tensor([6, 3, 1, 4, 6, 2])[:, None]).long()  # right-padded completions
    comp = torch.randint(3, 97, (6, C), generator=g) * cmask
    mask = torch.cat([pmask[index], cmask], 1)
    full = m(torch.cat([prompts[index], comp], 1), mask)[:, P:]
    cache = PrefixCache()
    m(prompts, pmask, cache=cache)
    cache.select_rows(index)
    assert cache.length == P and cache.k[0].shape[0] == 6
    shared = m(comp, mask, cache=cache)
    w = torch.randn(6, C, 97, generator=g) * cmask[..., None]
    torch.testing.assert_close(shared * cmask[..., None], full * cmask[..., None], atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(m, shared, w), grads(m, full, w))


def test_eager_and_fused_attention_agree(monkeypatch):
    """Short sequences on the CPU take the eager path; it must equal F.scaled_dot_product_attention (GQA,
    causal without a mask, padding masks, decoding with a cache)."""
    m = model()
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        eager = [m(ids), m(ids, mask)]
        cache = KVCache(m.config, 2, 11, torch.float32, None)
        m(ids, mask, cache=cache)
        eager.append(m(ids[:, :1], torch.cat([mask, mask[:, :1]], 1), cache=cache))
        monkeypatch.setattr(speed_module, "EAGER_ATTENTION_MAX_KEYS", 0)
        fused = [m(ids), m(ids, mask)]
        cache = KVCache(m.config, 2, 11, torch.float32, None)
        m(ids, mask, cache=cache)
        fused.append(m(ids[:, :1], torch.cat([mask, mask[:, :1]], 1), cache=cache))
    eager[1], fused[1] = eager[1] * mask[..., None], fused[1] * mask[..., None]
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_loss_at_init_is_about_ln_vocab():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=128, dim=128, n_layers=4, n_heads=4))
    x = torch.randint(0, 128, (8, 33))
    with torch.no_grad():
        loss = F.cross_entropy(m(x[:, :-1]).reshape(-1, 128), x[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(128)) < 0.15


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_mask_4d_semantics():
    mask = torch.tensor([[0, 1, 1]])
    m = attention_mask_4d(mask, q_len=3, past_len=0, sliding_window=None)[0, 0]
    # real query 1 sees key 1 only (key 0 is a pad); query 2 sees 1 and 2; pad query 0 sees itself
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert attention_mask_4d(None, 5, 0, None) is None  # SDPA's causal fast path
    w = attention_mask_4d(torch.ones(1, 4, dtype=torch.long), 4, 0, sliding_window=2)[0, 0]
    assert w[3].tolist() == [False, False, True, True]


def test_gqa_and_tied_weights():
    m = model(n_heads=4, n_kv_heads=1)
    assert m.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    assert m.lm_head.weight is m.embed_tokens.weight
    untied = model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_rmsnorm_and_rope_values():
    n = RMSNorm(4, eps=0.0)
    torch.testing.assert_close(n(torch.tensor([[3.0, 4.0, 0.0, 0.0]])), torch.tensor([[1.2, 1.6, 0.0, 0.0]]))
    inv = rope_inv_freq(4, 10000.0, None)
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.01]))
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_inv_freq(4, 10000.0, {"rope_type": "yarn", "factor": 2})


def test_rope_is_rotate_half_to_the_bit():
    """apply_rope keeps rotate-half's sign in the sin table and swaps the halves with one roll: the same bits
    as x * cos + [-x2, x1] * sin (the Llama/Qwen formula)."""
    m = model()
    pos = torch.tensor([[0, 1, 2, 7, 30]])
    cos, signed_sin = m.rotary(pos, 31)
    x = torch.randn(1, 4, 5, m.config.head_dim)
    freqs = pos[0].float()[:, None] * m.rotary.inv_freq
    emb = torch.cat([freqs, freqs], -1)
    x1, x2 = x.chunk(2, -1)
    assert torch.equal(transformer_module.apply_rope(x, cos, signed_sin),
                       x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin())


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_heads"):
        TransformerConfig(dim=65, n_heads=4)
