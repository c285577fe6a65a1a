"""A node's full training state on disk, so that a restarted node goes on where it stopped.

Layout under the node's output directory (one directory per generation, so that moving to a new base
never overwrites the state of the old one)::

    state/gen-000001/step-00000120/training_state.safetensors   adapter weights, anchor, outer momentum,
                                                                 inner optimizer state (named tensors)
    state/gen-000001/step-00000120/training_state.json          TrainingState: version, base, outer step,
                                                                 counters, data position, sha256
    state/gen-000001/latest -> step-00000120                     (symlink, swapped atomically)

Nothing here is pickle: the optimizer's state dict (bitsandbytes 8-bit AdamW or torch AdamW) is
flattened into named tensors plus a JSON tree that says where each one goes. A state is written into a
temporary directory and renamed into place (:func:`cogen.core.atomic.write_dir_atomic`), so a SIGKILL at
any moment leaves the previous complete state.

Resuming (:func:`restore`): a state is loaded only into the base it was trained on (same generation and
base identity: the manifest's sha256 of a published base, else the model's name). If the node's group is
ahead of it (the group's outer step, learned when joining, is larger), the group's weights win and the
node keeps only its own optimizer state, counters and data position; otherwise the saved weights,
anchor and momentum come back exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from cogen.protocols.manifest import MANIFEST_FILE
from cogen.protocols.version import software_version

logger = logging.getLogger(__name__)

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


def base_identity(model_path: str, model_name: str) -> str:
    """A base's identity: its manifest's sha256 when it is a published generation, else its name."""
    manifest = Path(model_path) / MANIFEST_FILE
    return f"sha256:{sha256_file(manifest)}" if manifest.is_file() else model_name


def data_fingerprint(
    corpus: str, block_size: int, batch_size: int, seed: int, validation_fraction: float
) -> str:
    return json.dumps([corpus, block_size, batch_size, seed, validation_fraction])


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


def _generation_dir(out_dir: Path, generation: int) -> Path:
    return Path(out_dir) / "state" / f"gen-{generation:06d}"


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
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
    root = _generation_dir(out_dir, meta.generation)
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


def find_state(out_dir: Path, expert: str, generation: int, base: str) -> SavedState | None:
    """The latest saved state this node can resume on ``base`` (generation ``generation``), else ``None``.

    Says in one log line why a state that exists is not used: another expert, another base of the same
    generation, a corrupt file; and that states of other generations are kept for when it moves there."""
    others = sorted(
        p.parent.name
        for p in (Path(out_dir) / "state").glob("gen-*/latest")
        if p.parent.name != f"gen-{generation:06d}"
    )
    if others:
        logger.info(
            "saved training state of %s is kept, not loaded into generation %d's base",
            ", ".join(others),
            generation,
        )
    link = _generation_dir(out_dir, generation) / "latest"
    if not link.exists():
        return None
    try:
        saved = read_state(link.resolve())
    except CheckpointError as e:
        logger.warning("not resuming from %s: %s", link.resolve(), e)
        return None
    why = None
    if saved.meta.expert != expert:
        why = f"it is expert {saved.meta.expert!r}'s, this node trains {expert!r}"
    elif saved.meta.base != base:
        why = f"it was trained on base {saved.meta.base[:80]}, this node runs {base[:80]}"
    if why is not None:
        logger.warning("not resuming from %s: %s", saved.path, why)
        return None
    return saved


def restore(
    saved: SavedState,
    model: torch.nn.Module,
    trainer: ExpertTrainer,
    group: GroupAverager | None,
    group_loaded: bool,
    restore_counters: bool = True,
) -> str:
    """Put a saved state back into a freshly built node; returns a one-line description of what came back.

    ``group_loaded``: the node has just loaded its group's state (``GroupAverager.join``); if the group is
    ahead of the saved outer step, its weights are kept. ``restore_counters`` also puts back the trainer's
    counters (at start; a node moving to a new base mid-run keeps its live ones). Raises ``ValueError``
    when the state does not fit the model."""
    meta, tensors = saved.meta, saved.tensors
    params = trainable(model)
    names = {k.removeprefix("weights.") for k in tensors if k.startswith("weights.")}
    if names != set(params):
        raise ValueError("its adapter has other parameters than this model's (another LoRA config?)")
    for name, p in params.items():
        if tensors[f"weights.{name}"].shape != p.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensors[f'weights.{name}'].shape)}, not {tuple(p.shape)}"
            )
    n = len(group.anchor) if group is not None else 0
    if group is not None and (f"anchor.{n - 1}" not in tensors or f"anchor.{n}" in tensors):
        raise ValueError("its group state does not fit this model (saved by a solo node?)")
    trainer.optimizer.load_state_dict(unflatten(meta.optimizer, tensors))
    trainer.scheduler.load_state_dict(meta.scheduler)
    if restore_counters:
        trainer.steps, trainer.samples, trainer.tokens = meta.steps, meta.samples, meta.tokens
        trainer.skipped = meta.skipped
    ahead = group is not None and group_loaded and group.outer_step > (meta.outer_step or 0)
    if group is not None and ahead:
        group.restore(group.anchor_state(), group.momentum_state(), group.outer_step, trainer.samples)
        return (
            f"the group is ahead (outer step {group.outer_step} > saved {meta.outer_step}): weights from the "
            f"group, optimizer state and data position from {saved.path}"
        )
    if group is not None:
        group.restore(
            [tensors[f"anchor.{i}"] for i in range(n)], [tensors[f"momentum.{i}"] for i in range(n)],
            meta.outer_step or 0, meta.samples_at_anchor if restore_counters else trainer.samples,
        )  # fmt: skip
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"weights.{name}"].to(p.device, p.dtype))
    return (
        f"from {saved.path}: outer step {meta.outer_step}, inner step {meta.steps}, weights {digest(tensors)}"
    )


def batches_to_skip(saved: SavedState | None, shard: int, num_shards: int, data: str) -> int:
    """How many batches of the shard's stream the saved state trained on, if the stream is the same one."""
    if saved is None:
        return 0
    meta = saved.meta
    if (meta.shard, meta.num_shards, meta.data) != (shard, num_shards, data):
        logger.info(
            "data position not restored: the saved state read shard %d/%d (%s), this node reads %d/%d (%s)",
            meta.shard, meta.num_shards, meta.data, shard, num_shards, data,
        )  # fmt: skip
        return 0
    return meta.batches_consumed


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short sha256 of a state's adapter weights (in name order), to tell in a log line what was loaded."""
    h = hashlib.sha256()
    for name in sorted(k for k in tensors if k.startswith("weights.")):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
