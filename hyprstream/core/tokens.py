"""Signed, expiring bearer tokens: Ed25519-signed claims ``{sub, role, iat, exp, jti}``.

Wire form (three dot-separated parts, base64url without padding)::

    hst1.<base64url(canonical JSON claims)>.<base64url(Ed25519 signature)>

The signature covers the ASCII bytes ``hst1.<claims part>``. Core verifies with the public half of
its token key, so anyone holding only the public key can check a token but not make one. Tokens
carry no secret: losing one is losing the access it grants until ``exp``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from hyprstream.core import signing
from hyprstream.core.audit import RESERVED_ACTORS, canonical
from hyprstream.core.auth import Principal, Role
from hyprstream.coreapi.commands import load_json
from hyprstream.errors import AuthError, ValidationError

PREFIX = "hst1"
MAX_TOKEN_BYTES = 4096
MAX_TTL_S = 366 * 86400  # the longest lifetime a token may have, however it is issued


def _reserved(sub: str) -> str | None:
    """Why ``sub`` may not be a token's subject, or None."""
    if sub.lower() in RESERVED_ACTORS:
        return (f"identity {sub!r} is reserved: the audit log writes {', '.join(sorted(RESERVED_ACTORS))} "
                f"as actors of their own")
    return None


@dataclass(frozen=True)
class TokenClaims:
    sub: str
    role: Role
    iat: int
    exp: int
    jti: str

    def to_json(self) -> dict[str, object]:
        return {"sub": self.sub, "role": self.role.value, "iat": self.iat, "exp": self.exp, "jti": self.jti}

    @property
    def principal(self) -> Principal:
        return Principal(self.sub, self.role)


def _b64(data: bytes) -> str:
    return signing.b64encode(data, urlsafe=True)


def _unb64(text: str) -> bytes:
    return signing.b64decode(text, urlsafe=True)


def issue(key: signing.Ed25519PrivateKey, sub: str, role: Role, *, ttl_s: int, now: float) -> tuple[str, TokenClaims]:
    """A token for ``sub`` with ``role``, valid for ``ttl_s`` seconds from ``now``."""
    from hyprstream.coreapi.records import check_name

    check_name("identity", sub)
    if (reason := _reserved(sub)) is not None:
        raise ValidationError(reason)
    if not isinstance(role, Role):
        raise ValidationError(f"role must be one of {[r.value for r in Role]}")
    if ttl_s <= 0:
        raise ValidationError("token lifetime must be > 0 seconds")
    if ttl_s > MAX_TTL_S:
        raise ValidationError(f"token lifetime must be at most {MAX_TTL_S // 86400} days ({MAX_TTL_S} s), "
                              f"got {ttl_s} s")
    claims = TokenClaims(sub, role, int(now), int(now) + int(ttl_s), secrets.token_hex(8))
    signed = f"{PREFIX}.{_b64(canonical(claims.to_json()))}"
    return f"{signed}.{_b64(key.sign(signed.encode()))}", claims


def looks_signed(token: str) -> bool:
    return token.startswith(PREFIX + ".")


def _unverified_claim(token: str, name: str) -> str | None:
    try:  # bounded parsing: the claims of a refused token are anyone's bytes
        value = load_json(_unb64(token.split(".")[1]), "token claims").get(name)
    except (IndexError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and len(value) <= 128 else None


def unverified_subject(token: str) -> str | None:
    """The ``sub`` a token claims, without checking it (for naming the caller of a refused call)."""
    return _unverified_claim(token, "sub")


def unverified_role(token: str) -> str | None:
    """The ``role`` a signed token claims, without checking it (for not asking what the role may not: the
    server that is asked checks the token)."""
    return _unverified_claim(token, "role") if looks_signed(token) else None


def verify(token: str, keys: list[signing.Ed25519PublicKey] | signing.Ed25519PublicKey, *, now: float) -> TokenClaims:
    """The claims of a valid, unexpired token; AuthError naming what is wrong otherwise."""
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError("malformed token: too long")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise AuthError(f"malformed token: expected {PREFIX}.<claims>.<signature>")
    try:
        payload, sig = _unb64(parts[1]), _unb64(parts[2])
    except ValueError:
        raise AuthError("malformed token: not base64url") from None
    message = f"{parts[0]}.{parts[1]}".encode()
    if not any(signing.verify(k, sig, message) for k in (keys if isinstance(keys, list) else [keys])):
        raise AuthError("token signature is not valid (not issued by this core's token key)")
    try:
        raw = json.loads(payload)
        claims = TokenClaims(raw["sub"], Role(raw["role"]), int(raw["iat"]), int(raw["exp"]), str(raw["jti"]))
    except (ValueError, KeyError, TypeError):
        raise AuthError("malformed token claims") from None
    if not isinstance(raw["sub"], str) or not raw["sub"]:
        raise AuthError("malformed token claims: sub")
    if (reason := _reserved(claims.sub)) is not None:
        raise AuthError(reason)
    if claims.exp - claims.iat > MAX_TTL_S:
        raise AuthError(f"token lifetime exceeds {MAX_TTL_S // 86400} days (iat {claims.iat}, exp {claims.exp})")
    if now >= claims.exp:
        raise AuthError(f"token expired (exp {claims.exp}, now {int(now)})")
    return claims


__all__ = ["MAX_TTL_S", "PREFIX", "TokenClaims", "issue", "looks_signed", "unverified_role", "unverified_subject",
           "verify"]
