"""A node's full training state on disk: its schema, how it is written and read back, nothing pickled.

Layout under the node's output directory (one directory per generation, so that moving to a new base
never overwrites the state of the old one)::

    state/gen-000001/step-00000120/training_state.safetensors   adapter weights, anchor, outer momentum,
                                                                 inner optimizer state (named tensors)
    state/gen-000001/step-00000120/training_state.json          TrainingState: version, base, outer step,
                                                                 counters, data position, sha256
    state/gen-000001/latest -> step-00000120                     (symlink, swapped atomically)

Nothing here is pickle: the optimizer's state dict (bitsandbytes 8-bit AdamW or torch AdamW) is
flattened into named tensors plus a JSON tree that says where each one goes (:func:`flatten`). A state
is written into a temporary directory and renamed into place (:func:`cogen.core.atomic.write_dir_atomic`),
so a SIGKILL at any moment leaves the previous complete state. Which saved state a node resumes from,
and how it goes back into the node, is :mod:`cogen.node.resume`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cogen.core.atomic import fsync_dir, swap_symlink, write_dir_atomic
from cogen.core.checkpoint import CheckpointError, prune_dirs
from cogen.node.group import GroupAverager
from cogen.node.trainer import ExpertTrainer
from cogen.protocols.hashing import sha256_file
from cogen.protocols.version import software_version

STATE_VERSION = 1
TENSORS_FILE = "training_state.safetensors"
META_FILE = "training_state.json"
MAX_TENSORS = 100_000  # a state file is this node's own, but still bounded before anything is loaded


class TrainingState(BaseModel):
    """What a saved training state is, beside its tensors (``training_state.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state_version: int = STATE_VERSION
    expert: str
    generation: int = Field(ge=0)
    base: str = Field(
        description="the base's identity: sha256:<manifest hash> of a published base, else its name"
    )
    peer_id: str = Field(description="the peer id of the process that saved it (its shard claim may linger)")
    outer_step: int | None = Field(ge=0, description="the group's outer step (None: a solo node)")
    samples_at_anchor: int = Field(ge=0, description="the trainer's samples the anchor holds")
    steps: int = Field(ge=0)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    skipped: int = Field(ge=0)
    batches_consumed: int = Field(ge=0, description="batches of the shard's stream trained on")
    shard: int = Field(ge=0)
    num_shards: int = Field(ge=1)
    data: str = Field(description="what the stream depends on besides the shard; must match to skip batches")
    first_loss: float | None = None
    train_loss: float | None = None
    optimizer: Any = Field(description="the optimizer's state dict as JSON, tensors by name")
    scheduler: dict[str, Any]
    created_at: float = Field(default_factory=time.time)
    software_version: str = Field(default_factory=software_version)
    tensors_sha256: str = ""


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring metadata of older cogen versions up to :data:`STATE_VERSION` (version 1 is the first)."""
    version = raw.get("state_version")
    if not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
        raise CheckpointError(f"training state version {version!r} is not one this cogen understands")
    return raw


# ---- the optimizer's state dict as named tensors + JSON ------------------------------------------------


def flatten(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``tree`` (dicts, lists, tuples, scalars, tensors) as JSON; tensors go into ``tensors`` by name."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().clone().contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        if not all(isinstance(k, (str, int)) for k in tree):
            raise TypeError(f"{prefix}: only str and int keys can be saved")
        return {"__dict__": [[k, flatten(v, f"{prefix}.{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"{prefix}: cannot save a {type(tree).__name__}")


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`flatten`."""
    if isinstance(tree, dict) and set(tree) == {"__tensor__"}:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and set(tree) == {"__dict__"}:
        return {k: unflatten(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


# ---- saving --------------------------------------------------------------------------------------------


def generation_dir(out_dir: Path, generation: int) -> Path:
    """Where the states saved on generation ``generation``'s base go."""
    return Path(out_dir) / "state" / f"gen-{generation:06d}"


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a state holds: the adapter's (what trains)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(
    out_dir: Path,
    meta: TrainingState,
    model: torch.nn.Module,
    trainer: ExpertTrainer,
    group: GroupAverager | None,
    lock_timeout_s: float | None = None,
) -> Path:
    """Write the node's full training state for ``meta.generation``; returns its directory.

    Raises :class:`TimeoutError` (nothing written) if the group's state stays locked over
    ``lock_timeout_s`` (see :meth:`GroupAverager.state_copy`)."""
    from safetensors.torch import save_file

    tensors = {f"weights.{n}": p.detach().cpu().clone().contiguous() for n, p in trainable(model).items()}
    if group is not None:
        anchor, momentum = group.state_copy(lock_timeout_s)
        for i, (a, m) in enumerate(zip(anchor, momentum, strict=True)):
            tensors[f"anchor.{i}"], tensors[f"momentum.{i}"] = a.contiguous(), m.contiguous()
    optimizer = flatten(trainer.optimizer.state_dict(), "optimizer", tensors)
    scheduler = json.loads(json.dumps(trainer.scheduler.state_dict(), default=lambda o: None))
    root = generation_dir(out_dir, meta.generation)
    final = root / f"step-{meta.steps:08d}"

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS_FILE))
        full = meta.model_copy(
            update={
                "optimizer": optimizer,
                "scheduler": scheduler,
                "tensors_sha256": sha256_file(tmp / TENSORS_FILE),
            }
        )
        (tmp / META_FILE).write_text(full.model_dump_json(indent=1))

    write_dir_atomic(final, write, replace=True)
    swap_symlink(root / "latest", final)
    prune_dirs(root, "step-*", 2, final, marker=META_FILE)
    fsync_dir(root)
    return final


# ---- loading -------------------------------------------------------------------------------------------


@dataclass
class SavedState:
    """A state read back and verified: where it was, its metadata, its tensors by name."""

    path: Path
    meta: TrainingState
    tensors: dict[str, torch.Tensor]


def read_state(path: Path) -> SavedState:
    """Read and verify a saved state directory (metadata schema, version, the tensors' sha256)."""
    from safetensors.torch import load_file

    meta_path = Path(path) / META_FILE
    try:
        raw = json.loads(meta_path.read_text())
        if not isinstance(raw, dict):
            raise CheckpointError(f"{meta_path} does not hold a JSON object")
        meta = TrainingState.model_validate(_upgrade(raw))
    except (OSError, ValueError) as e:
        if isinstance(e, ValidationError):
            e = ValueError(f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']}")
        raise CheckpointError(f"cannot read {meta_path}: {e}") from None
    weights = Path(path) / TENSORS_FILE
    if not weights.is_file() or sha256_file(weights) != meta.tensors_sha256:
        raise CheckpointError(f"{weights} is missing or does not match its sha256 in {META_FILE}")
    tensors = load_file(str(weights))
    if len(tensors) > MAX_TENSORS:
        raise CheckpointError(f"{weights} holds {len(tensors)} tensors, more than a node's state has")
    return SavedState(Path(path), meta, tensors)
