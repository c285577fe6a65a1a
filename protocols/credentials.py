"""A permissioned swarm's credential: the owner's signature on a member's public key.

Carried by :class:`cogen.protocols.records.MemberInfo`, inside hivemind's ``AccessToken``, and as a
JSON file a member keeps (:mod:`cogen.core.access`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cogen.protocols.names import NAME_PATTERN

__all__ = ["Credential"]


class Credential(BaseModel):
    """The swarm owner's signature on a member's public key: what lets a peer into a permissioned swarm.

    It is not secret (it names a public key); a peer proves it is the member by signing with the
    matching private key (hivemind's ``TokenAuthorizerBase`` does on every DHT request). It travels as
    a JSON file, inside hivemind's ``AccessToken`` and inside a :class:`MemberInfo` record."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    swarm: str = Field(pattern=NAME_PATTERN, max_length=64)
    serial: int = Field(ge=1, lt=2**53, description="unique per owner; what a revocation names")
    name: str = Field(pattern=NAME_PATTERN, max_length=64, description="who holds it, e.g. an institution")
    member_key: str = Field(pattern=r"^ssh-rsa [A-Za-z0-9+/=]+$", max_length=1024)
    expires_at: int = Field(ge=0, lt=2**53, description="unix seconds")
    signature: str = Field(pattern=r"^[A-Za-z0-9+/=]+$", max_length=1024, description="owner's, base64")

    def signed_bytes(self) -> bytes:
        """What the owner signs: every field but the signature, in a fixed order."""
        fields = (self.swarm, str(self.serial), self.name, self.member_key, str(self.expires_at))
        return ("cogen-credential\n" + "\n".join(fields)).encode()
