"""Authentication and role-based authorization for core's Flight API.

Every call carries ``authorization: Bearer <token>``. Two kinds of token are accepted:

* **signed tokens** (:mod:`hyprstream.core.tokens`): Ed25519-signed, expiring claims
  ``{sub, role, iat, exp, jti}``, made by ``hyprstream token create`` or the ``issue_token`` action;
  core needs only the public key to check them. This is what deployments use.
* **static tokens** (:class:`TokenRegistry`): random secrets of which core keeps only SHA-256 digests,
  compared in constant time. For embedding core in one process (the simulator, tests).

With mutual TLS on (``tls.client_ca``), a caller must also present a client certificate signed by the
deployment's CA; the identity and role still come from the token (``pyarrow.flight`` does not expose
the peer certificate to Python handlers).

The token's role decides what a call may do (:data:`GRANTS`); a :class:`RateLimiter` bounds each
identity's request rate. Every refusal is audited when core has an audit log; failed logins are
throttled per peer address and audited as counted entries (:class:`RefusedLogins`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow.flight as flight

from hyprstream.errors import AuthError

from hyprstream.core.ratelimit import RateLimiter, RateLimitPolicy

if TYPE_CHECKING:
    from hyprstream.core.audit import AuditEntry, AuditLog
    from hyprstream.core.signing import Ed25519PublicKey

log = logging.getLogger("hyprstream.core")


class Role(enum.Enum):
    FOG = "fog"  # pull weights, push deltas
    READER = "reader"  # pull weights, read lineage
    AUDITOR = "auditor"  # read the audit log
    ADMIN = "admin"  # everything


class Permission(enum.Enum):
    READ = "read"
    PUSH = "push"
    REGISTER = "register"
    AUDIT_READ = "audit_read"
    ISSUE_TOKEN = "issue_token"
    REVOKE_TOKEN = "revoke_token"


GRANTS: Mapping[Role, frozenset[Permission]] = {
    Role.FOG: frozenset({Permission.READ, Permission.PUSH}),
    Role.READER: frozenset({Permission.READ}),
    Role.AUDITOR: frozenset({Permission.AUDIT_READ}),
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
    """Known static-token digests and the principal each one authenticates."""

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._by_digest: dict[str, Principal] = {}
        for token_digest, principal in entries:
            self._by_digest[token_digest] = principal

    def add(self, token: str, principal: Principal) -> None:
        self._by_digest[digest(token)] = principal

    def authenticate(self, token: str) -> Principal | None:
        d = digest(token)
        found = None
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, d):
                found = principal
        return found


class Authenticator:
    """Turns a bearer token into a :class:`Principal`, or raises AuthError saying why not."""

    def __init__(self, registry: TokenRegistry | None = None, token_keys: Iterable[Ed25519PublicKey] = (), *,
                 clock: Callable[[], float] = time.time, revoked: set[str] | None = None) -> None:
        self.registry = registry or TokenRegistry()
        self.token_keys = list(token_keys)
        self.revoked: set[str] = set() if revoked is None else revoked  # jti of signed tokens refused from now on
        self._clock = clock

    def with_token_key(self, key: Ed25519PublicKey) -> Authenticator:
        """A copy that also accepts tokens signed by ``key`` (sharing the set of revoked tokens)."""
        from hyprstream.core.signing import fingerprint

        known = {fingerprint(k) for k in self.token_keys}
        keys = self.token_keys if fingerprint(key) in known else [*self.token_keys, key]
        return Authenticator(self.registry, keys, clock=self._clock, revoked=self.revoked)

    def revoke(self, jti: str) -> bool:
        """Refuse the signed token ``jti`` from now on; False when it already was."""
        if jti in self.revoked:
            return False
        self.revoked.add(jti)
        return True

    def authenticate(self, token: str) -> Principal:
        from hyprstream.core import tokens

        if tokens.looks_signed(token):
            if not self.token_keys:
                raise AuthError("signed tokens are not enabled on this core")
            claims = tokens.verify(token, self.token_keys, now=self._clock())
            if claims.jti in self.revoked:
                raise AuthError(f"token revoked (jti {claims.jti})")
            return claims.principal
        principal = self.registry.authenticate(token)
        if principal is None:
            raise AuthError("invalid token")
        return principal


@dataclass(frozen=True)
class Refusal:
    """A failed login: who the caller claimed to be (never trusted), why it failed, on which method."""

    actor: str
    reason: str
    method: str


def revoked_tokens(entries: Iterable[AuditEntry]) -> set[str]:
    """The jti of every token revoked in an audit log (its ``token.revoke`` entries)."""
    return {str(e.details["jti"]) for e in entries if e.action == "token.revoke" and e.outcome == "ok"}


class _AuthMiddleware(flight.ServerMiddleware):
    def __init__(self, principal: Principal | None, refusal: Refusal | None = None) -> None:
        self.principal = principal
        self.refusal = refusal


def claimed_identity(token: str) -> str:
    """Who a refused caller claimed to be, for the audit log (never trusted)."""
    from hyprstream.core import tokens

    sub = tokens.unverified_subject(token) if tokens.looks_signed(token) else None
    return f"unverified:{sub}" if sub else "anonymous"


def peer_address(peer: str | bytes | None) -> str:
    """The address part of a gRPC peer (``ipv4:10.0.0.7:53122`` -> ``10.0.0.7``, ``ipv6:[::1]:5`` -> ``::1``)."""
    text = peer.decode(errors="replace") if isinstance(peer, bytes) else (peer or "")
    kind, sep, rest = text.partition(":")
    if not sep:
        return text or "unknown"
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].partition("]")[0]
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return text


@dataclass
class _Window:
    """The failed logins of one peer address since ``start``, beyond the first (which is audited at once)."""

    start: float
    first_wall: float
    count: int = 0
    reasons: Counter = field(default_factory=Counter)
    claimed: Counter = field(default_factory=Counter)
    methods: Counter = field(default_factory=Counter)


MAX_TALLY = 8  # distinct reasons / claimed identities named in one counted entry; the rest are "(other)"
MAX_PEERS = 10_000  # peer windows held at once; beyond it all are written out


def _tally(counter: Counter) -> dict[str, int]:
    top = dict(counter.most_common(MAX_TALLY))
    rest = sum(counter.values()) - sum(top.values())
    return {**top, "(other)": rest} if rest else top


class RefusedLogins:
    """Failed logins, per peer address: throttled, and audited without letting them grow the log.

    The first failed login of an address in a window of ``refusal_window_s`` is audited at once
    (``auth.refused`` with ``count`` 1); the later ones in that window are counted, and written as one
    ``auth.refused`` entry whose ``count`` says how many, with the reasons, claimed identities and
    methods tallied, when the window has passed (at the next audited call or failed login) or at
    :meth:`flush`. The counts of an address's entries add up to its failed logins. Beyond
    ``refused_login_burst`` failed logins (refilled at ``refused_logins_per_s``), an address's failed
    logins are answered ``too many refused logins``; a valid token from it is still served.
    """

    def __init__(self, audit: AuditLog | None, policy: RateLimitPolicy | None, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.audit = audit
        self.window_s = (policy or RateLimitPolicy()).refusal_window_s
        self.limiter = None if policy is None else RateLimiter(
            RateLimitPolicy(requests_per_s=policy.refused_logins_per_s, burst=policy.refused_login_burst),
            clock=clock)
        self._clock, self._wall = clock, wall
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def refuse(self, refusal: Refusal, peer: str) -> flight.FlightError:
        """Record a failed login from ``peer``; the error to answer it with."""
        log.warning("refused %s call from %s at %s: %s", refusal.method, refusal.actor, peer, refusal.reason)
        with self._lock:
            now = self._clock()
            self._write_due(now)
            window = self._windows.get(peer)
            if window is None:
                if len(self._windows) >= MAX_PEERS:
                    self._write_due(None)
                self._windows[peer] = _Window(now, self._wall())
                self._append(refusal.actor, {"method": refusal.method, "reason": refusal.reason, "peer": peer,
                                             "count": 1})
            else:
                window.count += 1
                window.reasons[refusal.reason] += 1
                window.claimed[refusal.actor] += 1
                window.methods[refusal.method] += 1
            retry = None if self.limiter is None else self.limiter.check(peer)
        if retry is not None:
            return flight.FlightUnavailableError(f"too many refused logins from {peer!r}: retry in {retry:.2f} s")
        return flight.FlightUnauthenticatedError(refusal.reason)

    def flush(self, *, all_windows: bool = False) -> None:
        """Write the counted entries of windows that have passed (of every window: ``all_windows``)."""
        if not self._windows:  # the common case, on every audited call: nothing to do
            return
        with self._lock:
            self._write_due(None if all_windows else self._clock())

    def _write_due(self, now: float | None) -> None:
        for peer in [p for p, w in self._windows.items() if now is None or now - w.start >= self.window_s]:
            w = self._windows.pop(peer)
            if w.count:
                self._append("anonymous", {
                    "peer": peer, "count": w.count, "since": round(w.first_wall, 3), "until": round(self._wall(), 3),
                    "reasons": _tally(w.reasons), "claimed": _tally(w.claimed), "methods": dict(w.methods)})

    def _append(self, actor: str, details: dict) -> None:
        if self.audit is None:
            return
        from hyprstream.core.audit import AuditError, Outcome

        try:
            self.audit.append(actor, "auth.refused", "core", outcome=Outcome.REFUSED, details=details)
        except AuditError as exc:  # the login is refused either way
            log.error("audit log unavailable: %s", exc)


# methods with a Python handler: a failed login there is refused by the handler, where the peer is known
_HANDLED = frozenset({"list_flights", "get_flight_info", "do_get", "do_put", "do_action", "list_actions",
                      "do_exchange"})
# refused here: pyarrow answers any exception of a get_schema handler with the handler's traceback
_UNSERVED = frozenset({"get_schema"})


class BearerAuthFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call's bearer token and bounds each identity's rate; exposes the principal to handlers.

    A failed login is not refused here but in :meth:`admit`, which every handler calls first: only
    there is the caller's address known (``context.peer()``), which throttling and auditing key on.
    """

    def __init__(self, authenticator: Authenticator | TokenRegistry, *, limiter: RateLimiter | None = None,
                 audit: AuditLog | None = None) -> None:
        self.authenticator = (authenticator if isinstance(authenticator, Authenticator)
                              else Authenticator(authenticator))
        self.limiter = limiter
        self.audit = audit
        self.refused = RefusedLogins(audit, limiter.policy if limiter is not None else None)

    def _refuse(self, actor: str, action: str, method: str, reason: str, **details) -> None:
        log.warning("refused %s call from %s: %s", method, actor, reason)
        if self.audit is not None:
            from hyprstream.core.audit import AuditError, Outcome

            try:
                self.audit.append(actor, action, "core", outcome=Outcome.REFUSED,
                                  details={"method": method, "reason": reason, **details})
            except AuditError as exc:  # the call is refused either way
                log.error("audit log unavailable: %s", exc)

    def _login(self, headers) -> Principal | Refusal:
        values = headers.get("authorization") or headers.get("Authorization") or []
        if not values:
            return Refusal("anonymous", "missing credentials: send 'authorization: Bearer <token>'", "")
        scheme, _, token = values[0].partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Refusal("anonymous", "malformed authorization header: expected 'Bearer <token>'", "")
        try:
            try:
                return self.authenticator.authenticate(token)
            except AuthError as exc:
                return Refusal(claimed_identity(token), str(exc), "")
        except Exception:  # noqa: BLE001 - the last resort: the caller learns an id, core's log the traceback
            incident = secrets.token_hex(6)
            log.error("internal error %s while checking a token", incident, exc_info=True)
            return Refusal("anonymous", f"internal error {incident} while checking the token", "")

    def start_call(self, info, headers):
        method = str(info.method).rsplit(".", 1)[-1].lower()
        login = self._login(headers)
        if isinstance(login, Refusal):
            refusal = Refusal(login.actor, login.reason, method)
            if method in _HANDLED:
                return _AuthMiddleware(None, refusal)
            raise self.refuse_login(refusal, "unknown")
        if method in _UNSERVED:
            reason = f"core does not serve {method} (see docs/api.md)"
            self._refuse(login.identity, "request.refused", method, reason, request=method)
            raise flight.FlightServerError(f"invalid argument: {reason}")
        if self.limiter is not None:
            retry = self.limiter.check(login.identity)
            if retry is not None:
                reason = f"rate limit exceeded for {login.identity!r}: retry in {retry:.2f} s"
                self._refuse(login.identity, "rate.limited", method, reason)
                raise flight.FlightUnavailableError(reason)
        return _AuthMiddleware(login)

    def admit(self, context: flight.ServerCallContext) -> Principal:
        """The caller's principal; a failed login is refused here, with the caller's address."""
        middleware = context.get_middleware("auth")
        if middleware is None:
            raise flight.FlightUnauthenticatedError("unauthenticated")
        if middleware.refusal is not None:
            raise self.refuse_login(middleware.refusal, peer_address(context.peer()))
        return middleware.principal

    def refuse_login(self, refusal: Refusal, peer: str) -> flight.FlightError:
        """Throttle and audit a failed login from ``peer`` (see :class:`RefusedLogins`); the error to raise."""
        return self.refused.refuse(refusal, peer)


def principal_of(context: flight.ServerCallContext) -> Principal:
    middleware = context.get_middleware("auth")
    if middleware is None or middleware.principal is None:  # handlers admit the caller before they run
        raise flight.FlightUnauthenticatedError("unauthenticated")
    return middleware.principal
