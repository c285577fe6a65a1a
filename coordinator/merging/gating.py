"""The publishing gate applied: candidate bases are judged against their parent, the first that passes wins.

:func:`gated_merge` merges the experts into the parent with the ranking's weights and judges the result
on every evaluated domain and on the general text no expert trains on (:func:`.gate.judge`: paired
block bootstrap). When the candidate is worse somewhere, it tries again, within ``attempts`` candidates
and ``budget_s`` seconds:

1. without the expert most harmful on the domains it failed (the expert's own loss there against the
   parent's, from the audit's matrix or measured on those domains alone);
2. with the merged delta halved (a candidate between parent and merge).

The first candidate that passes is the one published; its :class:`GateReport` lists every attempt and
goes into the signed manifest. When none passes, the parent's weights are restored and
:class:`GateRefused` carries the report: nothing is published, the parent stays the base.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from cogen.coordinator.merging.apply import merge_into, untie_output
from cogen.coordinator.merging.evaluate import block_losses
from cogen.coordinator.merging.experts import Expert
from cogen.coordinator.merging.gate import GateDecision, judge
from cogen.coordinator.merging.registry import MergeError, MergeMethod
from cogen.core.checkpoint import load_adapter
from cogen.protocols.gate import GateAttempt, GateDomain, GateReport

logger = logging.getLogger(__name__)

__all__ = ["Candidate", "GateOptions", "GateRefused", "gated_merge"]


@dataclass(frozen=True)
class GateOptions:
    attempts: int = 3
    level: float = 0.9
    bootstrap: int = 200
    seed: int = 0
    budget_s: float = 900.0


@dataclass(frozen=True)
class Candidate:
    weights: dict[str, float]  #: expert label -> weight (0: left out)
    scale: float = 1.0
    why: str = "the ranking's weights"
    left_out: tuple[str, ...] = field(default=())


class GateRefused(MergeError):
    """No candidate passed the gate: the parent stays the base (``report`` says why)."""

    def __init__(self, report: GateReport):
        super().__init__(f"the gate kept the parent: {report.reason}")
        self.report = report


#: harm(expert label, failing domains) -> how much worse than the parent the expert alone is there
Harm = Callable[[str, list[str]], float]
#: build(candidate) -> None: the candidate's base built into the (restored) parent model, in place
Build = Callable[[Candidate], None]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _domains(decision: GateDecision, general: set[str]) -> list[GateDomain]:
    out = []
    for v in decision.domains:
        finite = all(math.isfinite(x) for x in v.interval)
        out.append(GateDomain(
            domain=v.domain, general=v.domain in general, parent_loss=v.parent_loss,
            candidate_loss=_finite(v.candidate_loss), change=_finite(v.change),
            interval=v.interval if finite else None, worse=v.worse,
        ))  # fmt: skip
    return out


def _next(candidate: Candidate, worse: list[str], harm: Harm) -> list[Candidate]:
    """What to try after ``candidate`` failed on ``worse``: drop the most harmful expert, then halve."""
    out = []
    kept = [label for label, w in candidate.weights.items() if w > 0]
    if len(kept) >= 2:
        worst = max(kept, key=lambda label: harm(label, worse))
        weights = {**candidate.weights, worst: 0.0}
        out.append(Candidate(weights, candidate.scale, f"without {worst}, the most harmful on "
                             f"{', '.join(worse)}", (*candidate.left_out, worst)))  # fmt: skip
    if candidate.scale == 1.0:
        out.append(replace(candidate, scale=0.5, why=f"{candidate.why}, the merged delta halved"))
    return out


def _restore(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for module, weight in saved.items():
            model.get_parameter(f"{module}.weight").copy_(weight)


def gated_merge(
    model: nn.Module, experts: list[Expert], weights: Mapping[str, float], method: MergeMethod,
    parent: Mapping[str, list[float]], blocks: Mapping[str, torch.Tensor], general: set[str],
    generation: int, options: GateOptions, matrix_harm: Harm | None = None, build: Build | None = None,
) -> tuple[Candidate, GateReport]:  # fmt: skip
    """Merge into ``model`` (the parent) the first candidate that passes the gate (see the module).

    ``parent``: the parent's per-block losses on every domain of ``blocks``; ``matrix_harm``: the
    experts' harm from a full evaluation, when there was one; ``build``: how a candidate is made (default:
    ``method``'s weight merge; fusion trains one). Raises :class:`GateRefused`."""
    by_label = {e.label: e for e in experts}
    modules = experts[0].modules
    untie_output(model, modules)
    saved = {m: model.get_parameter(f"{m}.weight").detach().clone() for m in modules}
    started = time.monotonic()
    n_blocks = min(int(b.shape[0]) for b in blocks.values())

    def measured_harm(label: str, domains: list[str]) -> float:
        _restore(model, saved)
        adapted = load_adapter(model, by_label[label].path)
        mine = block_losses(adapted, {d: blocks[d] for d in domains})
        adapted.unload()
        return math.fsum(math.fsum(mine[d]) / len(mine[d]) - math.fsum(parent[d]) / len(parent[d])
                         for d in domains)  # fmt: skip

    harm = matrix_harm or measured_harm
    attempts: list[GateAttempt] = []
    queue = [Candidate(dict(weights))]
    while queue and len(attempts) < options.attempts:
        candidate = queue.pop(0)
        _restore(model, saved)
        if build is not None:
            build(candidate)
        else:
            kept = [(by_label[label], w) for label, w in candidate.weights.items() if w > 0]
            merge_into(model, [e for e, _ in kept], [w for _, w in kept], method, scale=candidate.scale)
        decision = judge(parent, block_losses(model, dict(blocks)), bootstrap=options.bootstrap,
                         level=options.level, seed=options.seed)  # fmt: skip
        attempts.append(GateAttempt(
            weights=candidate.weights, scale=candidate.scale, why=candidate.why[:300],
            domains=_domains(decision, general), passed=decision.passed, reason=decision.reason()[:2000],
        ))  # fmt: skip
        logger.info("gate, generation %d, candidate %d (%s): %s", generation, len(attempts),
                    candidate.why, decision.reason())  # fmt: skip
        if decision.passed:
            return candidate, _report(generation, True, attempts, options, started, candidate.why, n_blocks)
        if time.monotonic() - started > options.budget_s:
            break
        queue.extend(_next(candidate, decision.worse, harm))
    _restore(model, saved)
    report = _report(generation, False, attempts, options, started, attempts[-1].reason, n_blocks)
    raise GateRefused(report)


def _report(
    generation: int, passed: bool, attempts: list[GateAttempt], options: GateOptions, started: float,
    what: str, blocks: int,
) -> GateReport:  # fmt: skip
    reason = (f"published {what} after {len(attempts)} candidate(s)" if passed
              else f"none of {len(attempts)} candidate(s) passed; the last: {what}")  # fmt: skip
    return GateReport(
        generation=generation, passed=passed, attempts=attempts, level=options.level,
        bootstrap=options.bootstrap, seed=options.seed, blocks_per_domain=blocks,
        seconds=time.monotonic() - started, reason=reason[:2000],
    )  # fmt: skip
