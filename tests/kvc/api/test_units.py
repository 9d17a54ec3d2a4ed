from __future__ import annotations

import pytest

from kvc.api.units import parse_duration, parse_quantity


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5Gi", 5 * 2**30),
        ("500Mi", 500 * 2**20),
        ("1G", 10**9),
        ("1.5Ki", 1536),
        ("100", 100),
        ("1e3", 1000),
        ("1500m", 2),
    ],
)
def test_quantities(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "5 Gi", "Gi", "5GB", "-1Gi", "five"])
def test_bad_quantities_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="is not a quantity such as 500Mi or 5Gi"):
        parse_quantity(text)


@pytest.mark.parametrize("text", ["9e999999", "1e31Ei"])
def test_absurd_quantities_are_refused_at_once(text: str) -> None:
    with pytest.raises(ValueError, match="is too large a quantity"):
        parse_quantity(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("10m", 600), ("1h30m", 5400), ("500ms", 0.5), ("1.5h", 5400)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "ten minutes", "1h 30m", "5d"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="Go duration"):
        parse_duration(text)
