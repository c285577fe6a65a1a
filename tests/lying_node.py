"""A hostile volunteer for ``test_claims.py``: ``cogen-node`` as it is, except that the prequential
claims it signs into its progress records are forged (every window loss times ``COGEN_TEST_LIE``), so
that it would rank first. ``python -m lying_node`` with the node's flags (``tests/`` on PYTHONPATH)."""

from __future__ import annotations

import os
import sys
from typing import Any

from cogen.node import cli
from cogen.node.prequential import PrequentialTracker
from cogen.protocols.prequential import LossRun, Prequential

FACTOR = float(os.environ.get("COGEN_TEST_LIE", "0.3"))
honest_snapshot = PrequentialTracker.snapshot


def forged_snapshot(self: PrequentialTracker, *args: Any, **kwargs: Any) -> Prequential | None:
    claim = honest_snapshot(self, *args, **kwargs)
    if claim is None:
        return None
    window = LossRun(
        start=claim.window.start, rows=[[r * FACTOR for r in rows] for rows in claim.window.rows]
    )
    return claim.model_copy(update={"window": window})


PrequentialTracker.snapshot = forged_snapshot  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
