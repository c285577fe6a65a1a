"""The coordinator: watches the swarm and serves its view (ranking and merging come next).

- ``service.py`` — :class:`Coordinator`: DHT peer, swarm announcement, API server
- ``view.py``    — :class:`SwarmMonitor`: live view of peers and experts from DHT records
- ``api.py``     — the FastAPI app (``/api/swarm``, OpenAPI at ``/openapi.json``)
- ``cli.py``     — the ``cogen-coordinator`` command
"""

from cogen.coordinator.service import ApiServer, Coordinator
from cogen.coordinator.view import PeerSummary, SwarmMonitor, SwarmSnapshot

__all__ = ["ApiServer", "Coordinator", "PeerSummary", "SwarmMonitor", "SwarmSnapshot"]
