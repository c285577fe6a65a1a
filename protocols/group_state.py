"""The group-state contract: what a group member sends with its state, besides the tensors.

A joining node, or the coordinator collecting an expert at the end of a generation, downloads a group's
state from one member (hivemind's ``load_state_from_peers``): the anchor weights and outer momenta as
tensors, and this metadata, msgpack-encoded by hivemind (never pickle). The node builds a
:class:`GroupStateInfo` and sends :meth:`GroupStateInfo.to_wire`; the coordinator reads the metadata
back with :func:`parse_group_state`, which refuses anything malformed with a one-line reason: the
member may be hostile, so every size is bounded and every float finite.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Final

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from cogen.protocols.records import ExpertName, Finite, Precision
from cogen.protocols.version import PROTOCOL_VERSION

#: bounds on what a member may send: a LoRA on every linear layer of an 80-layer model has ~1,100
#: trainable tensors, and a PEFT adapter config is a few KiB of JSON
MAX_PARAMETERS: Final = 8192
MAX_NAME_CHARS: Final = 512
MAX_CONFIG_BYTES: Final = 64 * 1024
MAX_CONFIG_DEPTH: Final = 8


class GroupStateRejected(ValueError):
    """Why a group's state metadata was refused (one line)."""


def _plain_json(value: Any, depth: int = 0) -> None:
    """Raise ``ValueError`` unless ``value`` is plain JSON (str keys, finite numbers), not too deep."""
    if depth > MAX_CONFIG_DEPTH:
        raise ValueError(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"a key is a {type(key).__name__}, not a string")
            _plain_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _plain_json(item, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("holds a non-finite number")
    elif value is not None and not isinstance(value, (str, int, bool)):
        raise ValueError(f"holds a {type(value).__name__}, not a JSON value")


def _adapter_config(value: dict[str, Any]) -> dict[str, Any]:
    _plain_json(value)
    size = len(json.dumps(value))
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{size} bytes of JSON, more than {MAX_CONFIG_BYTES}")
    return value


def _sequence(value: Any) -> Any:
    """msgpack hands back a list or a tuple: both become a tuple (checked cheaply for length first)."""
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_PARAMETERS:
            raise ValueError(f"{len(value)} parameters, more than {MAX_PARAMETERS}")
        return tuple(value)
    return value


ParameterName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
ParameterNames = Annotated[tuple[ParameterName, ...], BeforeValidator(_sequence), Field(min_length=1)]
AdapterConfig = Annotated[dict[str, Any], AfterValidator(_adapter_config)]


class GroupStateInfo(BaseModel):
    """What a group's shared state carries besides its tensors: enough for the coordinator to turn the
    anchor into an expert checkpoint (PEFT's parameter names and adapter config), the group's outer
    step, and the training behind it. The tensors are the anchors of ``names`` in order, then their
    outer momenta."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    protocol_version: int = Field(default=PROTOCOL_VERSION, ge=0, description="cogen wire protocol version")
    expert: ExpertName
    generation: int = Field(ge=0, description="the generation of the base the group trains on")
    base_model: str = Field(max_length=256, description="the base: a model name, or a generation's path")
    precision: Precision
    names: ParameterNames = Field(
        description="the trainable parameters' names (PEFT's, with the adapter name), in tensor order"
    )
    adapter_config: AdapterConfig = Field(description="the PEFT adapter config as plain JSON")
    outer_step: int = Field(default=0, ge=0, description="outer steps in the state (0: the initial adapter)")
    steps: int = Field(default=0, ge=0, description="the sending member's inner steps")
    samples: int = Field(default=0, ge=0, description="sequences the sending member trained on")
    tokens: int = Field(default=0, ge=0, description="tokens the sending member trained on")
    first_loss: Finite | None = Field(default=None, description="its first windowed training loss")
    train_loss: Finite | None = Field(default=None, description="its latest windowed training loss")

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready (and JSON-ready) dict sent with the state."""
        return self.model_dump(mode="json")


def parse_group_state(metadata: Any) -> GroupStateInfo:
    """Validate a group state's decoded metadata; raise :class:`GroupStateRejected` (one line) if bad."""
    if not isinstance(metadata, dict):
        raise GroupStateRejected(f"the state's metadata is a {type(metadata).__name__}, not a dict")
    theirs = metadata.get("protocol_version")
    if isinstance(theirs, int) and theirs != PROTOCOL_VERSION:
        raise GroupStateRejected(f"the state speaks cogen protocol {theirs}, this peer {PROTOCOL_VERSION}")
    try:
        return GroupStateInfo.model_validate(metadata)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "metadata"
        raise GroupStateRejected(f"{where}: {first['msg']} ({e.error_count()} error(s))") from None
