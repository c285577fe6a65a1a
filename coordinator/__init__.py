"""The coordinator: watches the swarm and serves its dashboard (ranking and merging come next).

- ``service.py``   — :class:`Coordinator`: DHT peer (or read-only observer), swarm announcement, API server
- ``view.py``      — :class:`SwarmMonitor`: live view of peers, groups and alerts from DHT records
- ``history.py``   — :class:`History`: loss points and averaging rounds in a bounded SQLite file
- ``alerts.py``    — pure alert rules (stale peer, NaN or rising loss, failed round, version mismatch)
- ``schemas.py``   — API models for groups, averaging rounds and generations
- ``api.py``       — the FastAPI app (``/api/*``, ``/metrics``, OpenAPI at ``/openapi.json``)
- ``metrics.py``   — Prometheus collector of the swarm and scraper of nodes' own ``/metrics``
- ``dashboard.py`` — the page (``static/``) and plotly.js from the installed ``plotly`` package
- ``cli.py``       — the ``cogen-coordinator`` and ``cogen dashboard`` commands
"""

from cogen.coordinator.history import History
from cogen.coordinator.service import ApiServer, Coordinator
from cogen.coordinator.view import PeerSummary, SwarmMonitor, SwarmSnapshot, SwarmView

__all__ = ["ApiServer", "Coordinator", "History", "PeerSummary", "SwarmMonitor", "SwarmSnapshot", "SwarmView"]
