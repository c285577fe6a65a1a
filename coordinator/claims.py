"""The experts' prequential claims: gathered from their members' signed progress records.

At the end of a generation the coordinator keeps, for every expert it collects, each member's latest
:class:`~cogen.protocols.prequential.Prequential` on that generation (one per record owner: a
member's signature binds it to its claims; only owners whose signed ``NodeInfo`` says they train that
expert on that generation count, so a bystander cannot get an honest expert flagged with forged
claims) and writes them as :class:`~cogen.protocols.prequential.Claims` beside the collected experts,
for the merge to rank and spot-check (:mod:`cogen.coordinator.merging.prequential`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cogen.coordinator.foreign import is_foreign
from cogen.core.swarm import SwarmClient
from cogen.protocols import NodeInfo, TrainingProgress
from cogen.protocols.prequential import MAX_MEMBERS, Claims, Prequential

__all__ = ["gather_claims", "read_claims", "write_claims"]


def gather_claims(
    client: SwarmClient, experts: Iterable[str], generation: int, model_sha256: str | None = None
) -> Claims:
    """Each member's latest claim on ``generation`` for each of ``experts``, from the DHT (a node on a
    foreign model, another one than ``model_sha256``, is no member)."""
    wanted = set(experts)
    announced = {  # only a node announcing that it trains the expert on the generation speaks for it
        (entry.record.expert, entry.owner)
        for entry in client.fetch(NodeInfo)
        if isinstance(entry.record, NodeInfo)
        and entry.record.generation == generation
        and not is_foreign(entry.record, model_sha256)
    }
    latest: dict[tuple[str, bytes], tuple[float, Prequential]] = {}
    for entry in client.fetch(TrainingProgress):
        record = entry.record
        if not isinstance(record, TrainingProgress) or record.expert not in wanted:
            continue
        claim = record.prequential
        if claim is None or claim.generation != generation:
            continue
        key = (record.expert, entry.owner)
        if key not in announced:
            continue
        if key not in latest or latest[key][0] < record.time:
            latest[key] = (record.time, claim)
    found: dict[str, list[Prequential]] = {}
    for (expert, _), (_, claim) in sorted(latest.items(), key=lambda kv: -kv[1][0]):
        members = found.setdefault(expert, [])
        if len(members) < MAX_MEMBERS:
            members.append(claim)
    return Claims(generation=generation, experts=found)


def write_claims(claims: Claims, path: Path) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(claims.model_dump_json())
    tmp.replace(path)
    return path


def read_claims(path: Path) -> Claims:
    """The claims file ``path``; raises ``ValueError`` (one line) on a file that is not one."""
    try:
        return Claims.model_validate_json(path.read_bytes(), strict=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the prequential claims {path}: {str(e).splitlines()[0]}") from None
