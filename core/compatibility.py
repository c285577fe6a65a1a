"""Whether the swarm's coordinator speaks this cogen's protocol, asked before a peer joins in.

A record of another protocol version may not parse under this one's schemas, so the announcement is
read raw; with a trusted manifest key only the coordinator that key vouches for is believed.
"""

from __future__ import annotations

from cogen.core.swarm import SwarmClient
from cogen.protocols import SwarmInfo
from cogen.protocols.keys import swarm_key
from cogen.protocols.manifest import signs_owner
from cogen.protocols.version import PROTOCOL_VERSION, IncompatibleProtocolError


def check_compatible(client: SwarmClient, trusted_key: str | None = None) -> None:
    """Raise :class:`IncompatibleProtocolError` if the swarm's coordinator speaks another protocol.

    With ``trusted_key`` (the manifest key a node was given or pinned), only an announcement that key
    vouches for counts (its ``owner_signature`` over the record's owner, read from the raw record, since
    a record of another protocol may not parse): any other peer could announce a version to keep new
    nodes out. Without one (a node's first contact) every announcement counts."""
    found = client.dht.get(swarm_key(client.cfg.swarm, SwarmInfo.KIND), latest=True)
    if found is None or not isinstance(found.value, dict):
        return
    for owner, item in found.value.items():
        payload = item.value
        if not isinstance(payload, dict):
            continue
        signature = payload.get("owner_signature")
        if trusted_key is not None and not (
            isinstance(owner, bytes)
            and isinstance(signature, str)
            and signs_owner(trusted_key, signature, client.cfg.swarm, owner)
        ):
            continue
        theirs = payload.get("protocol_version")
        if isinstance(theirs, int) and theirs != PROTOCOL_VERSION:
            software = payload.get("software_version", "?")
            raise IncompatibleProtocolError(
                theirs, f"swarm {client.cfg.swarm!r} (coordinator on cogen {software})"
            )
