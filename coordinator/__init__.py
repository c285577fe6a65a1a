"""The coordinator: watches the swarm, serves its dashboard, and merges experts into new bases.

- ``service.py``   — :class:`Coordinator`: DHT peer (or read-only observer), swarm announcement
- ``api_server.py`` — :class:`ApiServer`: uvicorn in a thread with start/stop/is_running
- ``view.py``      — :class:`SwarmMonitor`: live view of peers, groups and alerts from DHT records
- ``peers.py``     — what the monitor keeps of each peer; the peer and group summaries it shows
- ``rounds.py``    — :class:`RoundBook`: the groups' averaging rounds, each once, with totals per expert
- ``history.py``   — :class:`History`: loss points and averaging rounds in a bounded SQLite file
- ``alerts.py``    — pure alert rules (stale peer, NaN or rising loss, failed round, version mismatch)
- ``schemas.py``   — API response models: swarm snapshot, peers, groups, averaging rounds, generations
- ``api.py``       — the FastAPI app (``/api/*``, ``/metrics``, OpenAPI at ``/openapi.json``)
- ``health.py``    — the checks behind ``/healthz`` and ``/readyz``
- ``metrics.py``   — Prometheus collector of the swarm, re-exposing nodes' own metrics
- ``scraping.py``  — :class:`NodeScraper`: nodes' ``/metrics``, only at their own address, concurrent, bounded
- ``dashboard.py`` — the page (``static/``) and plotly.js from the installed ``plotly`` package
- ``config.py``    — the coordinator's and the offline merge's config models, one per concern
- ``merge_options.py`` — how a merge is made (method, evaluation, mixture, gate, fusion), shared by both
- ``schedule.py``  — :class:`GenerationSchedule`: when a generation is due, from claims it can check
- ``collect.py``   — a group's state downloaded, checked and saved as an expert checkpoint
- ``foreign.py``   — foreign experts (nodes on another model): found, collected on their model, fused
- ``claims.py``    — the experts' prequential claims, gathered from their members' signed progress records
- ``generations.py`` — :class:`GenerationLoop`: collect each due group's expert, rank, merge, publish
- ``generation_files.py`` — what a generation leaves behind: its API summary, the gate's kept refusal
- ``merging/``     — merge methods, ranking weights, signed manifests, published generations
- ``cli.py``       — the ``cogen-coordinator`` and ``cogen dashboard`` commands
"""

from typing import TYPE_CHECKING

from cogen.core.lazy import lazy_exports

if TYPE_CHECKING:
    from cogen.coordinator.api_server import ApiServer
    from cogen.coordinator.history import History
    from cogen.coordinator.schemas import PeerSummary, SwarmSnapshot
    from cogen.coordinator.service import Coordinator
    from cogen.coordinator.view import SwarmMonitor, SwarmView

__getattr__ = lazy_exports(
    __name__,
    {
        "ApiServer": "cogen.coordinator.api_server",
        "Coordinator": "cogen.coordinator.service",
        "History": "cogen.coordinator.history",
        "PeerSummary": "cogen.coordinator.schemas",
        "SwarmSnapshot": "cogen.coordinator.schemas",
        "SwarmMonitor": "cogen.coordinator.view",
        "SwarmView": "cogen.coordinator.view",
    },
)
__all__ = ["ApiServer", "Coordinator", "History", "PeerSummary", "SwarmMonitor", "SwarmSnapshot", "SwarmView"]
