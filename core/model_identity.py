"""What identifies a model across machines: its fingerprint, architecture and tokenizer hash.

A node announces these for the model it was started on (``NodeInfo``), the coordinator for the swarm's
generation-0 base (``SwarmInfo``): a node on another model trains a foreign expert
(:mod:`cogen.node.foreign`) that the coordinator fuses as a teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cogen.protocols.hashing import model_fingerprint, tokenizer_fingerprint

__all__ = ["ModelIdentity", "model_identity"]


@dataclass(frozen=True)
class ModelIdentity:
    """What a node announces about the model it was started on (``None``: not a local directory)."""

    model_sha256: str | None = None
    architecture: str | None = None
    tokenizer_sha256: str | None = None


def model_identity(model_path: str) -> ModelIdentity:
    """The fingerprints and architecture of the model directory ``model_path``."""
    directory = Path(model_path)
    if not (directory / "config.json").is_file():
        return ModelIdentity()
    try:
        names = json.loads((directory / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        names = []
    architecture = str(names[0])[:128] if names else None
    return ModelIdentity(model_fingerprint(directory), architecture, tokenizer_fingerprint(directory))
