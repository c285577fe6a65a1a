"""Collecting an expert: download its group's state from the members and save it as an expert checkpoint.

The coordinator joins the group's state averager as an auxiliary peer and loads its state from the
members (``DecentralizedAverager.load_state_from_peers``, exactly what a joining node does): the anchor
weights, the parameter names and the adapter config (a :class:`cogen.protocols.GroupStateInfo`). Nobody
uploads files, and the group keeps training. Everything that arrives is checked before it is written:
the metadata is a schema, the tensors must be finite LoRA anchors, one per declared name, and the state
must be the named expert's on the named generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cogen.core.checkpoint import AdapterMetadata, save_adapter_tensors
from cogen.core.swarm import GroupStateAverager, SwarmClient
from cogen.protocols import GroupStateInfo, GroupStateRejected, parse_group_state
from cogen.protocols.keys import group_prefix, state_prefix

_LORA = (".lora_A.", ".lora_B.")


class CollectError(RuntimeError):
    """A group's state could not be loaded or does not describe a LoRA expert (one line)."""


def download_state(
    client: SwarmClient, expert: str, generation: int, timeout_s: float, group: str | None = None
) -> tuple[GroupStateInfo, list[torch.Tensor]]:
    """Load ``expert``'s group state on ``generation`` from its members (the group at ``group``, by
    default the expert's on that generation); raises :class:`CollectError` when nobody answers or what
    arrives is not that group's state. Call it from the main thread."""
    prefix = state_prefix(group or group_prefix(client.cfg.swarm, expert, generation))
    averager = GroupStateAverager(
        [torch.zeros(1)], client.dht, prefix=prefix, target_group_size=2, min_matchmaking_time=1.0,
        client_mode=True, allow_state_sharing=False, start=True,
    )  # fmt: skip
    try:
        loaded = averager.load_state_from_peers(timeout=timeout_s)
    finally:
        averager.shutdown()
    if loaded is None:
        raise CollectError(f"no member of {expert!r} shared its state within {timeout_s:.0f} s")
    return check_state(expert, generation, loaded[0]), list(loaded[1])


def collect_expert(
    client: SwarmClient, expert: str, generation: int, base_model: str, out_dir: Path, timeout_s: float
) -> Path:
    """Load ``expert``'s group state from its members and save it as an expert checkpoint."""
    info, tensors = download_state(client, expert, generation, timeout_s)
    return save_state(info, tensors, base_model, out_dir)


def check_state(expert: str, generation: int, metadata: Any) -> GroupStateInfo:
    """The state's metadata as a :class:`GroupStateInfo` of ``expert``'s group on ``generation``."""
    try:
        info = parse_group_state(metadata)
    except GroupStateRejected as e:
        raise CollectError(f"{expert}: refused its group state: {e}") from None
    if (info.expert, info.generation) != (expert, generation):
        raise CollectError(
            f"{expert}: the group state says it is {info.expert!r} on generation {info.generation}, "
            f"not generation {generation}"
        )
    return info


def save_group_state(
    expert: str, generation: int, base_model: str, metadata: Any, tensors: list[torch.Tensor], out_dir: Path
) -> Path:
    """Save a group's downloaded state (its :class:`GroupStateInfo` metadata and tensors) as the expert
    checkpoint ``out_dir/<expert>``; raises :class:`CollectError` (one line) on a state that is not a
    valid one of ``expert``'s group on ``generation``."""
    return save_state(check_state(expert, generation, metadata), tensors, base_model, out_dir)


def save_state(info: GroupStateInfo, tensors: list[torch.Tensor], base_model: str, out_dir: Path) -> Path:
    """Write a checked state as the checkpoint ``out_dir/<expert>``, with the generation it trained on."""
    tensors_by_name = _adapter_tensors(info.expert, info, tensors)
    if info.outer_step == 0:  # the group state is still its initial adapter: nothing to merge
        raise CollectError(f"{info.expert!r} has not applied its first outer step yet")
    meta = AdapterMetadata(
        expert=info.expert, base_model=base_model, precision=info.precision, generation=info.generation,
        steps=info.steps, samples=info.samples, tokens=info.tokens,
        train_loss=info.train_loss, first_loss=info.first_loss, outer_step=info.outer_step,
    )  # fmt: skip
    config = {**info.adapter_config, "base_model_name_or_path": base_model}
    return save_adapter_tensors(tensors_by_name, config, out_dir / info.expert, meta)


def _adapter_tensors(
    expert: str, info: GroupStateInfo, tensors: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The anchor half of the state, keyed by PEFT's saved names; refuses anything that is not that."""
    names = info.names
    if len(tensors) != 2 * len(names):  # anchors, then the outer momenta
        raise CollectError(f"{expert}: {len(tensors)} tensors for {len(names)} parameters")
    out = {}
    for name, tensor in zip(names, tensors[: len(names)], strict=True):
        if not any(tag in name for tag in _LORA):
            raise CollectError(f"{expert}: {name} is not a LoRA parameter")
        if not torch.isfinite(tensor).all():
            raise CollectError(f"{expert}: {name} holds NaN or Inf")
        out[name.replace(".default.", ".")] = tensor.detach().float().contiguous()
    return out
