"""Protocol and software versions.

`PROTOCOL_VERSION` changes whenever a record's meaning or shape changes incompatibly; peers on
different protocol versions refuse each other's records with a clear message.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import ClassVar

PROTOCOL_VERSION = 8  # 3: SwarmInfo bound to the manifest key (owner_signature); 4: prequential progress;
# 5: NodeInfo and SwarmInfo name their model by fingerprint (foreign experts); 6: prequential claims
# carry per-row losses; 7: robust group rounds (claims, reveals); 8: sparse group rounds (GroupProgress)


def software_version() -> str:
    """The installed cogen version, e.g. ``"0.1.0"``."""
    try:
        return version("cogen")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


class IncompatibleProtocolError(RuntimeError):
    """Raised when the swarm speaks a protocol version that this cogen cannot talk to."""

    exit_code: ClassVar[int] = 3  # ExitCode.PROTOCOL (cogen.core.exit_codes)
    what: ClassVar[str] = "incompatible swarm"

    def __init__(self, theirs: int, where: str):
        super().__init__(
            f"{where} speaks cogen protocol {theirs}, this cogen {software_version()} speaks protocol "
            f"{PROTOCOL_VERSION}: run the same cogen version as the swarm"
        )
        self.theirs = theirs
