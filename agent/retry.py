"""Retry as a value, for the compare-and-swap loops (budget, membership marker, events).

Shaped like urllib3's ``Retry``: a frozen value; ``increment(reason)`` returns a new
one with the history appended; ``exhausted`` and ``backoff_s()`` only compute; only
``sleep()`` sleeps, and the caller owns the loop::

    retry = CAS_RETRY
    while True:
        try:
            return attempt()
        except PreconditionFailed as exc:   # lost the race: re-read, back off, try again
            retry = retry.increment(str(exc))
            if retry.exhausted:
                raise ...
            retry.sleep()

The backoff is exponential with jitter (``backoff_factor * 2**(n-1)``, capped at
``backoff_max``, then scaled by a random factor in ``[1 - jitter, 1]``): racers that
lost together do not come back together. The random source and the sleep are
injected, so a test asserts exact delays and a simulation runs on virtual time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Retry:
    total: int = 8  # retries after the first attempt
    backoff_factor: float = 0.02  # seconds before the first retry (before jitter)
    backoff_max: float = 1.0
    jitter: float = 1.0  # 1.0: "full jitter"; 0.0: none
    history: tuple[str, ...] = ()
    rand: Callable[[], float] = field(default=random.random, compare=False, repr=False)
    sleeper: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.total < 0 or self.backoff_factor < 0 or self.backoff_max < 0:
            raise ValueError(f"retry values must be >= 0: {self!r}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    @property
    def attempts(self) -> int:
        """How many attempts this policy allows in all (the first one and the retries)."""
        return self.total + 1

    def increment(self, reason: str = "") -> Retry:
        """The same policy after one more failed attempt (pure)."""
        return replace(self, history=(*self.history, reason))

    @property
    def exhausted(self) -> bool:
        return len(self.history) > self.total

    def backoff_s(self) -> float:
        """How long to wait before the next attempt (pure given ``rand``)."""
        n = len(self.history)
        if n == 0 or self.backoff_factor == 0:
            return 0.0
        base = min(self.backoff_max, self.backoff_factor * (2 ** (n - 1)))
        return base * (1.0 - self.jitter + self.jitter * self.rand())

    def sleep(self) -> None:
        delay = self.backoff_s()
        if delay > 0:
            self.sleeper(delay)

    def with_source(self, *, rand: Callable[[], float] | None = None,
                    sleeper: Callable[[float], None] | None = None) -> Retry:
        """The same policy drawing on another random source or sleeping on another clock."""
        return replace(self, rand=rand or self.rand, sleeper=sleeper or self.sleeper)


# Compare-and-swap races: lost only to a peer that just won, so retry soon, spread out.
CAS_RETRY = Retry(total=8, backoff_factor=0.02, backoff_max=1.0)
# Event keys collide only on the same microsecond and 32 random bits: retry at once.
KEY_RETRY = Retry(total=2, backoff_factor=0.0)
