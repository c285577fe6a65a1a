"""The coordinator's identity key, and signing manifests with it.

The manifest's schema and its verification live in :mod:`cogen.protocols.manifest` (nodes check
manifests too). hivemind's ``RSAPrivateKey`` cannot be loaded from a file, so the key itself is a PEM
file read and used with ``cryptography`` directly (:class:`Identity`); its signatures are hivemind's
scheme (RSA-PSS over SHA-256, base64), verified with ``hivemind.utils.crypto.RSAPublicKey``.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cogen.coordinator.config import SigningConfig
from cogen.core.atomic import create_private_once
from cogen.core.config import CacheConfig
from cogen.core.models import cache_root
from cogen.protocols.manifest import Manifest, ManifestError, owner_statement

logger = logging.getLogger(__name__)


IDENTITY_FILE = "coordinator-identity.pem"  #: the signing key's file in the cache dir, by default

_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class Identity:
    """The coordinator's RSA key: signs manifests the way hivemind's ``RSAPrivateKey`` signs records."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    @property
    def public_key(self) -> str:
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return raw.decode()

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._key.sign(data, _PADDING, hashes.SHA256())).decode()

    def sign_owner(self, swarm: str, owner: bytes) -> str:
        """The ``owner_signature`` of a SwarmInfo record stored under the DHT key ``owner``: it proves
        to nodes that the record speaks for this key (:func:`cogen.protocols.manifest.signs_owner`)."""
        return self.sign(owner_statement(swarm, owner))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Read the PEM key at ``path``, or create it (2048-bit RSA, mode 0600, never overwriting)."""
        path = Path(path)
        if not path.exists():
            _create_key(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ManifestError(f"cannot read the identity key {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ManifestError(f"identity key {path} is not an RSA private key")
        if path.stat().st_mode & 0o077:
            logger.warning("identity key %s is readable by others; chmod 600 it", path)
        return cls(key)


def _create_key(path: Path) -> None:
    """Write a new key (mode 0600) and link it into place; a concurrent writer wins."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if create_private_once(path, lambda tmp: tmp.write_bytes(pem)):
        logger.info("created the coordinator identity key %s", path)


def sign_manifest(manifest: Manifest, identity: Identity) -> Manifest:
    """``manifest`` with the signer's public key and the signature filled in."""
    unsigned = manifest.model_copy(update={"public_key": identity.public_key, "signature": ""})
    return unsigned.model_copy(update={"signature": identity.sign(unsigned.canonical_bytes())})


def signing_identity(keys: SigningConfig, cache: CacheConfig) -> Identity:
    """The key ``keys`` names, else ``<cache dir>/coordinator-identity.pem`` (created on first use)."""
    return Identity.load_or_create(keys.identity or cache_root(cache.cache_dir) / IDENTITY_FILE)
