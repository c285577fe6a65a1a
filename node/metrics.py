"""A node's own Prometheus metrics, served at ``http://HOST:PORT/metrics`` when ``--metrics-port`` is set.

:class:`NodeMetrics` keeps its own ``CollectorRegistry`` (never the global one), so several can live
in one process (tests). The coordinator scrapes the ``cogen_node_*`` families of every node that
announces its metrics URL and re-exposes them with ``peer`` and ``expert`` labels.
"""

from __future__ import annotations

import math
import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

NODE_STATES = ("joining", "training", "averaging", "stopping")


class NodeMetrics:
    """``start(host, port)`` / ``stop()`` / ``is_running()``; ``observe_step`` after every inner step."""

    def __init__(self, expert: str = ""):
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
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve ``/metrics`` in a background thread; returns its URL (port 0 picks a free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        url = self.url
        assert url is not None
        return url

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_address[1])

    @property
    def url(self) -> str | None:
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{host}:{port}/metrics"

    def observe_step(self, loss: float, samples: int, tokens: int, seconds: float) -> None:
        """Record one inner step (a NaN loss is counted, and the loss gauge shows NaN)."""
        self.steps.inc()
        self.samples.inc(samples)
        self.tokens.inc(tokens)
        self.loss.set(loss)
        if math.isnan(loss):
            self.nan_steps.inc()
        if seconds > 0:
            self.step_seconds.observe(seconds)
            self.samples_per_second.set(samples / seconds)

    def set_state(self, state: str) -> None:
        """One of :data:`NODE_STATES`."""
        if state not in NODE_STATES:
            raise ValueError(f"unknown node state {state!r}; known: {', '.join(NODE_STATES)}")
        self.state.state(state)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> NodeMetrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
