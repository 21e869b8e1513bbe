import pytest
import torch

from alignlab.model.generate import Completions, DecodeBuffers, Sampler, draw_blocked, filter_logits, generate, sample
from alignlab.model.transformer import KVCache, Transformer, TransformerConfig

EOS, PAD = 1, 0


def logsumexp_atol(n: int) -> float:
    """How far two fp32 log-sum-exps over ``n`` terms may differ by summation order alone: the sum's rounding
    error grows like sqrt(n) eps (the order differs between our one-pass sampler and torch's log_softmax, and
    between CPUs' kernel paths: 1.2e-5 seen at n = 49152 on one VM), 4x that; a wrong formula is off by >> 1e-3."""
    return max(1e-5, 4 * n**0.5 * torch.finfo(torch.float32).eps)


def model():
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4)).eval()


def prompts():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    return ids, (ids != 0).long()


def test_greedy_matches_step_by_step_argmax():
    m = model()
    ids, mask = prompts()
    out = generate(m, ids, mask, 6, EOS, PAD, greedy=True)
    # recompute greedily without the cache, one full forward per token
    for row in range(2):
        seq = ids[row][mask[row].bool()][None]
        for t in range(out.completion_ids.shape[1]):
            if not out.completion_mask[row, t]:
                break
            nxt = m(seq)[0, -1].argmax()
            assert nxt.item() == out.completion_ids[row, t].item()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)


def test_sampling_is_seedable_and_logprobs_match_forward():
    m = model()
    ids, mask = prompts()
    a = generate(m, ids, mask, 8, EOS, PAD, temperature=0.7, generator=torch.Generator().manual_seed(3))
    b = generate(m, ids, mask, 8, EOS, PAD, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.completion_ids, b.completion_ids)
    # returned log-probs are those of softmax(logits / T) of a full forward pass
    full = torch.cat([ids, a.completion_ids], 1)
    fmask = torch.cat([mask, a.completion_mask], 1)
    with torch.no_grad():
        logits = m(full, fmask)[:, ids.shape[1] - 1 : -1] / 0.7
    ref = logits.log_softmax(-1).gather(-1, a.completion_ids[..., None]).squeeze(-1) * a.completion_mask
    torch.testing.assert_close(a.logprobs, ref, atol=1e-5, rtol=1e-5)


def test_num_samples_prefills_once_and_equals_repeated_prompts():
    """num_samples=G: rows b*G .. b*G+G-1 sample prompt b; the same as repeating each prompt G times."""
    m = model()
    ids, mask = prompts()
    calls = []
    forward = m.forward
    m.forward = lambda x, *a, **k: (calls.append(tuple(x.shape)), forward(x, *a, **k))[1]
    a = generate(m, ids, mask, 6, EOS, PAD, temperature=0.9, generator=torch.Generator().manual_seed(5), num_samples=3)
    assert calls[0] == (2, 5)  # the prefill: each prompt once
    assert all(c == (6, 1) for c in calls[1:2])  # then every sample decodes
    b = generate(m, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), 6, EOS, PAD, temperature=0.9,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    assert len({tuple(r.tolist()) for r in a.completion_ids[:3]}) > 1  # the copies sample independently


def test_sample_draws_the_categorical_distribution_and_never_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.2, 0.7, 0.0]]).expand(100_000, 6).contiguous()
    draws = sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    torch.testing.assert_close(freq, probs[0], atol=0.005, rtol=0)  # 3-4 sigma at n = 1e5
    assert freq[[0, 2, 5]].sum() == 0
    # unnormalised rows (filtered logits' softmax is normalised, but the contract holds either way)
    assert sample(torch.tensor([[0.0, 3.0, 0.0]]), torch.Generator().manual_seed(1)).item() == 1
    u_one = torch.tensor([[0.5, 0.5, 0.0]])  # a u that rounds up to the total still lands on a real token
    assert all(sample(u_one, torch.Generator().manual_seed(k)).item() in (0, 1) for k in range(50))


