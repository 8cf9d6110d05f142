"""Per-identity rate limits: one token bucket per caller.

:class:`TokenBucket` is pure (time is passed in); :class:`RateLimiter` keeps one per identity. A bucket
holds at most ``burst`` tokens, refills at ``rate`` tokens per second, and every request takes one, so
over any interval of ``t`` seconds a caller gets at most ``burst + rate * t`` requests through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hyprstream.config import Checked, setting


@dataclass(frozen=True)
class RateLimitPolicy(Checked):
    requests_per_s: float = setting(50.0, gt=0.0, doc="sustained requests per second per identity")
    burst: int = setting(100, ge=1, doc="requests an idle identity may make at once")
    refused_logins_per_s: float = setting(1.0, gt=0.0, doc="sustained refused logins per second per peer address; "
                                                           "beyond it a peer's failed logins are refused unread")
    refused_login_burst: int = setting(20, ge=1, doc="refused logins a peer address may have at once")
    refusal_window_s: float = setting(60.0, gt=0.0, doc="refused logins of one peer address within this many "
                                                        "seconds are audited as one counted entry")


@dataclass(frozen=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float, cost: float = 1.0) -> tuple[bool, float, TokenBucket]:
        """``(allowed, retry_after_s, bucket after)``; time never runs backwards for a bucket."""
        now = max(now, self.updated)
        tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        if tokens >= cost:
            return True, 0.0, TokenBucket(self.rate, self.burst, tokens - cost, now)
        return False, (cost - tokens) / self.rate, TokenBucket(self.rate, self.burst, tokens, now)


class RateLimiter:
    """Thread-safe buckets keyed by identity."""

    def __init__(self, policy: RateLimitPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def check(self, identity: str) -> float | None:
        """None when the request may go ahead, else the seconds after which it would."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(identity) or TokenBucket.full(
                self.policy.requests_per_s, self.policy.burst, now)
            allowed, retry, self._buckets[identity] = bucket.take(now)
        return None if allowed else retry
