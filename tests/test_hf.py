"""HF interop: tiny random Llama / Qwen2 / Qwen3 / Mistral models built from configs in the test.

Parity = our logits within 1e-4 of transformers' on a left-padded batch (real positions only) and greedy
generations token-for-token identical; export = save_hf -> AutoModelForCausalLM gives the same logits and
load_hf gives back the identical state dict. Nothing is downloaded.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from alignlab.model.generate import generate
from alignlab.model.hf import config_from_hf, load_hf, save_hf
from alignlab.model.transformer import Transformer, TransformerConfig

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB, PAD, EOS, NEW = 100, 0, 99, 10
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "pad_token_id": PAD,
    "bos_token_id": 1,
    "eos_token_id": EOS,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
HF_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, rope_parameters=dict(LLAMA3_ROPE)),
    "qwen2": lambda: Qwen2Config(  # q/k/v biases, tied head, linear RoPE scaling
        **COMMON,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "qwen3": lambda: Qwen3Config(  # q/k norms, head_dim 32 != 64 / 4
        **COMMON, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=4),  # window shorter than the prompts
}


def perturb_(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Random non-trivial values everywhere (biases and norm weights start at 0 / 1)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def left_padded_batch():
    lengths = [8, 5, 2]
    ids = torch.randint(2, VOCAB - 1, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, -n:] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def hf_logits(hf, ids, mask):
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # HF's forward does not derive them from the mask
    return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def make_hf(kind):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(HF_CONFIGS[kind](), dtype=torch.float32).eval()
    perturb_(hf)
    return hf


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_hf_checkpoint_parity(kind, tmp_path):
    hf = make_hf(kind)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.qkv_bias == (kind == "qwen2") and ours.config.qk_norm == (kind == "qwen3")
    assert ours.config.tie_embeddings == (kind == "qwen2")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref, got = hf_logits(hf, ids, mask), ours(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)

    out = generate(ours, ids, mask, NEW, eos_token_id=EOS, pad_token_id=PAD, greedy=True)
    ref_ids = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=NEW,
        eos_token_id=EOS,
        pad_token_id=PAD,
        use_cache=True,
    )[:, ids.shape[1] :]
    assert ref_ids.shape[1] >= 2
    assert torch.equal(out.completion_ids, ref_ids)


OUR_CONFIGS = {
    "llama_tied": {},
    "qwen2_bias_linear_rope": {
        "qkv_bias": True,
        "tie_embeddings": False,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    "qwen3_qknorm_llama3_rope": {
        "qk_norm": True,
        "head_dim": 32,
        "rope_theta": 500000.0,
        "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
    },
    "mistral_window": {"sliding_window": 4, "tie_embeddings": False},
    "qwen2_window": {"qkv_bias": True, "sliding_window": 3},
}


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
def test_export_round_trip(name, tmp_path):
    cfg = TransformerConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, **OUR_CONFIGS[name]
    )
    ours = Transformer(cfg).eval()
    perturb_(ours)
    save_hf(ours, tmp_path)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref, got = hf_logits(hf.eval(), ids, mask), ours(ids, mask)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)

    back = load_hf(tmp_path)
    assert back.config == cfg
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (back.lm_head.weight is back.embed_tokens.weight) == cfg.tie_embeddings
    torch.testing.assert_close(back.rotary.inv_freq, ours.rotary.inv_freq, atol=0, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**COMMON)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (
        tmp_path / "model.safetensors"
    ).exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_hf(tmp_path).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, mask)[mask.bool()], hf_logits(hf, ids, mask)[mask.bool()], atol=1e-4, rtol=0
        )


def test_dtype(tmp_path):
    save_hf(Transformer(TransformerConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2)).to(torch.bfloat16),
        tmp_path
    )
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_hf(tmp_path).embed_tokens.weight.dtype == torch.bfloat16  # default: as stored
    model = load_hf(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert load_hf(tmp_path, dtype=torch.bfloat16).rotary.inv_freq.dtype == torch.float32


def test_tokenizer_ids_and_files_are_exported(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abc")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    save_hf(Transformer(TransformerConfig(vocab_size=6, dim=32, n_layers=1, n_heads=2)),
        tmp_path, tokenizer=tokenizer
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("b") == 4


def test_refuses_to_overwrite(tmp_path):
    model = Transformer(TransformerConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2))
    save_hf(model, tmp_path)
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        save_hf(model, tmp_path)
    save_hf(model, tmp_path, overwrite=True)


# ---------------------------------------------------------------- errors name the file and the key


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS["llama"]().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_hf(tmp_path)


def test_unsupported_model_type_names_file_and_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(NotImplementedError, match="config.json.*'model_type' = 'gpt2'") as e:
        load_hf(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_missing_and_unexpected_weights_are_named(tmp_path):
    save_hf(Transformer(TransformerConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2)), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing \['layers.0.mlp.up_proj.weight'\].*unexpected \['layers.0.mlp.extra"
    ):
        load_hf(tmp_path)


def llama_dict(**overrides):
    return {**HF_CONFIGS["llama"]().to_dict(), **overrides}


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True}, "attention_bias"),  # Llama's puts a bias on o_proj too
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ],
)
def test_unsupported_keys_raise(overrides, key):
    with pytest.raises(NotImplementedError, match=f"ckpt/config.json.*{key}"):
        config_from_hf(llama_dict(**overrides), "ckpt/config.json")


def test_missing_required_key():
    d = llama_dict()
    del d["hidden_size"]
    with pytest.raises(ValueError, match="c.json: required key 'hidden_size'"):
        config_from_hf(d, "c.json")


def test_qwen_sliding_window_semantics():
    base = {**Qwen2Config(**COMMON).to_dict(), "sliding_window": 8, "layer_types": None}
    # off unless use_sliding_window (old Qwen2 configs carry sliding_window=4096 with it off)
    assert config_from_hf({**base, "use_sliding_window": False}).sliding_window is None
    # layers i >= max_window_layers slide: none, all, or some (unsupported)
    assert config_from_hf({**base, "use_sliding_window": True, "max_window_layers": 2}).sliding_window is None
    assert config_from_hf({**base, "use_sliding_window": True, "max_window_layers": 0}).sliding_window == 8
    with pytest.raises(NotImplementedError, match="max_window_layers.*layers \\[1\\] only"):
        config_from_hf({**base, "use_sliding_window": True, "max_window_layers": 1}, "q/config.json")


def test_v4_style_config():
    d = llama_dict(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=5e5, torch_dtype="bfloat16")
    del d["rope_parameters"]
    cfg = config_from_hf(d)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    d = llama_dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        }
    )
    assert config_from_hf(d).rope_scaling["original_max_position_embeddings"] == 64  # HF's default
