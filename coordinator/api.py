"""The coordinator's HTTP API (FastAPI, with its OpenAPI description at ``/openapi.json``)."""

from __future__ import annotations

from fastapi import FastAPI

from cogen.coordinator.view import SwarmMonitor, SwarmSnapshot
from cogen.protocols import software_version


def create_app(monitor: SwarmMonitor) -> FastAPI:
    app = FastAPI(
        title="cogen coordinator",
        version=software_version(),
        description="Live view of a cogen swarm, read from its DHT.",
    )

    @app.get(
        "/api/swarm", response_model=SwarmSnapshot, summary="The swarm: peers, their experts and progress"
    )
    def swarm() -> SwarmSnapshot:
        return monitor.snapshot()

    @app.get("/healthz", summary="Liveness: the DHT monitor is polling")
    def healthz() -> dict[str, object]:
        return {"ok": monitor.is_running(), "polls": monitor.polls}

    return app
