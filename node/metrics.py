"""A node's own HTTP endpoints when ``--metrics-port`` is set: ``/metrics``, ``/healthz`` and ``/readyz``.

:class:`NodeMetrics` keeps its own ``CollectorRegistry`` (never the global one), so several can live
in one process (tests). The coordinator scrapes the ``cogen_node_*`` families of every node that
announces its metrics URL and re-exposes them with ``peer`` and ``expert`` labels. ``/healthz`` and
``/readyz`` answer 200 or 503 with a JSON body naming the failed checks (:mod:`cogen.node.health`).
One standard-library server in a background thread (:class:`cogen.core.http_service.HttpServer`) serves
all three.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
)

from cogen.core.health import Check, HealthChecks, verdict
from cogen.core.http_service import HttpServer

logger = logging.getLogger(__name__)

NODE_STATES = ("joining", "training", "averaging", "stopping")


class _Handler(BaseHTTPRequestHandler):
    def __init__(self, *args: Any, metrics: NodeMetrics, **kwargs: Any) -> None:
        self.metrics = metrics  # before the base class handles the request
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        metrics = self.metrics
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
        elif path in ("/healthz", "/readyz"):
            try:
                status, body = verdict(metrics.checks(ready=path == "/readyz"))
            except Exception as e:  # a check that raises is a failed check, never a dropped connection
                status, body = verdict([Check("checks", False, f"{type(e).__name__}: {e}"[:200])])
            self._send(status, "application/json", json.dumps(body).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics: " + format, *args)


class NodeMetrics:
    """``start(host, port)`` / ``stop()`` / ``is_running()``; ``observe_step`` after every inner step.

    ``health`` answers ``/healthz`` and ``/readyz``; without it they report only that the process serves."""

    def __init__(self, expert: str = "", health: HealthChecks | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.steps = Counter("cogen_node_steps", "Inner steps done", registry=r)
        self.samples = Counter("cogen_node_samples", "Sequences trained on", registry=r)
        self.tokens = Counter("cogen_node_tokens", "Tokens trained on", registry=r)
        self.nan_steps = Counter("cogen_node_nan_steps", "Inner steps whose loss was NaN", registry=r)
        self.loss = Gauge("cogen_node_loss", "Training loss of the last inner step", registry=r)
        self.samples_per_second = Gauge(
            "cogen_node_samples_per_second", "Samples/s of the last inner step", registry=r
        )
        self.step_seconds = Histogram(
            "cogen_node_step_seconds",
            "Wall time of one inner step",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.state = Enum("cogen_node_state", "What the node is doing", states=list(NODE_STATES), registry=r)
        self.info = Gauge("cogen_node_info", "Constant 1, labelled with the expert", ["expert"], registry=r)
        self.info.labels(expert=expert).set(1)
        self.health = health
        self.step_seconds_total = 0.0  # for the mean step time (how long one outer step takes)
        self.steps_timed = 0
        self._http: HttpServer | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve ``/metrics``, ``/healthz``, ``/readyz`` in a background thread; returns the metrics URL
        (port 0 picks a free one). Restarting a running one is refused (``RuntimeError``)."""
        if self.is_running():
            raise RuntimeError(f"node metrics are already served at {self.url}")
        self._http = HttpServer(functools.partial(_Handler, metrics=self), host, port, name="node-metrics")
        self._http.start()
        return f"{self._http.url_base}/metrics"

    def checks(self, ready: bool) -> list[Check]:
        """The checks behind ``/readyz`` (``ready``) or ``/healthz``."""
        if self.health is None:
            return [Check("process", True, "serving")]
        return self.health.ready() if ready else self.health.live()

    @property
    def mean_step_s(self) -> float | None:
        return self.step_seconds_total / self.steps_timed if self.steps_timed else None

    @property
    def port(self) -> int | None:
        return None if self._http is None else self._http.port

    @property
    def url(self) -> str | None:
        return None if self._http is None else f"{self._http.url_base}/metrics"

    def observe_step(self, loss: float, samples: int, tokens: int, seconds: float) -> None:
        """Record one inner step (a NaN loss is counted, and the loss gauge shows NaN)."""
        self.steps.inc()
        self.samples.inc(samples)
        self.tokens.inc(tokens)
        self.loss.set(loss)
        if math.isnan(loss):
            self.nan_steps.inc()
        if seconds > 0:
            self.step_seconds_total += seconds
            self.steps_timed += 1
            self.step_seconds.observe(seconds)
            self.samples_per_second.set(samples / seconds)

    def set_state(self, state: str) -> None:
        """One of :data:`NODE_STATES`."""
        if state not in NODE_STATES:
            raise ValueError(f"unknown node state {state!r}; known: {', '.join(NODE_STATES)}")
        self.state.state(state)

    def stop(self) -> None:
        if self._http is not None:
            self._http.stop(timeout_s=5)
        self._http = None

    def is_running(self) -> bool:
        return self._http is not None and self._http.is_running()

    def __enter__(self) -> NodeMetrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
