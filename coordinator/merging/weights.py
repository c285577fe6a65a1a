"""Per-expert merge weights from an evaluation matrix, and the per-domain ranking.

The rule (:func:`ranking_weights`): an expert's weight is the sum, over the evaluated domains, of its
relative improvement on the base, counting only the domains where it is better::

    w(e) = Σ_d max(0, (base_loss[d] − loss[e, d]) / base_loss[d])

So an expert that is no better than the base on any domain (or whose loss is not finite) gets weight
0 and is left out of the merge; a specialist that halves the loss on its own domain and is a little
worse elsewhere keeps a large weight (the merge methods decide how deltas interfere, the weight only
says how much each expert is worth). Weights are relative: the methods rescale them.
"""

from __future__ import annotations

import math

from cogen.protocols.manifest import EvalMatrix


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
    name_width = max(10, *(len(e) + 2 for e in matrix.experts))
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
