"""Resuming a node from its saved training state (:mod:`cogen.node.training_state`) after a restart.

Which state (:func:`find_state`): a state is loaded only into the base it was trained on (same
generation and base identity, :func:`base_identity`: the manifest's sha256 of a published base, else
the model's name) and by the same expert; any other is kept and named in a log line.

How it comes back (:func:`restore`): if the node's group is ahead of it (the group's outer step,
learned when joining, is larger), the group's weights win and the node keeps only its own optimizer
state, counters and data position; otherwise the saved weights, anchor and momentum come back exactly.
The data position (:func:`batches_to_skip`) comes back only when the node reads the same stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from cogen.core.checkpoint import CheckpointError
from cogen.node.group import GroupAverager
from cogen.node.trainer import ExpertTrainer
from cogen.node.training_state import SavedState, generation_dir, read_state, trainable, unflatten
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import MANIFEST_FILE

logger = logging.getLogger(__name__)


def base_identity(model_path: str, model_name: str) -> str:
    """A base's identity: its manifest's sha256 when it is a published generation, else its name."""
    manifest = Path(model_path) / MANIFEST_FILE
    return f"sha256:{sha256_file(manifest)}" if manifest.is_file() else model_name


def data_fingerprint(
    corpus: str, block_size: int, batch_size: int, seed: int, validation_fraction: float
) -> str:
    """What a shard's stream depends on besides the shard: a saved data position fits only the same."""
    return json.dumps([corpus, block_size, batch_size, seed, validation_fraction])


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
    link = generation_dir(out_dir, generation) / "latest"
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
