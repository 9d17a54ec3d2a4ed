from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvc.api import names


def test_short_names_are_kept_as_they_are() -> None:
    assert names.bounded_name("datasets", "cifar100", "0a1b2c") == "datasets-cifar100-0a1b2c"


def test_long_names_are_cut_and_end_with_a_hash_of_the_whole() -> None:
    long = names.bounded_name("a" * 60, "volume")
    assert len(long) == 63
    assert names.is_dns_label(long)
    assert long != names.bounded_name("a" * 60, "volume2")


def test_invalid_characters_are_replaced() -> None:
    assert names.bounded_name("Team.A", "My_Volume") == "team-a-my-volume"


@given(st.lists(st.text(min_size=0, max_size=300), min_size=1, max_size=5), st.integers(min_value=20, max_value=253))
def test_bounded_name_is_always_a_valid_dns_label_within_bounds(parts: list[str], max_length: int) -> None:
    name = names.bounded_name(*parts, max_length=max_length)
    assert 0 < len(name) <= max_length
    assert name == name.lower()
    assert not name.startswith("-")
    assert not name.endswith("-")


@given(st.text(min_size=64, max_size=200, alphabet="abc"), st.text(min_size=64, max_size=200, alphabet="abc"))
def test_distinct_long_inputs_do_not_collide(first: str, second: str) -> None:
    if first != second:
        assert names.bounded_name(first) != names.bounded_name(second)
