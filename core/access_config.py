"""Who may join a swarm: the access settings of a permissioned swarm (nested in ``NetworkConfig``).

Kept apart from :mod:`cogen.core.config` only for size; :mod:`cogen.core.access` reads the files these
settings name and :mod:`cogen.core.authorizer` enforces them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class AccessConfig(BaseModel):
    """Who may join: an open swarm (the default), or only peers holding a credential from its owner."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    owner_key: Path | None = Field(
        default=None,
        description="the swarm owner's public key file (cogen swarm init): set, the swarm is permissioned "
        "and only peers with a credential it signed store records, average or download state",
    )
    credential: Path | None = Field(
        default=None, description="this peer's credential file, issued by the owner (cogen swarm issue)"
    )
    credential_key: Path | None = Field(
        default=None,
        description="this peer's private key file, the one its credential names (cogen swarm key)",
    )
    revocations: Path | None = Field(
        default=None,
        description="the owner's signed revocation list (cogen swarm revoke) to publish; re-read and "
        "republished every third of the record TTL (typically given to the coordinator)",
    )
    checkpoint_auth: bool = Field(
        default=False,
        description="in a permissioned swarm, also require a member's signed credential header on "
        "checkpoint downloads over HTTP (the coordinator's API, a node's base mirror)",
    )
