"""Per-expert merge weights from an evaluation matrix, and the per-domain ranking.

The rule (:func:`ranking_weights`): an expert's weight is the sum, over the evaluated domains, of its
relative improvement on the base, counting only the domains where it is better::

    w(e) = Σ_d max(0, (base_loss[d] − loss[e, d]) / base_loss[d])

So an expert that is no better than the base on any domain (or whose loss is not finite) gets weight
0 and is left out of the merge; a specialist that halves the loss on its own domain and is a little
worse elsewhere keeps a large weight (the merge methods decide how deltas interfere, the weight only
says how much each expert is worth). Weights are relative: the methods rescale them.

With a bootstrapped :class:`~cogen.protocols.ranking.Ranking`, :func:`confident_weights` applies the same
rule to the improvement the evaluation is sure of: the lower end of each improvement's bootstrap
interval (the 5 % quantile at level 0.9) instead of its point estimate::

    w(e) = Σ_d max(0, low_d(e))

An "improvement" smaller than the noise of a small or noisy validation set then counts 0 instead of
its full value, and, as before, each domain adds at most 1, so no single domain dominates. The overall
Borda points or Bradley–Terry strengths are *not* used as weights on purpose: they say how an expert
compares with the other experts across all domains, so a specialist that halves the loss on its own
domain and is a little worse elsewhere ranks low there, yet it is what a merge should keep.

:func:`format_matrix` and :func:`format_ranking` render the matrix and the ranking for the CLI.
"""

from __future__ import annotations

import math

from cogen.protocols.manifest import EvalMatrix
from cogen.protocols.ranking import Ranking


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def ranking_weights(matrix: EvalMatrix) -> dict[str, float]:
    """Each expert's weight by the rule in this module's docstring (0: left out)."""
    weights: dict[str, float] = {}
    for expert, losses in matrix.experts.items():
        total = 0.0
        for domain in matrix.domains:
            base, loss = matrix.base.get(domain), losses.get(domain)
            if base is None or loss is None or not (math.isfinite(base) and math.isfinite(loss)):
                continue
            if base > 0 and loss < base:
                total += (base - loss) / base
        weights[expert] = total
    return weights


def ranking(matrix: EvalMatrix) -> dict[str, list[str]]:
    """Per domain, the experts from lowest to highest loss (experts without a finite loss last)."""
    return {
        domain: sorted(
            matrix.experts,
            key=lambda e: (not _finite(matrix.experts[e].get(domain)), matrix.experts[e].get(domain) or 0.0),
        )
        for domain in matrix.domains
    }


def format_matrix(matrix: EvalMatrix) -> str:
    """The matrix as a table: one row per model (base, experts, merge), one column per domain."""
    width = max(12, *(len(d) + 2 for d in matrix.domains))
    name_width = max([10, *(len(e) + 2 for e in matrix.experts)])  # no expert rows off an audit
    rows: list[tuple[str, dict[str, float | None]]] = [("base", matrix.base), *matrix.experts.items()]
    if matrix.merged is not None:
        rows.append(("merged", matrix.merged))
    head = f"{'model':<{name_width}}" + "".join(f"{d:>{width}}" for d in matrix.domains)
    lines = ["validation loss (nats/token) per domain", head, "-" * len(head)]
    for name, losses in rows:
        cells = "".join(
            f"{losses[d]:>{width}.4f}" if _finite(losses.get(d)) else f"{'n/a':>{width}}"
            for d in matrix.domains
        )
        lines.append(f"{name:<{name_width}}{cells}")
    return "\n".join(lines)


def confident_weights(ranking: Ranking) -> dict[str, float]:
    """Each expert's weight by the confident rule in this module's docstring (0: left out).

    Without bootstrap figures (``ranking.bootstrap == 0``) the point improvement is used, which is
    :func:`ranking_weights`'s rule.
    """
    weights = {s.expert: 0.0 for s in ranking.overall}
    for domain in ranking.domains:
        for entry in ranking.per_domain[domain].experts:
            interval = entry.improvement_interval
            sure = interval[0] if interval is not None else entry.improvement
            if ranking.bootstrap and interval is None:
                sure = None  # a resample was not finite: nothing is sure
            if sure is not None and sure > 0:
                weights[entry.expert] += sure
    return weights


def _pair(values: tuple[float, float] | None, fmt: str) -> str:
    return f"[{values[0]:{fmt}}, {values[1]:{fmt}}]" if values is not None else "-"


def format_ranking(ranking: Ranking) -> str:
    """The ranking as a short table: overall standings, then one line per domain and the cheap order."""
    cheap_rank = {c.expert: c.rank for c in ranking.cheap.experts} if ranking.cheap else {}
    width = max(10, *(len(s.expert) + 2 for s in ranking.overall))
    level = f"{ranking.level:.0%}"
    lines = [
        f"overall ranking over {len(ranking.domains)} domains (Bradley–Terry, then Borda; "
        f"{ranking.bootstrap} bootstrap resamples, {level} intervals)",
        f"{'rank':>4}  {'expert':<{width}}{'borda':>7}{'strength':>10}  {'strength ' + level:<18}"
        f"{'holds rank':>10}{'rank ' + level:>10}{'cheap':>7}",
    ]
    lines.append("-" * len(lines[-1]))
    for s in ranking.overall:
        confidence = f"{s.rank_confidence:.2f}" if s.rank_confidence is not None else "-"
        ranks = f"{s.rank_interval[0]}-{s.rank_interval[1]}" if s.rank_interval is not None else "-"
        lines.append(
            f"{s.rank:>4}  {s.expert:<{width}}{s.borda:>7.1f}{s.strength:>10.3f}  "
            f"{_pair(s.strength_interval, '.2f'):<18}{confidence:>10}{ranks:>10}"
            f"{cheap_rank.get(s.expert, '-'):>7}"
        )
    lines.append("per domain, best first (relative improvement on the base):")
    for domain in ranking.domains:
        cells = [
            f"{e.expert} {e.improvement:+.1%}" if e.improvement is not None else f"{e.expert} n/a"
            for e in ranking.per_domain[domain].experts
        ]
        lines.append(f"  {domain}: {', '.join(cells)}")
    if ranking.cheap is not None:
        tau = ranking.cheap.kendall_tau
        cells = [
            f"{c.expert} {c.score:+.3f}" if c.score is not None else f"{c.expert} ({c.degenerate})"
            for c in ranking.cheap.experts
        ]
        agreement = f"Kendall tau with the full ranking {tau:+.2f}" if tau is not None else "no Kendall tau"
        lines.append(f"cheap ranking (training-loss drop): {', '.join(cells)}; {agreement}")
    return "\n".join(lines)
