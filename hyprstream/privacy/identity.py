"""Device identities for secure aggregation: what makes a client's messages mean something to its peers.

Against a fog that deviates, a client must know that a neighbour's key advert and its confirmation of the
survivor set (the consistency round, Bonawitz et al. 2017) come from that neighbour, not from the fog that
relays them. Keys the fog relays or registers prove nothing (the fog could make its own), so an identity is
a static X25519 key whose public key is certified by the **deployment CA** -- the CA of ``hyprstream
certs init``, held by the operator, not by any fog -- in an X.509 certificate (RFC 8410) carrying the
extended key usage :data:`SECAGG_DEVICE_USAGE` (so a fog's own TLS client certificate from the same CA is
not a device identity). Each device holds its key, its certificate and the CA certificate;
:func:`issue_identity` makes the key and the certificate (``hyprstream`` deployment tooling and tests).

Two neighbours u and v authenticate each other by key agreement, not signatures: ECDH of their static
keys is a secret only they can compute, and it enters the key of their share channel (with the round's
ephemeral keys) and of the pairwise MACs on the survivor set (:mod:`~hyprstream.privacy.secagg`). One
X25519 agreement per neighbour replaces the Ed25519 verification of each neighbour's advert and survivor
signature: about a third of the cost each, and one instead of two per neighbour.

Without a configured identity a client runs the same protocol with a per-round key whose public half the
fog relays (:meth:`DeviceIdentity.uncertified`): the fog can then put its own key in the middle, and only
the strict-majority threshold protects against a deviating fog (docs/privacy.md). A client with a CA
accepts only neighbours certified by it, so a fog cannot downgrade it.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hyprstream.errors import ConfigError, ValidationError

# extended key usage of a device's secure-aggregation identity (an OID under the UUID arc 2.25, X.667)
SECAGG_DEVICE_USAGE = x509.ObjectIdentifier("2.25.199538794004240797782994923213741189062")
PUBLIC_BYTES = 32
_CACHE = 4096  # verified certificates kept per process (a device sees the same neighbours round after round)
PAIRS_KEPT = 1024  # static agreements a device remembers across rounds (see :func:`pairs_to_bytes`)


@dataclass(frozen=True)
class DeviceIdentity:
    """A static X25519 key and how peers learn its public half: a CA-issued certificate (``ca`` set), or
    the raw public key (uncertified, ``ca`` None)."""

    key: X25519PrivateKey
    credential: bytes  # DER certificate, or the raw 32-byte public key when uncertified
    ca: x509.Certificate | None = None

    @classmethod
    def uncertified(cls) -> DeviceIdentity:
        key = X25519PrivateKey.generate()
        return cls(key, key.public_key().public_bytes_raw())

    @classmethod
    def from_raw(cls, raw: bytes) -> DeviceIdentity:
        """An uncertified identity from its 32-byte private key (a round's state)."""
        key = X25519PrivateKey.from_private_bytes(raw)
        return cls(key, key.public_key().public_bytes_raw())

    @classmethod
    def load(cls, key_path: Path, cert_path: Path, ca_path: Path) -> DeviceIdentity:
        """A certified identity from PEM files; ConfigError naming the file when one is unusable."""
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"secure-aggregation identity key: {exc}", source=str(key_path)) from None
        if not isinstance(key, X25519PrivateKey):
            raise ConfigError("secure-aggregation identity key must be X25519 (hyprstream.privacy.identity."
                              "issue_identity makes one)", source=str(key_path))
        certs = {}
        for what, path in (("certificate", cert_path), ("CA certificate", ca_path)):
            try:
                certs[what] = x509.load_pem_x509_certificate(Path(path).read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"secure-aggregation {what}: {exc}", source=str(path)) from None
        der = certs["certificate"].public_bytes(serialization.Encoding.DER)
        identity = cls(key, der, certs["CA certificate"])
        if identity.verify_peer(der) != key.public_key().public_bytes_raw():
            raise ConfigError("secure-aggregation certificate is not for this key", source=str(cert_path))
        return identity

    @cached_property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes_raw()

    @cached_property
    def _anchor(self) -> bytes:
        assert self.ca is not None
        return self.ca.fingerprint(hashes.SHA256())

    def agree(self, peer_public: bytes, known: MutableMapping[bytes, bytes] | None = None) -> bytes:
        """The 32-byte X25519 secret of this identity and a peer's (verified) public key; ValidationError for a
        degenerate key. ``known`` (peer public key -> secret) remembers the agreements of a certified identity
        across rounds: both keys are static, so the secret is too, and a device meets the same neighbours
        round after round (:func:`pairs_to_bytes` keeps them on the device between messages). An uncertified
        identity is new each round and remembers nothing."""
        if self.ca is None:
            known = None
        if known is not None and (hit := known.pop(peer_public, None)) is not None:
            known[peer_public] = hit  # the most recently used last
            return hit
        try:
            secret = self.key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # a wrong length or a low-order point
            raise ValidationError(f"secure aggregation: key agreement with a neighbour's identity failed: {exc}") from None
        if known is not None:
            known[peer_public] = secret
            while len(known) > PAIRS_KEPT:
                del known[next(iter(known))]
        return secret

    def verify_peer(self, credential: bytes) -> bytes:
        """A neighbour's raw public key from its credential; ValidationError when this identity's trust
        anchor does not vouch for it (a certificate not issued by the CA, expired, or not a device
        identity; with a CA, a bare key is refused)."""
        if self.ca is None:
            if len(credential) != PUBLIC_BYTES:
                raise ValidationError("secure aggregation: a neighbour's identity is not a 32-byte key")
            return bytes(credential)
        return _certified_key(self.ca, self._anchor, bytes(credential))


