"""Signed expiring tokens and per-identity token buckets (pure pieces)."""

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyprstream.core import signing, tokens
from hyprstream.core.auth import Authenticator, Principal, Role, TokenRegistry
from hyprstream.core.ratelimit import RateLimiter, RateLimitPolicy, TokenBucket
from hyprstream.errors import AuthError, ValidationError

pytestmark = pytest.mark.unit

KEY = signing.generate_key()
NOW = 1_800_000_000


def test_round_trip_and_claims():
    token, claims = tokens.issue(KEY, "fog-a", Role.FOG, ttl_s=60, now=NOW)
    assert token.startswith("hst1.") and token.count(".") == 2
    got = tokens.verify(token, KEY.public_key(), now=NOW + 59)
    assert got == claims and got.principal == Principal("fog-a", Role.FOG)
    assert (got.iat, got.exp) == (NOW, NOW + 60) and len(got.jti) == 16
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload == {"sub": "fog-a", "role": "fog", "iat": NOW, "exp": NOW + 60, "jti": got.jti}


def test_expired_forged_and_malformed_tokens_are_refused_with_the_reason():
    token, _ = tokens.issue(KEY, "fog-a", Role.FOG, ttl_s=60, now=NOW)
    with pytest.raises(AuthError, match="token expired"):
        tokens.verify(token, KEY.public_key(), now=NOW + 60)
    with pytest.raises(AuthError, match="signature is not valid"):
        tokens.verify(token, signing.generate_key().public_key(), now=NOW)
    head, claims, sig = token.split(".")
    raised = base64.urlsafe_b64encode(json.dumps(
        {"sub": "fog-a", "role": "admin", "iat": NOW, "exp": NOW + 60, "jti": "x"}).encode()).decode().rstrip("=")
    with pytest.raises(AuthError, match="signature is not valid"):
        tokens.verify(f"{head}.{raised}.{sig}", KEY.public_key(), now=NOW)  # role escalation
    for bad in ("hst1.abc", "jwt.a.b", "hst1.!!!.???", "hst1." + "a" * 5000 + ".b"):
        with pytest.raises(AuthError, match="malformed"):
            tokens.verify(bad, KEY.public_key(), now=NOW)


def test_issue_checks_its_input():
    with pytest.raises(ValidationError):
        tokens.issue(KEY, "no spaces", Role.FOG, ttl_s=60, now=NOW)
    with pytest.raises(ValidationError):
        tokens.issue(KEY, "fog-a", Role.FOG, ttl_s=0, now=NOW)


def test_authenticator_takes_signed_and_static_tokens():
    registry = TokenRegistry()
    registry.add("static-secret", Principal("sim", Role.ADMIN))
    auth = Authenticator(registry, [KEY.public_key()], clock=lambda: NOW)
    token, _ = tokens.issue(KEY, "dash", Role.READER, ttl_s=5, now=NOW)
    assert auth.authenticate(token) == Principal("dash", Role.READER)
    assert auth.authenticate("static-secret") == Principal("sim", Role.ADMIN)
    with pytest.raises(AuthError, match="invalid token"):
        auth.authenticate("other")
    with pytest.raises(AuthError, match="not enabled"):
        Authenticator(registry).authenticate(token)
    assert tokens.unverified_subject(token) == "dash" and tokens.unverified_subject("hst1.zz.zz") is None


def test_bucket_hand_computed():
    b = TokenBucket.full(rate=2.0, burst=3, now=0.0)
    results = []
    for t in (0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.5):
        ok, retry, b = b.take(t)
        results.append((ok, round(retry, 6)))
    assert results == [(True, 0), (True, 0), (True, 0), (False, 0.5), (False, 0.25), (True, 0), (False, 0.5)]


@given(st.floats(0.1, 100), st.integers(1, 20), st.lists(st.floats(0, 10), min_size=1, max_size=200))
def test_bucket_never_allows_more_than_burst_plus_rate_times_time(rate, burst, gaps):
    b = TokenBucket.full(rate, burst, 0.0)
    t, allowed = 0.0, 0
    for gap in gaps:
        t += gap
        ok, retry, b = b.take(t)
        allowed += ok
        assert ok or retry > 0
        assert allowed <= burst + rate * t + 1e-9


def test_limiter_is_per_identity():
    now = [0.0]
    limiter = RateLimiter(RateLimitPolicy(requests_per_s=1.0, burst=2), clock=lambda: now[0])
    assert [limiter.check("a") for _ in range(3)] == [None, None, pytest.approx(1.0)]
    assert limiter.check("b") is None  # another identity has its own bucket
    now[0] = 1.0
    assert limiter.check("a") is None


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_a_token_whose_signature_is_respelt_is_refused():
    token, _ = tokens.issue(KEY, "fog-a", Role.FOG, ttl_s=60, now=NOW)
    head, claims, sig = token.split(".")
    respelt = sig[:-1] + B64URL[B64URL.index(sig[-1]) ^ 1]  # same 64 bytes: only unused bits differ
    assert base64.urlsafe_b64decode(respelt + "==") == base64.urlsafe_b64decode(sig + "==")
    for bad in (f"{head}.{claims}.{respelt}", f"{head}.{claims}.{sig}==", f"{head}.{claims}=.{sig}"):
        with pytest.raises(AuthError, match="malformed token: not base64url"):
            tokens.verify(bad, KEY.public_key(), now=NOW)
    assert tokens.verify(token, KEY.public_key(), now=NOW).sub == "fog-a"


def _sign_claims(claims: dict) -> str:
    """A token over ``claims`` signed with KEY, as a key holder could make without tokens.issue."""
    signed = f"hst1.{base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip('=')}"
    return f"{signed}.{base64.urlsafe_b64encode(KEY.sign(signed.encode())).decode().rstrip('=')}"


@pytest.mark.parametrize("sub", ["core", "anonymous", "cli", "Core"])
def test_reserved_identities_are_never_issued_nor_accepted(sub):
    with pytest.raises(ValidationError, match=f"identity {sub!r} is reserved"):
        tokens.issue(KEY, sub, Role.ADMIN, ttl_s=60, now=NOW)
    forged = _sign_claims({"sub": sub, "role": "admin", "iat": NOW, "exp": NOW + 60, "jti": "a" * 16})
    with pytest.raises(AuthError, match=f"identity {sub!r} is reserved"):
        tokens.verify(forged, KEY.public_key(), now=NOW)


def test_lifetimes_are_capped_at_issue_and_at_verification():
    assert tokens.MAX_TTL_S == 366 * 86400
    _, claims = tokens.issue(KEY, "fog-a", Role.FOG, ttl_s=tokens.MAX_TTL_S, now=NOW)
    assert claims.exp - claims.iat == tokens.MAX_TTL_S
    for ttl in (tokens.MAX_TTL_S + 1, 100 * 365 * 86400):
        with pytest.raises(ValidationError, match="token lifetime must be at most 366 days"):
            tokens.issue(KEY, "fog-a", Role.FOG, ttl_s=ttl, now=NOW)
    long = _sign_claims({"sub": "fog-a", "role": "fog", "iat": NOW, "exp": NOW + tokens.MAX_TTL_S + 1,
                         "jti": "b" * 16})
    with pytest.raises(AuthError, match="token lifetime exceeds 366 days"):
        tokens.verify(long, KEY.public_key(), now=NOW)
