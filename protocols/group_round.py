"""What the members of an averaging round tell each other: a claim before it, a reveal after it.

:class:`RoundClaim` travels in hivemind's all-gather when the group forms (step, weight, time since
the last outer step, a commitment to a random nonce and, for the robust aggregators, the digest and
size of the member's compressed delta). :class:`RoundReveal` is fetched from each member over the
group's exchange (:mod:`cogen.node.exchange`) once the data of the round is fixed: the nonce behind
the commitment and the member's probe projections under the round's seed. Both are parsed with
:func:`parse_claim` / :func:`parse_reveal` from whatever a peer sent: strict types, bounded sizes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cogen.protocols.records import Finite, NonNegativeFinite

HEX64 = r"^[0-9a-f]{64}$"
MAX_CHUNKS = 512  # projections per member and round, at most (as the round verifier cuts them)
Hex64 = Annotated[str, Field(pattern=HEX64)]


class RoundRejected(ValueError):
    """What a peer sent for a round is not a valid claim or reveal (one line)."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class RoundClaim(_Strict):
    """A member's claims about its update, gathered by every member when the group forms."""

    step: int = Field(ge=0, description="the outer step the member is at")
    weight: NonNegativeFinite = Field(description="samples the member trained on since its last outer step")
    elapsed_s: NonNegativeFinite = Field(description="seconds since the member's last outer step")
    commit: Hex64 = Field(description="sha256 of the member's nonce for this round (revealed after it)")
    digest: Hex64 | None = Field(default=None, description="sha256 of the compressed delta it serves")
    nbytes: int = Field(default=0, ge=0, description="bytes of that compressed delta")


class RoundReveal(_Strict):
    """What a member reveals once the round's data is fixed: its nonce and its probe projections."""

    nonce: Hex64
    proj: list[Finite] = Field(max_length=MAX_CHUNKS)
    sq: list[NonNegativeFinite] = Field(max_length=MAX_CHUNKS)


def parse_claim(raw: Any) -> RoundClaim:
    try:
        return RoundClaim.model_validate(raw)
    except ValidationError as e:
        raise RoundRejected(f"malformed round claim: {e.errors()[0]['msg']}") from None


def parse_reveal(raw: Any) -> RoundReveal:
    try:
        return RoundReveal.model_validate(raw)
    except ValidationError as e:
        raise RoundRejected(f"malformed round reveal: {e.errors()[0]['msg']}") from None
