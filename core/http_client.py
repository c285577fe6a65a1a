"""Fetching a URL a peer announced: plain http, no redirects, bounded in time and size.

Every URL on the DHT comes from a peer that may be hostile, so no fetch of one may be steered elsewhere
or run without bounds. :func:`open_url` opens a ``http://`` URL with a socket timeout (a peer that sends
nothing) and without following redirects (a 3xx is an error: a peer's URL must not lead to another
host, such as one on the operator's internal network); :func:`read_bounded` reads at most ``max_bytes``
before a deadline (a peer that trickles, or sends without end). Downloads of bases bound each file by
its signed size instead (:mod:`cogen.node.fetch`) but open it here.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from typing import IO, Any

_CHUNK = 64 * 1024


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Message, newurl: str
    ) -> Any:
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect())


class BodyTooLarge(ValueError):
    """A response longer than its bound (one line)."""


def open_url(url: str | urllib.request.Request, timeout_s: float) -> http.client.HTTPResponse:
    """Open a plain ``http://`` URL (or a request for one, with its headers), redirects refused; raises
    ``ValueError`` for another scheme, and what ``urllib`` raises on failure (``URLError``/``HTTPError``,
    both ``OSError``; ``http.client`` errors)."""
    full = url.full_url if isinstance(url, urllib.request.Request) else url
    if urllib.parse.urlsplit(full).scheme != "http":
        raise ValueError(f"not an http URL: {full!r}")
    response = _OPENER.open(url, timeout=timeout_s)
    assert isinstance(response, http.client.HTTPResponse)
    return response


def read_bounded(response: http.client.HTTPResponse, max_bytes: int, deadline_s: float) -> bytes:
    """The body of ``response``: :class:`BodyTooLarge` past ``max_bytes`` (read no further than one byte
    more), ``TimeoutError`` once ``deadline_s`` have passed (each read also waits no longer than the
    socket timeout)."""
    deadline = time.monotonic() + deadline_s
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise BodyTooLarge(f"the body is {length} bytes, more than {max_bytes}")
    chunks: list[bytes] = []
    received = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the body took longer than {deadline_s:.1f} s ({received} bytes read)")
        block = response.read1(min(_CHUNK, max_bytes + 1 - received))
        if not block:
            return b"".join(chunks)
        received += len(block)
        if received > max_bytes:
            raise BodyTooLarge(f"the body is more than {max_bytes} bytes")
        chunks.append(block)


def fetch_bounded(url: str, timeout_s: float, max_bytes: int, deadline_s: float) -> bytes:
    """:func:`open_url` then :func:`read_bounded`, the connection closed whatever happens."""
    with open_url(url, timeout_s) as response:
        return read_bounded(response, max_bytes, deadline_s)