def pairs_to_bytes(identity: DeviceIdentity, known: MutableMapping[bytes, bytes]) -> bytes:
    """The remembered agreements of ``identity`` as one blob: its public key, then (peer key, secret) pairs,
    the most recently used last. Device-local state, as secret as the identity key it derives from."""
    kept = list(known.items())[-PAIRS_KEPT:]
    return identity.public + b"".join(peer + secret for peer, secret in kept)


def pairs_from_bytes(identity: DeviceIdentity, blob: bytes) -> dict[bytes, bytes]:
    """The agreements :func:`pairs_to_bytes` kept for this very identity; none when the blob belongs to another
    key (a rotated identity starts afresh) or is malformed."""
    size = 2 * PUBLIC_BYTES
    body = blob[PUBLIC_BYTES:]
    if identity.ca is None or blob[:PUBLIC_BYTES] != identity.public or len(body) % size:
        return {}
    return {body[i:i + PUBLIC_BYTES]: body[i + PUBLIC_BYTES:i + size] for i in range(0, len(body), size)}


_verified: OrderedDict[tuple[bytes, bytes], tuple[bytes, dt.datetime]] = OrderedDict()


def _certified_key(ca: x509.Certificate, anchor: bytes, der: bytes) -> bytes:
    hit = _verified.get((anchor, der))
    now = dt.datetime.now(dt.timezone.utc)
    if hit is not None and now <= hit[1]:
        _verified.move_to_end((anchor, der))
        return hit[0]
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ValidationError(f"secure aggregation: a neighbour's certificate is not from the deployment CA ({exc})") from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValidationError("secure aggregation: a neighbour's certificate is not valid now")
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = ()
    if SECAGG_DEVICE_USAGE not in usage:
        raise ValidationError("secure aggregation: a neighbour's certificate is not a device identity")
    key = cert.public_key()
    if not isinstance(key, X25519PublicKey):
        raise ValidationError("secure aggregation: a neighbour's identity key is not X25519")
    raw = key.public_bytes_raw()
    _verified[(anchor, der)] = (raw, cert.not_valid_after_utc)
    if len(_verified) > _CACHE:
        _verified.popitem(last=False)
    return raw


def issue_identity(name: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *,
                   days: int = 365) -> DeviceIdentity:
    """A new device identity certified by the deployment CA (its key and certificate)."""
    key = X25519PrivateKey.generate()
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hyprstream"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([SECAGG_DEVICE_USAGE, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return DeviceIdentity(key, cert.public_bytes(serialization.Encoding.DER), ca_cert)


def deployment_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The deployment CA that ``hyprstream certs init`` made in ``directory`` (``ca.pem``, ``ca.key``)."""
    directory = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"deployment CA: {exc}", source=str(directory)) from None
    return cert, key


def write_identity(identity: DeviceIdentity, key_path: Path, cert_path: Path) -> None:
    """The identity's key (mode 0600) and certificate as PEM files, for :meth:`DeviceIdentity.load`."""
    key_path, cert_path = Path(key_path), Path(cert_path)
    key_path.write_bytes(identity.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(x509.load_der_x509_certificate(identity.credential).public_bytes(serialization.Encoding.PEM))


__all__ = ["PAIRS_KEPT", "SECAGG_DEVICE_USAGE", "DeviceIdentity", "deployment_ca", "issue_identity", "pairs_from_bytes",
           "pairs_to_bytes", "write_identity"]
