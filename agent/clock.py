"""Injectable time: a ``Clock`` for the wall and monotonic clocks, and ``Deadline``.

Decisions never read the clock themselves; adapters pass time in. Tests use
``FakeClock`` and assert exact timings without sleeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.errors import DeadlineExceeded


class Clock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


@dataclass
class FakeClock(Clock):
    now: float = 1_000_000.0
    mono: float = 100.0
    slept: list[float] = field(default_factory=list)

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


SYSTEM_CLOCK = Clock()


@dataclass
class Deadline:
    """An absolute point on the monotonic clock; everything under it asks ``remaining()``."""

    at: float
    what: str = "boot"
    clock: Clock = SYSTEM_CLOCK

    @classmethod
    def after(cls, seconds: float, what: str = "boot", clock: Clock = SYSTEM_CLOCK) -> Deadline:
        return cls(clock.monotonic() + seconds, what, clock)

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0

    def check(self, doing: str = "") -> float:
        left = self.remaining()
        if left <= 0:
            suffix = f" while {doing}" if doing else ""
            raise DeadlineExceeded(f"{self.what} deadline exceeded{suffix}")
        return left

    def cap(self, timeout: float) -> float:
        """A per-call timeout that never outlives the deadline."""
        return max(0.001, min(timeout, self.check()))
