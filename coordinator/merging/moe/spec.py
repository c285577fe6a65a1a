"""The on-disk format of a routed mixture: ``mixture.json`` (:class:`MixtureSpec`), its file names, and
:class:`MixtureError`, raised by every part of the mixture."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class ArrowSpec(BaseModel):
    """How an Arrow mixture mixes (:class:`cogen.coordinator.merging.moe.arrow.ArrowOptions`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    top_k: int = Field(ge=1, le=1024, description="experts mixed per token in each layer")
    temperature: float = Field(gt=0, le=1e6, description="of the softmax over the top-k scores")
    seed: int = Field(ge=0, description="of the power iteration behind the prototypes")


class MixtureSpec(BaseModel):
    """``mixture.json``: what a mixture directory holds, with the sha256 of every other file in it.

    ``routing`` is ``sequence`` (the trained router in ``router.safetensors``, reading ``route_tokens``
    tokens) or ``arrow`` (PEFT's zero-shot per-token router, set by ``arrow``; no router file)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    spec_version: int = SPEC_VERSION
    method: Literal["moe"] = "moe"
    base_model: str = Field(description="the model name the experts were trained on")
    routing: Literal["sequence", "arrow"] = "sequence"
    route_tokens: int | None = Field(
        default=None, ge=1, description="sequence routing: tokens at the start of a sequence the router reads"
    )
    arrow: ArrowSpec | None = Field(default=None, description="arrow routing: how it mixes")
    hidden_size: int = Field(ge=1)
    experts: list[MixtureExpert] = Field(min_length=1)
    files: dict[str, str] = Field(description="every other file in the directory -> sha256")

    @model_validator(mode="after")
    def _routing_settings(self) -> MixtureSpec:
        if self.routing == "sequence" and (self.route_tokens is None or self.arrow is not None):
            raise ValueError("sequence routing needs route_tokens and no arrow settings")
        if self.routing == "arrow" and (self.arrow is None or self.route_tokens is not None):
            raise ValueError("arrow routing needs arrow settings and no route_tokens")
        return self
