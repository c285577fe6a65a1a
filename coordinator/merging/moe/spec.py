"""The on-disk format of a routed mixture: ``mixture.json`` (:class:`MixtureSpec`), its file names, and
:class:`MixtureError`, raised by every part of the mixture."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cogen.coordinator.merging.registry import MergeError

NAME = "moe"  #: the method name a manifest records for a routed mixture
SPEC_FILE = "mixture.json"
ROUTER_FILE = "router.safetensors"
SPEC_VERSION = 1
ROUTER_KEYS = ("weight", "bias", "mean", "std")


class MixtureError(MergeError):
    """A mixture cannot be built, saved or loaded as asked (one-line explanation)."""


class MixtureExpert(BaseModel):
    """One expert of a mixture: its label (adapter name), domain, adapter sha256 and directory."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    label: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    expert: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of its adapter_model.safetensors")
    path: str = Field(description="its checkpoint directory, relative to the mixture directory")


class MixtureSpec(BaseModel):
    """``mixture.json``: what a mixture directory holds, with the sha256 of every other file in it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    spec_version: int = SPEC_VERSION
    method: Literal["moe"] = "moe"
    base_model: str = Field(description="the model name the experts were trained on")
    routing: Literal["sequence"] = "sequence"
    route_tokens: int = Field(ge=1, description="tokens at the start of a sequence the router reads")
    hidden_size: int = Field(ge=1)
    experts: list[MixtureExpert] = Field(min_length=1)
    files: dict[str, str] = Field(description="every other file in the directory -> sha256")