def test_rows_stop_at_eos_and_batch_stops_when_all_done():
    m = model()
    ids, mask = prompts()
    # a head that makes EOS overwhelmingly likely from the first token on
    m.lm_head = torch.nn.Linear(32, 40, bias=True)
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.bias.fill_(-10)
        m.lm_head.bias[EOS] = 10
    out = generate(m, ids, mask, 10, EOS, PAD, generator=torch.Generator().manual_seed(0))
    assert out.completion_ids.shape[1] == 1  # whole batch stopped after one step
    assert out.completion_mask.tolist() == [[1], [1]]
    assert not out.truncated.any()


def test_rows_that_finish_early_leave_the_batch_and_change_no_other_row(monkeypatch):
    m = model()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 3, 4, 6, 7], [0, 0, 0, 9, 2], [0, 2, 4, 6, 8]])
    mask = (ids != 0).long()
    free = generate(m, ids, mask, 8, eos_token_id=-1, pad_token_id=PAD, greedy=True)  # no row ever stops
    # an EOS on the greedy path of 2..4 rows before their last step: they stop early, the others run on
    eos = next(tok for tok in free.completion_ids.unique().tolist()
               if 2 <= (free.completion_ids[:, :7] == tok).any(1).sum() < len(ids))
    kept = []
    keep_rows = KVCache.keep_rows
    monkeypatch.setattr(KVCache, "keep_rows", lambda self, keep: (kept.append(keep.tolist()), keep_rows(self, keep)))
    out = generate(m, ids, mask, 8, eos, PAD, greedy=True)
    assert kept and len(kept[0]) == len(ids) and not all(kept[0])  # finished rows left the batch
    assert out.lengths.min() < out.completion_ids.shape[1] == 8
    for r in range(len(ids)):  # each row decodes exactly as it does alone in a batch of one
        alone = generate(m, ids[r : r + 1], mask[r : r + 1], 8, eos, PAD, greedy=True)
        n = alone.lengths.item()
        assert out.lengths[r].item() == n
        assert out.completion_ids[r, :n].tolist() == alone.completion_ids[0, :n].tolist()
        assert (out.completion_ids[r, n:] == PAD).all()
        torch.testing.assert_close(out.logprobs[r, :n], alone.logprobs[0, :n], atol=1e-5, rtol=1e-5)


def test_mask_covers_up_to_eos_and_pads_after():
    m = model()
    m.lm_head = torch.nn.Linear(32, 40, bias=True)
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.bias.fill_(-20)
        m.lm_head.bias[7] = 20  # always token 7 ...
    ids, mask = prompts()
    out = generate(m, ids, mask, 4, EOS, PAD, greedy=True)
    assert out.completion_ids.tolist() == [[7, 7, 7, 7]] * 2
    assert out.truncated.all() and out.lengths.tolist() == [4, 4]


