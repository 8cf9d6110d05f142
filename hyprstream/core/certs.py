"""``hyprstream certs init``: what a core deployment needs, made with ``cryptography``.

Into one new directory:

* ``ca.pem`` / ``ca.key``: a private CA (ECDSA P-256) that signs the TLS certificates;
* ``server.pem`` / ``server.key``: core's TLS certificate for the given DNS names and IP addresses;
* ``client-<name>.pem`` / ``client-<name>.key``: a client certificate per name (for mutual TLS);
* ``audit-signing.key`` / ``audit-signing.pub``: the Ed25519 key that signs core's audit log;
* ``token-signing.key`` / ``token-signing.pub``: the Ed25519 key that signs bearer tokens.

Private keys are written with mode 0600; nothing is ever overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hyprstream import durable
from hyprstream.core import signing
from hyprstream.coreapi.records import check_name
from hyprstream.errors import ConfigError


@dataclass(frozen=True)
class Created:
    path: Path
    what: str
    private: bool


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hyprstream"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _sign(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, days: int, now: dt.datetime,
          ca: bool = False, sans: Sequence[x509.GeneralName] = (), usage=None) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
            content_commitment=False, data_encipherment=False, key_agreement=True, encipher_only=False,
            decipher_only=False), critical=True)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                        critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def init_deployment(out: str | Path, *, server_names: Sequence[str] = ("localhost", "127.0.0.1"),
                    clients: Sequence[str] = (), days: int = 365,
                    now: dt.datetime | None = None) -> list[Created]:
    """Create the CA, server and client certificates and the two signing keys under ``out``."""
    out = Path(out)
    if days < 1:
        raise ConfigError("must be >= 1", source="--days")
    if not server_names:
        raise ConfigError("at least one server name is needed", source="--server-name")
    for c in clients:
        check_name("client", c)
    planned = ["ca.pem", "ca.key", "server.pem", "server.key", "audit-signing.key", "audit-signing.pub",
               "token-signing.key", "token-signing.pub"]
    planned += [f"client-{c}.{ext}" for c in clients for ext in ("pem", "key")]
    existing = [name for name in planned if (out / name).exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)}", source=str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a regular file in the way, no permission, ...
        raise ConfigError(f"cannot create the directory: {exc.strerror or exc}", source=str(out)) from None
    now = now or dt.datetime.now(dt.timezone.utc)
    created: list[Created] = []

    def private(name: str, data: bytes, what: str) -> None:
        durable.write_private_file(out / name, data)
        created.append(Created(out / name, what, True))

    def public(name: str, data: bytes, what: str) -> None:
        durable.write_public_file(out / name, data)
        created.append(Created(out / name, what, False))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("hyprstream deployment CA")
    ca = _sign(ca_name, ca_key, ca_name, ca_key, days=days, now=now, ca=True)
    private("ca.key", _pem_key(ca_key), "CA private key (keep offline)")
    public("ca.pem", _pem_cert(ca), "CA certificate (give to every client and to core as tls.client_ca)")

    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _sign(_name(server_names[0]), server_key, ca_name, ca_key, days=days, now=now,
                   sans=[_san(n) for n in server_names], usage=ExtendedKeyUsageOID.SERVER_AUTH)
    private("server.key", _pem_key(server_key), "core's TLS private key (tls.key)")
    public("server.pem", _pem_cert(server), f"core's TLS certificate for {', '.join(server_names)} (tls.cert)")

    for c in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _sign(_name(c), key, ca_name, ca_key, days=days, now=now, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        private(f"client-{c}.key", _pem_key(key), f"TLS client key of {c}")
        public(f"client-{c}.pem", _pem_cert(cert), f"TLS client certificate of {c}")

    for purpose, conf in (("audit", "audit.signing_key"), ("token", "auth.token_key")):
        key = signing.generate_key()
        private(f"{purpose}-signing.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            f"Ed25519 {purpose} signing key {signing.fingerprint(key)} ({conf})")
        public(f"{purpose}-signing.pub", key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            f"its public key (for {'audit verify --key' if purpose == 'audit' else 'auth.token_public_keys'})")
    return created
