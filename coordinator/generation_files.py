"""What a generation leaves behind, and how the API shows it.

- :func:`summarize`: a published generation's manifest as the API and the dashboard show it (every
  model's loss per domain against the base it started from, the rankings and their audit, the gate);
- :func:`record_refusal` / :func:`read_refusal`: the publishing gate's refusal kept beside the collected
  experts (``gate.json``), so a restarted coordinator still shows why the parent stayed the base;
- :data:`CLAIMS_FILE`: the experts' prequential claims, beside the collected experts.

Used by :class:`cogen.coordinator.generations.GenerationLoop`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cogen.coordinator.schemas import DomainScore, GenerationSummary
from cogen.core.atomic import write_json_atomic
from cogen.protocols.gate import GateReport
from cogen.protocols.manifest import Manifest

__all__ = ["CLAIMS_FILE", "GATE_FILE", "read_refusal", "record_refusal", "summarize"]

logger = logging.getLogger(__name__)

CLAIMS_FILE = "claims.json"  #: the experts' prequential claims, beside the collected experts
GATE_FILE = "gate.json"  #: why the publishing gate kept the parent, beside the collected experts


def summarize(manifest: Manifest, manifest_sha256: str) -> GenerationSummary:
    """A published generation as the API and the dashboard show it."""
    scores = []
    if manifest.evaluation is not None:
        best, base = manifest.best, manifest.evaluation.base
        for domain in manifest.evaluation.domains:
            # the base the experts started from, then each expert, the merged base and the mixture
            scores.append(DomainScore(domain=domain, expert="base", loss=base.get(domain)))
            if best is not None:  # the mixture's losses, whether it or the dense merge came out better
                scores.append(DomainScore(domain=domain, expert="mixture", loss=best.losses.get(domain)))
            order = manifest.ranking.get(domain, [])
            for expert, losses in manifest.evaluation.experts.items():
                rank = order.index(expert) + 1 if expert in order else None
                scores.append(DomainScore(domain=domain, expert=expert, loss=losses.get(domain), rank=rank))
            if manifest.evaluation.merged is not None:
                scores.append(
                    DomainScore(domain=domain, expert="merged", loss=manifest.evaluation.merged.get(domain))
                )
    weights = {e.name: e.weight for e in manifest.experts}
    ranked = manifest.rankings
    order = ranked.order if ranked is not None else sorted(weights, key=lambda e: -weights[e])
    return GenerationSummary(
        generation=manifest.generation,
        base_hash=manifest.files.get("model.safetensors", manifest_sha256),
        parent_hash=manifest.parent.manifest_sha256,
        created_at=manifest.created_at,
        manifest_hash=manifest_sha256,
        signature_ok=True,
        merge_method=manifest.method,
        ranking=order,
        kendall_tau=ranked.cheap.kendall_tau if ranked is not None and ranked.cheap is not None else None,
        scores=scores,
        gate=manifest.gate,
        **_cheap_summary(manifest),
    )


def record_refusal(out_dir: Path, report: GateReport) -> Path:
    """Keep the gate's refusal of a generation beside its collected experts (read back at a restart)."""
    path = out_dir / "collected" / f"gen-{report.generation:06d}" / GATE_FILE
    write_json_atomic(path, report.model_dump(mode="json"))
    return path


def read_refusal(out_dir: Path, generation: int) -> GateReport | None:
    """The gate's kept refusal of ``generation``, or None (none kept; a file that does not parse is
    logged and ignored: it is evidence to show, never an input to a decision)."""
    path = out_dir / "collected" / f"gen-{generation:06d}" / GATE_FILE
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > 4 << 20:
            raise ValueError(f"{path.stat().st_size} bytes, over the 4 MiB a gate report may take")
        report = GateReport.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as e:
        logger.warning("ignoring %s: %s", path, str(e).splitlines()[0])
        return None
    return report if report.generation == generation and not report.passed else None


def _cheap_summary(manifest: Manifest) -> dict[str, Any]:
    """The cheap ranking's part of a generation's summary, and its audit."""
    cheap, agreed = manifest.prequential, manifest.agreement
    out: dict[str, Any] = {"audit": manifest.rankings is not None}
    if cheap is not None:
        flagged = {e.expert: e.flagged for e in cheap.experts if e.flagged}
        out.update(cheap_ranking=[e.expert for e in cheap.experts], cheap_cost_tokens=cheap.cost_tokens,
                   flagged=flagged)  # fmt: skip
    if agreed is not None:
        out.update(audit_kendall_tau=agreed.kendall_tau, audit_top1=agreed.top1,
                   full_cost_tokens=agreed.full_cost_tokens)  # fmt: skip
    return out
