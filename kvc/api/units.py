"""Parsing Kubernetes quantities ("5Gi") and Go durations ("1h30m") as users write them."""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([+]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


_MAX_DIGITS = 30


def parse_quantity(text: str) -> int:
    """Bytes in a quantity such as 500Mi, 5Gi, 1.5G or 1e9 (rounded up)."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a quantity such as 500Mi or 5Gi")
    number, suffix = match.groups()
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a quantity such as 500Mi or 5Gi") from None
    # Kubernetes itself caps quantities near 2**63; an exponent such as 9e999999 would take
    # tens of seconds of CPU to turn into an integer.
    if value.adjusted() > _MAX_DIGITS:
        raise ValueError(f"{text!r} is too large a quantity")
    scaled = value / 1000 if suffix == "m" else value * (_BINARY.get(suffix or "") or _DECIMAL[suffix or ""])
    return int(scaled.to_integral_value(rounding=ROUND_CEILING))


def parse_duration(text: str) -> float:
    """Seconds in a Go duration such as 90s, 10m or 1h30m."""
    remaining = text.strip()
    if not remaining:
        raise ValueError("empty duration: use a Go duration such as 90s, 10m or 1h30m")
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(remaining):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(remaining):
        raise ValueError(f"{text!r} is not a Go duration such as 90s, 10m or 1h30m")
    return total
