"""Bearer-token authentication and role-based authorization for core's Flight API.

Tokens are random secrets; core keeps only their SHA-256 digests and compares in constant time.
Every call must present ``authorization: Bearer <token>``; the token's role decides what it may do.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow.flight as flight


class Role(enum.Enum):
    FOG = "fog"  # pull weights, push deltas
    READER = "reader"  # pull weights, read lineage
    AUDITOR = "auditor"  # read the audit log
    ADMIN = "admin"  # everything


class Permission(enum.Enum):
    READ = "read"
    PUSH = "push"
    REGISTER = "register"


GRANTS: Mapping[Role, frozenset[Permission]] = {
    Role.FOG: frozenset({Permission.READ, Permission.PUSH}),
    Role.READER: frozenset({Permission.READ}),
    Role.AUDITOR: frozenset(),
    Role.ADMIN: frozenset(Permission),
}


@dataclass(frozen=True)
class Principal:
    identity: str
    role: Role

    def may(self, permission: Permission) -> bool:
        return permission in GRANTS[self.role]


def new_token() -> str:
    return secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenRegistry:
    """Known token digests and the principal each one authenticates."""

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._by_digest: dict[str, Principal] = {}
        for token_digest, principal in entries:
            self._by_digest[token_digest] = principal

    def add(self, token: str, principal: Principal) -> None:
        self._by_digest[digest(token)] = principal

    def authenticate(self, token: str) -> Principal | None:
        d = digest(token)
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, d):
                return principal
        return None


class _AuthMiddleware(flight.ServerMiddleware):
    def __init__(self, principal: Principal) -> None:
        self.principal = principal


class BearerAuthFactory(flight.ServerMiddlewareFactory):
    """Refuses every call without a valid bearer token; exposes the principal to handlers."""

    def __init__(self, registry: TokenRegistry) -> None:
        self.registry = registry

    def start_call(self, info, headers):
        values = headers.get("authorization") or headers.get("Authorization") or []
        if not values:
            raise flight.FlightUnauthenticatedError("missing credentials: send 'authorization: Bearer <token>'")
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise flight.FlightUnauthenticatedError("malformed authorization header: expected 'Bearer <token>'")
        principal = self.registry.authenticate(token.strip())
        if principal is None:
            raise flight.FlightUnauthenticatedError("invalid token")
        return _AuthMiddleware(principal)


def principal_of(context: flight.ServerCallContext) -> Principal:
    middleware = context.get_middleware("auth")
    if middleware is None:  # the factory refuses unauthenticated calls before handlers run
        raise flight.FlightUnauthenticatedError("unauthenticated")
    return middleware.principal
