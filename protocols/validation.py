"""DHT record validation for cogen records.

hivemind's ``SchemaValidator`` only understands pydantic v1 models, so cogen plugs its strict v2
records into hivemind's public extension point, ``RecordValidatorBase``. Every record under a
cogen key must

1. have a subkey that names its owner's RSA public key (``RSASignatureValidator`` then checks the
   owner's signature, before this validator runs),
2. decode from msgpack into a dict that speaks this peer's protocol version, and
3. validate against its strict schema (no type coercion, no extra fields).

A record that fails is rejected (it is neither stored nor returned) and logged, rate-limited;
it never raises into the DHT.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from hivemind.dht import DHTID
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import ValidationError

from cogen.protocols.keys import swarm_key
from cogen.protocols.records import RECORD_SCHEMAS, Record, SwarmInfo
from cogen.protocols.version import PROTOCOL_VERSION

logger = logging.getLogger(__name__)

_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX, re.DOTALL)
_LOG_EVERY_S = 60.0


class RecordRejected(ValueError):
    """Why a record was refused (one line, for logs and tests)."""


class CogenRecordValidator(RecordValidatorBase):
    """Validates the records under one swarm's keys against :data:`RECORD_SCHEMAS`."""

    def __init__(self, swarm: str):
        self.swarm = swarm
        self._kinds: dict[bytes, str] = {
            DHTID.generate(source=swarm_key(swarm, kind)).to_bytes(): kind for kind in RECORD_SCHEMAS
        }
        self._last_logged: dict[str, float] = {}
        self._lock = threading.Lock()

    def validate(self, record: DHTRecord) -> bool:
        kind = self._kinds.get(record.key)
        if kind is None:
            return True  # not a cogen record of this swarm (e.g. hivemind's own averaging keys)
        try:
            check_record(kind, record.subkey, record.value)
        except RecordRejected as e:
            self._log_rejection(kind, str(e))
            return False
        return True

    def _log_rejection(self, kind: str, reason: str) -> None:
        now = time.monotonic()
        tag = f"{kind}:{reason[:60]}"
        with self._lock:
            if now - self._last_logged.get(tag, -_LOG_EVERY_S) < _LOG_EVERY_S:
                return
            self._last_logged[tag] = now
        logger.warning("rejected a %s record in swarm %r: %s", kind, self.swarm, reason)

    # the validator is pickled into hivemind's DHT process: drop the lock there and recreate it
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


#: kinds whose records are kept even from another protocol version (only their envelope is checked),
#: so that a joining peer can tell the user which version the swarm speaks instead of seeing nothing
ENVELOPE_ON_MISMATCH = frozenset({SwarmInfo.KIND})


def check_record(kind: str, subkey: bytes, value: bytes) -> Record | None:
    """Decode and validate one serialized record of ``kind``; raise :class:`RecordRejected` if bad.

    Returns ``None`` for a well-formed envelope of another protocol version (kinds in
    :data:`ENVELOPE_ON_MISMATCH` only): such a record is stored, but not parsed.
    """
    if subkey in DHTProtocol.RESERVED_SUBKEYS:
        raise RecordRejected("the record has no owner subkey")
    if not _OWNER_RE.search(subkey):
        raise RecordRejected("the subkey does not name an owner public key, so the record is unsigned")
    try:
        payload = MSGPackSerializer.loads(value)
    except Exception as e:  # msgpack raises many types on garbage
        raise RecordRejected(f"the value is not msgpack ({type(e).__name__})") from None
    if kind in ENVELOPE_ON_MISMATCH and isinstance(payload, dict):
        theirs = payload.get("protocol_version")
        if isinstance(theirs, int) and not isinstance(theirs, bool) and theirs != PROTOCOL_VERSION:
            return None
    return parse_record(kind, payload)


def parse_record(kind: str, payload: Any) -> Record:
    """Validate a decoded record payload of ``kind``; raise :class:`RecordRejected` if bad."""
    schema = RECORD_SCHEMAS.get(kind)
    if schema is None:
        raise RecordRejected(f"unknown record kind {kind!r}")
    if not isinstance(payload, dict):
        raise RecordRejected(f"the value is a {type(payload).__name__}, not a dict")
    theirs = payload.get("protocol_version")
    if isinstance(theirs, int) and theirs != PROTOCOL_VERSION:
        raise RecordRejected(
            f"the record speaks cogen protocol {theirs}, this peer speaks {PROTOCOL_VERSION}: "
            "peers on different protocol versions ignore each other; run the same cogen version"
        )
    try:
        return schema.model_validate(payload, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "record"
        raise RecordRejected(f"{where}: {first['msg']} ({e.error_count()} error(s))") from None


def make_validators(swarm: str, private_key: RSAPrivateKey) -> list[RecordValidatorBase]:
    """The validators every cogen peer runs: owner signatures, then cogen's schemas."""
    return [RSASignatureValidator(private_key), CogenRecordValidator(swarm)]
