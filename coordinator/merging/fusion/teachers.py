"""Fusion teachers: the generation's same-base experts, and sources of other architectures or tokenizers.

- An **expert** teacher is the parent base with one expert's adapter (loaded for its pass, unloaded
  after), on the student's tokenizer.
- A **source** is another model: a cogen expert checkpoint trained on another base (the base is
  resolved as a node resolves ``--model``, the adapter verified by its sha256s), or a Hugging Face
  model directory. Its own tokenizer is aligned with the student's on the text (:mod:`.targets`).

Each teacher has an identity for the manifest (:class:`cogen.protocols.fusion.FusionSource`): its
architecture, the sha256 of its tokenizer's vocabulary and of its weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cogen.coordinator.merging.experts import Expert, load_expert
from cogen.coordinator.merging.registry import MergeError
from cogen.core import models
from cogen.core.checkpoint import load_adapter
from cogen.core.corpora import known_domains
from cogen.protocols.hashing import sha256_file

__all__ = ["ExpertTeacher", "SourceTeacher", "load_source", "tokenizer_sha256"]


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id, sorted): equal for equal vocabularies."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def _architecture(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    names = getattr(config, "architectures", None) or [type(model).__name__]
    return str(names[0])


@dataclass
class ExpertTeacher:
    """The parent base with one same-base expert's adapter."""

    expert: Expert
    base: nn.Module

    @property
    def name(self) -> str:
        return self.expert.label

    @property
    def domain(self) -> str:
        return self.expert.metadata.expert

    @contextmanager
    def open(self) -> Iterator[tuple[nn.Module, Any | None]]:
        adapted = load_adapter(self.base, self.expert.path)
        try:
            yield adapted, None
        finally:
            adapted.unload()

    def identity(self, student_tokenizer: Any) -> dict[str, str]:
        return {
            "architecture": _architecture(self.base), "tokenizer_sha256": tokenizer_sha256(student_tokenizer),
            "weights_sha256": self.expert.sha256, "base_model": self.expert.metadata.base_model,
        }  # fmt: skip


@dataclass
class SourceTeacher:
    """A model of another architecture, size or tokenizer (see the module)."""

    name: str
    domain: str | None  # the domain it was trained on, when it says (a cogen checkpoint does)
    path: Path
    base_path: str  # the directory its weights load from
    adapter: Path | None  # a cogen checkpoint's adapter, on ``base_path``
    weights_sha256: str
    device: str

    @contextmanager
    def open(self) -> Iterator[tuple[nn.Module, Any | None]]:
        from cogen.coordinator.merging.merge import load_base_fp32

        model = load_base_fp32(self.base_path, models.resolve_device(self.device))
        tokenizer = models.load_tokenizer(self.base_path)
        if self.adapter is not None:
            model = load_adapter(model, self.adapter)
        try:
            yield model, tokenizer
        finally:
            del model

    def identity(self, student_tokenizer: Any) -> dict[str, str]:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.base_path)
        tokenizer = models.load_tokenizer(self.base_path)
        return {"architecture": str((config.architectures or [config.model_type])[0]),
                "tokenizer_sha256": tokenizer_sha256(tokenizer), "weights_sha256": self.weights_sha256,
                "base_model": str(self.base_path if self.adapter is None else self.path)}  # fmt: skip


def _weights_sha256(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MergeError(f"fusion source {directory} holds no *.safetensors weights")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def load_source(path: Path, device: str = "cpu", cache_dir: Path | None = None) -> SourceTeacher:
    """A fusion source from ``path``: a cogen expert checkpoint (or a node's output dir) on any base, or a
    Hugging Face model directory. One-line :class:`MergeError` when it is neither."""
    path = Path(path)
    if not path.exists():
        raise MergeError(f"fusion source {path} does not exist")
    if (path / "config.json").is_file() and not (path / "cogen.json").is_file():
        name = path.name
        domain = name if name in known_domains() else None
        return SourceTeacher(name, domain, path, str(path), None, _weights_sha256(path), device)
    expert = load_expert(path)  # verifies every file; MergeError when it is no checkpoint
    base = models.resolve_model(expert.metadata.base_model, cache_dir)
    return SourceTeacher(f"{expert.metadata.expert}@{expert.metadata.base_model}", expert.metadata.expert,
                         expert.path, base, expert.path, expert.sha256, device)  # fmt: skip