def test_sampler_is_filter_then_inverse_cdf_and_completions_stop_at_eos():
    """The one sampling step of both decoders: greedy = argmax, else ``sample`` of the filtered
    softmax(logits / T), one uniform per row from the generator; ``Completions`` pads a row after its EOS."""
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    choose = Sampler(temperature=0.5, top_k=7, top_p=0.9, generator=torch.Generator().manual_seed(2))
    tok, logp = choose(logits)
    want = sample(filter_logits(logits / 0.5, 7, 0.9).softmax(-1), torch.Generator().manual_seed(2))
    assert torch.equal(tok, want)
    torch.testing.assert_close(logp, (logits / 0.5).log_softmax(-1).gather(-1, want[:, None])[:, 0])
    assert torch.equal(Sampler(greedy=True)(logits)[0], logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Sampler(temperature=0.0)
    out = Completions(2, 5, EOS, PAD, None)
    assert not out.add(0, torch.tensor([7, EOS]), torch.tensor([-1.0, -2.0]))
    assert out.add(1, torch.tensor([EOS, 9]), torch.tensor([-3.0, -4.0]))
    res = out.output()
    assert res.completion_ids.tolist() == [[7, EOS], [EOS, PAD]]
    assert res.completion_mask.tolist() == [[1, 1], [1, 0]]
    assert res.logprobs.tolist() == [[-1.0, -3.0], [-2.0, 0.0]] and not res.truncated.any()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_unfiltered_sampler_draws_softmax_and_reports_its_log_prob(temperature):
    """Without top-k / top-p one pass over exp(logits / T - max) serves the draw and the normaliser: the tokens
    follow softmax(logits / T) (frequencies over 1e5 draws), they are the ones ``sample`` draws from that
    softmax with the same uniforms (up to rounding at a CDF boundary), and the log-probs equal the
    log-softmax's, greedy's too."""
    logits = torch.randn(1, 6, generator=torch.Generator().manual_seed(3)) * 2
    probs = (logits / temperature).softmax(-1)[0]
    rows = logits.expand(100_000, 6).contiguous()
    tok, logp = Sampler(temperature=temperature, generator=torch.Generator().manual_seed(0))(rows)
    freq = torch.bincount(tok, minlength=6).float() / len(tok)
    torch.testing.assert_close(freq, probs, atol=0.006, rtol=0)  # >= 4 sigma at n = 1e5
    want = sample((rows / temperature).softmax(-1), torch.Generator().manual_seed(0))
    assert (tok == want).float().mean() > 0.9999
    torch.testing.assert_close(logp, probs.log()[tok], atol=1e-5, rtol=0)
    big = torch.randn(8, 49152, generator=torch.Generator().manual_seed(4)) * 5  # a real vocabulary's width
    tok, logp = Sampler(temperature=temperature, generator=torch.Generator().manual_seed(1))(big)
    torch.testing.assert_close(logp, (big / temperature).log_softmax(-1).gather(-1, tok[:, None])[:, 0],
                               atol=logsumexp_atol(big.shape[-1]), rtol=0)
    tok, logp = Sampler(greedy=True)(big)
    assert torch.equal(tok, big.argmax(-1))
    torch.testing.assert_close(logp, big.log_softmax(-1).max(-1).values, atol=logsumexp_atol(big.shape[-1]), rtol=0)


@pytest.mark.parametrize("vocab,block", [(6, 2), (7, 3), (7, 4), (49152, 256), (1000, 256)])
def test_blocked_draw_is_sample_in_two_levels(vocab, block):
    """The two-level draw (block sums, then one block) is the categorical distribution of the weights
    (frequencies over 1e5 draws, the last block shorter where vocab % block != 0), never draws a zero-weight
    token, returns the row sums, and with the same uniforms draws what ``sample`` draws (up to rounding
    at a CDF boundary)."""
    g = torch.Generator().manual_seed(vocab)
    p = torch.rand(vocab, generator=g) ** 4
    p[::5] = 0.0  # zero-weight tokens, and in (6, 2) a zero-weight block
    p[1] = p[1] if vocab > 10 else 0.0
    rows = (p * 3.0).expand(100_000 if vocab < 100 else 2000, vocab).contiguous()  # unnormalised
    tok, total = draw_blocked(rows, torch.Generator().manual_seed(1), block)
    torch.testing.assert_close(total[:, 0], rows.sum(-1), rtol=1e-5, atol=0)
    assert (p[tok] > 0).all()
    if vocab < 100:
        freq = torch.bincount(tok, minlength=vocab).float() / len(tok)
        torch.testing.assert_close(freq, p / p.sum(), atol=0.006, rtol=0)  # >= 4 sigma at n = 1e5
    assert (tok == sample(rows, torch.Generator().manual_seed(1))).float().mean() > 0.998


def test_the_sampler_takes_the_blocked_draw_for_a_real_vocabulary(monkeypatch):
    """From 4 blocks up the unfiltered sampler draws in two levels (same uniforms: the same tokens as the
    one-level draw but at CDF-boundary rounding); its log-probs stay the log-softmax's."""
    import alignlab.model.generate as gen

    big = torch.randn(64, 49152, generator=torch.Generator().manual_seed(4)) * 5
    calls = []
    monkeypatch.setattr(gen, "draw_blocked", lambda *a, **k: calls.append(1) or draw_blocked(*a, **k))
    tok, logp = Sampler(generator=torch.Generator().manual_seed(1))(big)
    assert calls
    monkeypatch.setattr(gen, "BLOCK", big.shape[-1])  # fewer than 4 blocks: the one-level draw
    tok_one, logp_one = Sampler(generator=torch.Generator().manual_seed(1))(big)
    assert len(calls) == 1 and (tok == tok_one).float().mean() > 0.98
    torch.testing.assert_close(logp, big.log_softmax(-1).gather(-1, tok[:, None])[:, 0],
                               atol=logsumexp_atol(big.shape[-1]), rtol=0)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p 0.7: 0.5 alone is < 0.7, 0.5+0.3 crosses it -> keep two
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.4)).tolist() == [[False, True, True, True]]


