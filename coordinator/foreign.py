"""Foreign experts: nodes on another model than the swarm's base, collected as teachers for ``fuse``.

A node started on another model (:mod:`cogen.node.foreign`) trains in a group of its own and announces
its model's fingerprint, architecture and tokenizer hash. When a generation ends and the merge method is
``fuse``, the coordinator also collects each foreign group (by its :func:`foreign_group_prefix`), on
the model the nodes name, which it must have itself with the same fingerprint (a built-in model, or a
directory at the same path): a foreign expert it cannot load is left out and said so. The collected
checkpoints (of at most :data:`MAX_FOREIGN_GROUPS` groups, the most populous: any peer can announce
one) become fusion sources (:func:`cogen.coordinator.merging.fusion.teachers.load_source`), and
the signed manifest names each one's architecture, tokenizer and weights hashes and its share of the
fused targets. Any other merge method cannot use them, which is logged once per generation.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cogen.coordinator.collect import CollectError, download_state, save_state
from cogen.core import models
from cogen.core.model_identity import model_identity
from cogen.core.swarm import SwarmClient
from cogen.protocols import NodeInfo
from cogen.protocols.keys import foreign_group_prefix

logger = logging.getLogger(__name__)

MAX_FOREIGN_GROUPS = 8  #: foreign expert groups collected per generation at most

__all__ = ["ForeignGroup", "collect_foreign", "foreign_groups", "is_foreign"]


def is_foreign(node: NodeInfo, model_sha256: str | None) -> bool:
    """Whether ``node`` trains on another model than the swarm's base ``model_sha256``."""
    return node.model_sha256 is not None and model_sha256 is not None and node.model_sha256 != model_sha256


@dataclass(frozen=True)
class ForeignGroup:
    expert: str
    model_sha256: str
    model: str  #: the model name its nodes announce (most of them)
    members: int


def foreign_groups(client: SwarmClient, model_sha256: str | None) -> list[ForeignGroup]:
    """The foreign expert groups with a node announcing itself (not stopping), by expert and model."""
    names: dict[tuple[str, str], Counter[str]] = {}
    for entry in client.fetch(NodeInfo):
        r = entry.record
        if is_foreign(r, model_sha256) and r.state != "stopping" and r.model_sha256 is not None:
            names.setdefault((r.expert, r.model_sha256), Counter())[r.model] += 1
    groups = [
        ForeignGroup(expert, sha, count.most_common(1)[0][0], sum(count.values()))
        for (expert, sha), count in sorted(names.items())
    ]
    if len(groups) > MAX_FOREIGN_GROUPS:  # any peer can announce groups: the most populous are collected
        logger.warning("%d foreign expert groups announced; collecting the %d with the most nodes",
                       len(groups), MAX_FOREIGN_GROUPS)  # fmt: skip
        groups = sorted(groups, key=lambda g: -g.members)[:MAX_FOREIGN_GROUPS]
    return groups


@functools.lru_cache(maxsize=32)
def _fingerprint(path: str, mtime_ns: int) -> str | None:
    return model_identity(path).model_sha256


def _local_model(group: ForeignGroup, cache_dir: Path | None) -> str:
    try:
        path = models.resolve_model(group.model, cache_dir)
    except models.ModelError as e:
        raise CollectError(f"foreign expert {group.expert!r} is on {group.model}: {e}") from None
    config = Path(path) / "config.json"  # a model directory is hashed once, not once per announcement
    found = _fingerprint(path, config.stat().st_mtime_ns) if config.is_file() else None
    if found != group.model_sha256:
        raise CollectError(
            f"foreign expert {group.expert!r} is on {group.model}, whose copy here is another model "
            f"(fingerprint {str(found)[:12]}, not {group.model_sha256[:12]}): left out"
        )
    return group.model


def collect_foreign(
    client: SwarmClient, groups: list[ForeignGroup], out_dir: Path, timeout_s: float, cache_dir: Path | None
) -> list[tuple[str, Path]]:
    """Each foreign group's expert and its state as an expert checkpoint on its own model, under
    ``out_dir``; a group that cannot be collected is logged and left out."""
    paths = []
    for group in groups:
        try:
            model = _local_model(group, cache_dir)
            prefix = foreign_group_prefix(client.cfg.swarm, group.expert, group.model_sha256)
            info, tensors = download_state(client, group.expert, 0, timeout_s, group=prefix)
            saved = save_state(info, tensors, model, out_dir / f"foreign-{group.model_sha256[:16]}")
            paths.append((group.expert, saved))
            logger.info(
                "collected foreign expert %r on %s (outer step %d)", group.expert, model, info.outer_step
            )
        except Exception as e:  # one group's failure must not stop the rest
            logger.warning("could not collect foreign expert %r: %s", group.expert, e)
    return paths
