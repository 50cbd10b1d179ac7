"""The retry value: exact delays from an injected random source; the caller owns the loop."""

from __future__ import annotations

import pytest

from agent.retry import CAS_RETRY, KEY_RETRY, Retry


def test_increment_is_pure_and_counts_to_exhaustion() -> None:
    r = Retry(total=2)
    r1 = r.increment("lost")
    assert r.history == () and r1.history == ("lost",)
    assert not r1.exhausted and not r1.increment().exhausted
    assert r1.increment().increment().exhausted
    assert r.attempts == 3


def test_backoff_is_exponential_capped_and_jittered_exactly() -> None:
    slept: list[float] = []
    r = Retry(total=10, backoff_factor=0.1, backoff_max=0.5, jitter=0.5,
              rand=lambda: 0.5, sleeper=slept.append)
    delays = []
    for _ in range(5):
        r = r.increment()
        delays.append(r.backoff_s())
        r.sleep()
    # base 0.1, 0.2, 0.4, 0.5 (cap), 0.5; scaled by 1 - 0.5 + 0.5 * 0.5 = 0.75
    assert delays == pytest.approx([0.075, 0.15, 0.3, 0.375, 0.375])
    assert slept == pytest.approx(delays)


def test_full_jitter_spreads_between_zero_and_the_base() -> None:
    lo = Retry(backoff_factor=0.2, rand=lambda: 0.0).increment()
    hi = Retry(backoff_factor=0.2, rand=lambda: 1.0).increment()
    assert (lo.backoff_s(), hi.backoff_s()) == (0.0, pytest.approx(0.2))


def test_no_sleep_before_the_first_retry_nor_without_a_factor() -> None:
    slept: list[float] = []
    Retry(sleeper=slept.append).sleep()
    KEY_RETRY.with_source(sleeper=slept.append).increment().sleep()
    assert slept == []


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError):
        Retry(total=-1)
    with pytest.raises(ValueError):
        Retry(jitter=1.5)


def test_the_cas_policy_backs_off() -> None:
    r = CAS_RETRY.with_source(rand=lambda: 1.0).increment().increment().increment()
    assert r.backoff_s() > 0 and not r.exhausted
