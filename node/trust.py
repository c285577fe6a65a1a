"""Which key a node trusts to sign the swarm's manifests, and which SwarmInfo records speak for it.

A node follows manifests signed by one key only (:class:`KeyTrust`):

- ``--trusted-key`` (the OpenSSH text, or a file holding it): that key, whatever the swarm announces.
  A missing file or a malformed key is a configuration error (exit 2) before the node joins anything;
- otherwise trust on first use: the first key a coordinator announces is written to
  ``<output dir>/trusted-key-<swarm>.pub`` (atomically, never overwritten:
  :func:`cogen.core.atomic.create_private_once`) and read back after a restart. It is never replaced
  silently: a record announcing another key is ignored, with one warning per key. To follow a new
  coordinator key, delete that file or pass ``--trusted-key``. Two keys announced at the first look pin
  neither (a warning says so).

A SwarmInfo record counts only if it carries its manifest key's signature over its own owner's DHT key
(``owner_signature``, :func:`cogen.protocols.manifest.signs_owner`): any peer can copy a public key
into a record, none can sign with it. The owners of the records that speak for the trusted key are the
swarm's coordinator: only their CheckpointSource records are endorsed; a record for another key, or
without a valid signature, steers nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from cogen.core.atomic import create_private_once
from cogen.core.settings import ConfigError
from cogen.core.swarm import Entry
from cogen.protocols import SwarmInfo
from cogen.protocols.manifest import parse_public_key, signs_owner

logger = logging.getLogger(__name__)

TRUST_FILE = "trusted-key-{swarm}.pub"  #: in the node's output dir: the key pinned on first use, per swarm
_MAX_KEY_FILE_BYTES = 16 * 1024
_MAX_WARNED = 256  # distinct foreign keys warned about at most (a flood warns once more, then stays quiet)


def read_trusted_key(value: str) -> str:
    """``--trusted-key``: the key itself, or a file holding it; :class:`ConfigError` in one line if it is
    neither a readable file nor a valid key."""
    text, where = value, "--trusted-key"
    if not value.lstrip().startswith("ssh-"):
        path = Path(value).expanduser()
        try:
            with open(path, "rb") as handle:
                text = handle.read(_MAX_KEY_FILE_BYTES).decode("utf-8", "replace")
        except OSError as e:
            raise ConfigError(f"--trusted-key {value}: cannot read it as a key file ({e.strerror})") from None
        where = f"--trusted-key {path}"
    try:
        return parse_public_key(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


class KeyTrust:
    """The trusted manifest key (given, pinned on first use, or not known yet) and the coordinator's
    records that speak for it; see the module's docstring."""

    def __init__(self, key: str | None = None, pin_file: Path | None = None):
        self._key = key
        self.pin_file = pin_file  # None: the key was given (nothing to pin)
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, trusted_key: str | None, output_dir: Path, swarm: str) -> KeyTrust:
        """``--trusted-key`` if given, else the key pinned for ``swarm`` in ``output_dir`` (none yet on a
        first start)."""
        if trusted_key:
            return cls(read_trusted_key(trusted_key))
        pin_file = Path(output_dir) / TRUST_FILE.format(swarm=swarm)
        trust = cls(None, pin_file)
        if pin_file.exists():
            trust._key = trust._read_pin()
            logger.info("trusting the manifest key pinned in %s", pin_file)
        return trust

    @property
    def key(self) -> str | None:
        return self._key

    def _read_pin(self) -> str:
        assert self.pin_file is not None
        try:
            return parse_public_key(self.pin_file.read_text(errors="replace")[:_MAX_KEY_FILE_BYTES])
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"the pinned manifest key {self.pin_file} is unusable ({e}); delete it to trust the "
                "coordinator's key anew, or pass --trusted-key"
            ) from None

    def coordinators(self, swarm: str, infos: Iterable[Entry[SwarmInfo]]) -> set[bytes]:
        """The owners of ``infos`` that speak for the trusted key (pinning one on first use)."""
        proven: dict[str, set[bytes]] = {}
        for entry in infos:
            record = entry.record
            key = (record.manifest_key or "").strip()
            if record.swarm == swarm and key and signs_owner(key, record.owner_signature, swarm, entry.owner):
                proven.setdefault(key, set()).add(entry.owner)
        if self._key is None and proven:
            self._pin_first(sorted(proven))
        for key in proven:
            if key != self._key:
                self._warn_foreign(key)
        return proven.get(self._key, set()) if self._key else set()

    def _pin_first(self, keys: list[str]) -> None:
        if len(keys) > 1:
            shown = ", ".join(fingerprint(k) for k in keys)
            self._warn_once(
                "|".join(keys),
                "several coordinators announce different manifest keys (%s); trusting none: pin one with "
                "--trusted-key", shown,
            )  # fmt: skip
            return
        key = keys[0]
        if self.pin_file is not None and not create_private_once(
            self.pin_file, lambda tmp: tmp.write_text(key + "\n")
        ):
            key = self._read_pin()  # another process sharing the output dir pinned first: its key holds
        self._key = key
        logger.warning(
            "trusting the manifest key the coordinator announces (%s) from now on, pinned in %s",
            fingerprint(key), self.pin_file,
        )  # fmt: skip

    def _warn_foreign(self, key: str) -> None:
        self._warn_once(
            key,
            "ignoring a coordinator that announces manifest key %s: this node trusts %s (delete %s or pass "
            "--trusted-key to change that)", fingerprint(key), fingerprint(self._key or ""), self.pin_file,
        )  # fmt: skip

    def _warn_once(self, tag: str, message: str, *args: object) -> None:
        if tag in self._warned or len(self._warned) >= _MAX_WARNED:
            return
        self._warned.add(tag)
        logger.warning(message, *args)


def fingerprint(key: str) -> str:
    """A short name for a public key in logs: its type and the last 12 characters of its body."""
    parts = key.split()
    return f"{parts[0]} ...{parts[1][-12:]}" if len(parts) > 1 else key[:24]
