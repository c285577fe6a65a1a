"""The coordinator's HTTP API (FastAPI, OpenAPI description at ``/openapi.json``, docs at ``/docs``).

Every ``/api/*`` body is serialised once per DHT poll by the monitor (:class:`SwarmView.json`) and
served as is, so latency does not grow with requests. ``/metrics`` is Prometheus' text format;
``/`` is the dashboard page, which reads only ``/api/*``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from pathlib import Path

from fastapi import FastAPI, HTTPException, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.datastructures import Headers
from starlette.types import Scope

from cogen.coordinator.dashboard import mount_dashboard
from cogen.coordinator.metrics import make_registry
from cogen.coordinator.schemas import (
    AlertList,
    GateStatus,
    GenerationSummary,
    GroupSummary,
    PeerSummary,
    SwarmSnapshot,
)
from cogen.coordinator.view import SwarmMonitor
from cogen.core.health import Check, HealthChecks, verdict
from cogen.core.http_access import checkpoint_refusal
from cogen.protocols import software_version


def _json(body: bytes) -> Response:
    return Response(content=body, media_type="application/json", headers={"Cache-Control": "no-store"})


class PublishedFiles(StaticFiles):
    """Static files of the generation dirs named by ``served()`` only: a publish's temp dir, a rejected
    or a not-yet-verified generation is a 404, whatever lies in the directory."""

    def __init__(self, directory: Path, served: Callable[[], Collection[str]]):
        super().__init__(directory=directory)
        self._served = served

    async def get_response(self, path: str, scope: Scope) -> Response:
        if path.split(os.sep, 1)[0] not in self._served():
            raise HTTPException(status_code=404)
        if refusal := checkpoint_refusal(Headers(scope=scope).items(), scope["raw_path"].decode("latin-1")):
            raise HTTPException(status_code=403, detail=refusal)  # --checkpoint-auth
        return await super().get_response(path, scope)


def create_app(
    monitor: SwarmMonitor,
    registry: CollectorRegistry | None = None,
    observer: bool = False,
    checkpoints_dir: Path | None = None,
    served: Callable[[], Collection[str]] = frozenset,
    health: HealthChecks | None = None,
) -> FastAPI:
    """The API over ``monitor``; ``registry`` defaults to a fresh one with the swarm's collector.

    With ``checkpoints_dir``, the files of the generations named by ``served()`` (dir names) are served
    under ``/checkpoints/`` (nodes verify them against the signed manifest, so static files are enough).
    ``health`` answers ``/healthz`` and ``/readyz`` (:mod:`cogen.coordinator.health`); without it they
    check only that the monitor polls."""
    registry = registry if registry is not None else make_registry(monitor)
    app = FastAPI(
        title="cogen " + ("dashboard (observer)" if observer else "coordinator"),
        version=software_version(),
        description="Live view of a cogen swarm, read from its DHT: peers, expert groups, generations, "
        "the publishing gate, alerts. Bodies are rebuilt after every DHT poll.",
    )

    @app.get("/api/swarm", response_model=SwarmSnapshot, summary="The swarm: summary, peers and experts")
    def swarm() -> Response:
        return _json(monitor.view().json["swarm"])

    @app.get("/api/peers", response_model=list[PeerSummary], summary="Every known peer, online or stale")
    def peers() -> Response:
        return _json(monitor.view().json["peers"])

    @app.get(
        "/api/groups",
        response_model=list[GroupSummary],
        summary="Expert groups: members, outer step, last averaging round, loss curves",
    )
    def groups() -> Response:
        return _json(monitor.view().json["groups"])

    @app.get(
        "/api/generations",
        response_model=list[GenerationSummary],
        summary="Published generations: lineage, evaluation matrix, ranking, manifest (oldest first)",
    )
    def generations() -> Response:
        return _json(monitor.view().json["generations"])

    @app.get(
        "/api/gate",
        response_model=GateStatus,
        summary="The publishing gate: the newest published generation's candidates and verdicts, and a "
        "refusal since (the parent stayed the base)",
    )
    def gate() -> Response:
        return _json(monitor.view().json["gate"])

    @app.get("/api/alerts", response_model=AlertList, summary="Current alerts, most severe first")
    def alerts() -> Response:
        return _json(monitor.view().json["alerts"])

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response)
    def metrics() -> Response:
        return Response(content=generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def probe(ready: bool) -> Response:
        if health is None:
            checks = [Check("monitor", monitor.is_running(), f"{monitor.polls} polls of the swarm")]
        else:
            checks = health.ready() if ready else health.live()
        status, body = verdict(checks)
        body.update(polls=monitor.polls, observer=observer)
        return Response(json.dumps(body), status_code=status, media_type="application/json",
                        headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.get(
        "/healthz",
        summary="Liveness: the API serves, the monitor polls, the DHT answers "
        "(200, or 503 naming the failed check)",
    )
    def healthz() -> Response:
        return probe(ready=False)

    @app.get(
        "/readyz",
        summary="Readiness: alive, the swarm read, published generations read back, the swarm announced "
        "(200, or 503 naming the failed check)",
    )
    def readyz() -> Response:
        return probe(ready=True)

    if checkpoints_dir is not None:
        Path(checkpoints_dir).mkdir(parents=True, exist_ok=True)
        app.mount("/checkpoints", PublishedFiles(checkpoints_dir, served), name="checkpoints")
    mount_dashboard(app)
    return app
