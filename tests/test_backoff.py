"""The one retry delay (gateway/backoff.py): jittered, growing, capped, never a busy loop."""

from __future__ import annotations

import random

from gateway.backoff import MIN_S, backoff


def test_backoff_grows_is_jittered_and_capped() -> None:
    random.seed(14)
    first = [backoff(1) for _ in range(200)]
    assert all(MIN_S <= d <= 0.75 for d in first) and len(set(first)) > 100
    late = [backoff(30) for _ in range(200)]
    assert all(MIN_S <= d <= 30.0 for d in late) and max(late) > 20
    assert all(d <= 10.0 for d in (backoff(30, cap=10.0) for _ in range(200)))


def test_backoff_after_hours_of_retries_does_not_overflow() -> None:
    # watch used 1.5 ** attempt unbounded: an OverflowError after ~1,750 reconnects
    assert MIN_S <= backoff(10_000, cap=10.0) <= 10.0
