"""Parity with transformers on the real checkpoint (SmolLM2-135M-Instruct, built by ``make model``):
config and special tokens, chat rendering, logits on chat-templated left-padded prompts, greedy
generation token for token, and EOS at ``<|im_end|>``. Without the model directory these fail
(run ``make model``); they are not skipped."""

import os

import pytest
import torch

from alignlab.data.tokenizer import load_tokenizer, render_prompt
from alignlab.model.generate import generate
from alignlab.model.hf import load_hf

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.real_model

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
BOX = " Put the final answer in \\boxed{}."
QUESTIONS = ["What is 7 + 8?" + BOX, "What is 12 + 35?" + BOX, "Say hi."]
# logits of the two implementations on the same fp32 weights: equal up to float32 rounding through 30 layers
# (max |logit| 38.5 on these prompts; measured max abs difference 7.5e-5)
ATOL = 1e-3


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def models(smollm2_dir):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    ours = load_hf(smollm2_dir).eval()
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()
    return ours, hf


@pytest.fixture(scope="module")
def batch(tok):
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert tok.padding_side == "left" and (enc["attention_mask"] == 0).any()  # really left-padded
    return enc["input_ids"], enc["attention_mask"]


def test_config_and_special_tokens_are_the_releases(smollm2_dir, tok, models):
    ours, hf = models
    c = ours.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert tok.eos_token_id == 2 == hf.generation_config.eos_token_id == hf.config.eos_token_id
    assert tok.model_max_length == 8192 == c.max_seq_len
    assert "quantization_config" not in hf.config.to_dict()


def test_chat_rendering_is_apply_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = render_prompt(tok, msgs)
    assert rendered == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == SYSTEM + "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids == list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.decode(ids) == rendered


def test_logits_match_transformers_on_left_padded_chat_prompts(models, batch):
    ours, hf = models
    ids, mask = batch
    with torch.no_grad():
        got = ours(ids, mask)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert ref[real].abs().max() > 10  # real logits, not a degenerate model
    torch.testing.assert_close(got[real], ref[real], atol=ATOL, rtol=0)
    assert torch.equal(got[real].argmax(-1), ref[real].argmax(-1))


def test_greedy_generation_is_token_identical_and_stops_at_im_end(models, batch, tok):
    ours, hf = models
    ids, mask = batch
    new = 12
    out = generate(ours, ids, mask, new, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, greedy=True)
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(out.completion_ids, ref)
    assert out.truncated.tolist() == [False, False, True]  # "Say hi." runs on past 12 tokens
    first = out.completion_ids[0, : int(out.lengths[0])].tolist()
    assert first[-1] == tok.eos_token_id and tok.eos_token_id not in first[:-1]  # stopped at <|im_end|>
    assert tok.decode(first, skip_special_tokens=True) == "7 + 8 = 15"
    assert (out.completion_ids[0, len(first):] == tok.pad_token_id).all() and not out.completion_mask[0, len(first):].any()
