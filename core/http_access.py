"""Checkpoint downloads over HTTP in a permissioned swarm: a member's signed credential header.

A member sends its credential and a proof of holding its key with every checkpoint request:
``X-Cogen-Credential`` (the credential, base64 JSON) and ``X-Cogen-Proof`` (``<unix time> <signature>``,
the member key's signature over the swarm, the request path and the time). With ``--checkpoint-auth``
a server (the coordinator's ``/checkpoints/``, a node's base mirror) answers 403 unless the credential
is the owner's, unexpired and unrevoked (:meth:`cogen.core.authorizer.SwarmAuthorizer.refusal`) and the
proof is fresh (a minute either way). Plain HTTP: a proof seen on the wire can be replayed for that
path within the minute, which grants no more than what the same wire already shows.

The process's :class:`~cogen.core.swarm.SwarmClient` registers its access here (:func:`register`), so
that the fetcher (:func:`request_for`) and the servers (:func:`checkpoint_refusal`) need no new argument.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable

from hivemind.utils.crypto import RSAPublicKey
from pydantic import ValidationError

from cogen.core.access import Access
from cogen.core.authorizer import SwarmAuthorizer
from cogen.protocols import Credential

CREDENTIAL_HEADER = "X-Cogen-Credential"
PROOF_HEADER = "X-Cogen-Proof"
MAX_SKEW_S = 60.0
MAX_HEADER_CHARS = 8192
_registered: tuple[Access, SwarmAuthorizer] | None = None
_lock = threading.Lock()


def register(access: Access, authorizer: SwarmAuthorizer) -> None:
    """Sign this process's checkpoint requests with ``access``; check incoming ones if it says so."""
    global _registered
    with _lock:
        _registered = (access, authorizer)


def unregister(access: Access) -> None:
    """Stop using ``access`` (its client shut down)."""
    global _registered
    with _lock:
        if _registered is not None and _registered[0] is access:
            _registered = None


def _proof_bytes(swarm: str, path: str, at: int) -> bytes:
    return f"cogen-http\n{swarm}\n{path}\n{at}".encode()


def credential_headers(access: Access, path: str, now: float | None = None) -> dict[str, str]:
    at = int(time.time() if now is None else now)
    signature = access.member_key.sign(_proof_bytes(access.swarm, path, at)).decode()
    credential = base64.b64encode(access.credential.model_dump_json().encode()).decode()
    return {CREDENTIAL_HEADER: credential, PROOF_HEADER: f"{at} {signature}"}


def request_for(url: str) -> urllib.request.Request:
    """A request for ``url`` that carries this process's credential headers (none in an open swarm)."""
    with _lock:
        registered = _registered
    if registered is None:
        return urllib.request.Request(url)
    path = urllib.parse.urlsplit(url).path or "/"
    return urllib.request.Request(url, headers=credential_headers(registered[0], path))


def header_refusal(
    headers: Iterable[tuple[str, str]], path: str, authorizer: SwarmAuthorizer, now: float | None = None
) -> str | None:
    """Why the request with ``headers`` (name, value pairs) for ``path`` may not download a checkpoint."""
    found = {name.lower(): value for name, value in headers}
    raw, proof = found.get(CREDENTIAL_HEADER.lower(), ""), found.get(PROOF_HEADER.lower(), "")
    if not raw or not proof:
        return authorizer.refusal(None, "checkpoint download")
    if len(raw) > MAX_HEADER_CHARS or len(proof) > MAX_HEADER_CHARS:
        return "the credential header is too long"
    try:
        credential = Credential.model_validate_json(base64.b64decode(raw, validate=True), strict=True)
    except (ValidationError, binascii.Error, ValueError):
        return "the credential header is not a credential"
    reason = authorizer.refusal(credential, "checkpoint download")
    if reason is not None:
        return reason
    at, _, signature = proof.partition(" ")
    now = time.time() if now is None else now
    if not at.isdigit() or abs(int(at) - now) > MAX_SKEW_S:
        return "the proof is stale (or the clocks differ by more than a minute)"
    key = RSAPublicKey.from_bytes(credential.member_key.encode())
    if not key.verify(_proof_bytes(authorizer.access.swarm, path, int(at)), signature.encode()):
        authorizer.log_refusal(f"checkpoint download: credential {credential.serial} without its key")
        return "the proof is not signed by the credential's key"
    return None


def checkpoint_refusal(headers: Iterable[tuple[str, str]], path: str) -> str | None:
    """For a checkpoint server: why this request is refused (403), or None. Only with
    ``--checkpoint-auth`` in a permissioned swarm; ``path`` is the request's URL path."""
    with _lock:
        registered = _registered
    if registered is None or not registered[0].checkpoint_auth:
        return None
    return header_refusal(headers, urllib.parse.urlsplit(path).path or "/", registered[1])
