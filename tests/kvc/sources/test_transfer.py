from __future__ import annotations

from kvc.sources.transfer import retry_delay


def test_retries_wait_twice_as_long_each_time_up_to_fifteen_seconds() -> None:
    assert [retry_delay(attempt) for attempt in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
