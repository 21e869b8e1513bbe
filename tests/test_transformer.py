import math

import pytest
import torch
import torch.nn.functional as F

from alignlab.model.transformer import (
    KVCache, RMSNorm, Transformer, TransformerConfig, attention_mask_4d, position_ids_from_mask, rope_inv_freq,
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


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_heads"):
        TransformerConfig(dim=65, n_heads=4)