def test_outputs_can_enter_a_training_graph():
    """Generation runs in inference mode; its outputs are ordinary tensors a trainer can backpropagate through
    (an inference tensor saved for backward, e.g. the ids of an embedding lookup, would raise)."""
    m = model().train()
    ids, mask = prompts()
    out = generate(m, ids, mask, 4, EOS, PAD, generator=torch.Generator().manual_seed(0))
    assert not any(t.is_inference() for t in (out.completion_ids, out.completion_mask, out.logprobs, out.truncated))
    m(torch.cat([ids, out.completion_ids], 1)).logsumexp(-1).sum().backward()
    assert m.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("num_samples", [1, 3])
def test_decode_buffers_change_no_token_and_no_log_prob(monkeypatch, num_samples):
    """The decode loop writes the head's logits and the sampler's weights into two tensors made once
    (``DecodeBuffers``); without them (a fresh tensor per step, the plain F.linear head) every token and
    log-prob is bitwise the same: rows that finish early, a vocabulary large enough for the blocked draw."""
    import alignlab.model.generate as gen

    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=1100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 3, 4, 6, 7]])
    mask = (ids != 0).long()
    free = generate(m, ids, mask, 10, -1, PAD, generator=torch.Generator().manual_seed(2), num_samples=num_samples)
    eos = int(free.completion_ids[:, 2].mode().values)  # some rows stop early, and leave the batch
    run = lambda: generate(m, ids, mask, 10, eos, PAD, generator=torch.Generator().manual_seed(2),
                           num_samples=num_samples)
    heads = []
    head = gen.DecodeBuffers.head
    monkeypatch.setattr(gen.DecodeBuffers, "head", lambda self, model, h: heads.append(
        (out := head(self, model, h)).data_ptr() == self.logits.data_ptr()) or out)
    with_buffers = run()
    assert heads and all(heads)  # every step's logits were written into the one buffer
    monkeypatch.setattr(gen.DecodeBuffers, "head", lambda self, model, h: model.lm_head(h[:, -1]))
    monkeypatch.setattr(gen.DecodeBuffers, "work_for", lambda self, logits: None)
    without = run()
    assert with_buffers.lengths.min() < 10 and torch.equal(with_buffers.completion_ids, without.completion_ids)
    assert torch.equal(with_buffers.logprobs, without.logprobs)
    assert torch.equal(with_buffers.completion_mask, without.completion_mask)


def test_decode_buffers_leave_a_head_that_is_not_a_plain_linear_alone():
    torch.manual_seed(0)
    m = model()
    m.lm_head = torch.nn.Sequential(m.lm_head)  # e.g. the int8 copy's quantized head
    buffers = DecodeBuffers(m, 4)
    h = torch.randn(4, 1, 32)
    assert buffers.logits is None and torch.equal(buffers.head(m, h), m.lm_head(h[:, -1]))
