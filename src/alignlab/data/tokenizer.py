"""Tokenizers: a char-level one for the built-in tasks, and HF tokenizers from a local directory.

The char tokenizer is a real ``transformers`` fast tokenizer (a ``tokenizers`` WordLevel model over single
characters, saved as tokenizer.json), so every trainer talks to one interface whether it runs a built-in
task or a Llama/Qwen checkpoint: ``tok(texts)``, ``tok.decode``, ``pad_token_id``, ``eos_token_id``,
``apply_chat_template`` where the tokenizer has a chat template.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of CHARS, plus <pad> <bos> <eos> <unk>; left padding (for generation)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every char
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left",
    )


def load_tokenizer(path: str | Path | None) -> PreTrainedTokenizerBase:
    """``None`` -> the char tokenizer; otherwise the tokenizer saved in a local HF directory.

    Never downloads and never runs remote code. A tokenizer without a pad token pads with EOS.
    """
    if path is None:
        return char_tokenizer()
    path = Path(path)
    if not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer_config.json in this directory")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> str:
    """Prompt text as the model sees it: conversational prompts (lists of {role, content}) go through
    the tokenizer's chat template with the generation prompt; plain strings are used as they are."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        return "".join(m["content"] for m in prompt)
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render_completion(completion: str | list[dict]) -> str:
    """Completion text: a string, or the content of conversational assistant turns."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion)
