"""What `kvc status` and `kvc datasets` print: pure functions from VolumeManager objects (and the
controller's heartbeat Lease) to text.

Objects come from the API server as plain mappings. Everything here reads them defensively:
a status written by an older controller, or none yet, still renders.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from kvc.api import names

# The phase an agent reports for a replica once its data is complete and verified.
NODE_READY = "Ready"
PROGRESS_WIDTH = 20
COLUMN_GAP = "   "
NOT_REPORTED = "-"

_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SELECTOR_FORMS = "use key=value, key!=value, key (has the label) or !key (lacks it), separated by commas"
_UNITS = ("kB", "MB", "GB", "TB", "PB", "EB")


# --------------------------------------------------------------------------- text


def human_bytes(count: int) -> str:
    """A byte count in decimal units: 512 B, 72.0 MB, 1.6 GB."""
    if count < 1000:
        return f"{count} B"
    value = count / 1000
    for unit in _UNITS[:-1]:
        if round(value, 1) < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} {_UNITS[-1]}"


def progress_bar(done: int, total: int | None, width: int = PROGRESS_WIDTH) -> str:
    """``[#########-----------]  45%``; ``total`` None: size not known yet; 0: nothing to fetch."""
    if width < 1:
        raise ValueError(f"a progress bar needs a width of at least 1, not {width}")
    if total is None:
        return f"[{'.' * width}]    ?"
    if total <= 0:
        done, total = 1, 1
    done = min(max(done, 0), total)
    # Integer arithmetic: the bar is full and shows 100% only when every byte is there.
    filled = done * width // total
    return f"[{'#' * filled}{'-' * (width - filled)}] {done * 100 // total:>3}%"


def human_age(seconds: float) -> str:
    """A duration as kubectl shows ages: 45s, 95s, 2m30s, 12m, 5h20m, 3d4h, 20d (negative: 0s)."""
    total = max(int(seconds), 0)
    if total < 120:
        return f"{total}s"
    if total < 10 * 60:
        return _two_units(total, (60, "m"), (1, "s"))
    if total < 3 * 3600:
        return f"{total // 60}m"
    if total < 8 * 3600:
        return _two_units(total, (3600, "h"), (60, "m"))
    if total < 48 * 3600:
        return f"{total // 3600}h"
    return _two_units(total, (86400, "d"), (3600, "h")) if total < 8 * 86400 else f"{total // 86400}d"


def _two_units(total: int, unit: tuple[int, str], smaller: tuple[int, str]) -> str:
    """``2m30s``; ``2m`` when the smaller unit counts none."""
    rest = total % unit[0] // smaller[0]
    return f"{total // unit[0]}{unit[1]}" + (f"{rest}{smaller[1]}" if rest else "")


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns, kubectl style (no trailing spaces)."""
    return "\n".join(_aligned([list(headers), *([_one_line(cell) for cell in row] for row in rows)]))


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max((len(row[i]) for row in rows if i < len(row)), default=0) for i in range(max(map(len, rows)))]
    return [COLUMN_GAP.join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _one_line(value: object) -> str:
    # Messages come from the cluster (and from S3 servers' errors): no line breaks or
    # terminal control sequences get through to the user's terminal.
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in str(value))


# --------------------------------------------------------------------------- reading objects


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _mappings(value: object) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _count(value: object) -> int:
    """A non-negative integer from a status field; 0 when missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    try:
        return max(int(float(value)), 0)
    except (ValueError, OverflowError):
        return 0


def _text(value: object, default: str = NOT_REPORTED) -> str:
    return _one_line(value) if value not in (None, "") else default


def _replicas(volume_status: Mapping[str, Any]) -> str:
    replicas = volume_status.get("replicas")
    if not isinstance(replicas, Mapping):
        return NOT_REPORTED
    return f"{_count(replicas.get('ready'))}/{_count(replicas.get('desired'))}"


def _labels(labels: Mapping[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or NOT_REPORTED


def _timestamp(value: object) -> dt.datetime | None:
    """A Time or MicroTime field (RFC 3339), in UTC; None when missing or malformed."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment


def _volume_statuses(vm: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(v.get("id")): v for v in _mappings(_mapping(vm.get("status")).get("volumes"))}


# --------------------------------------------------------------------------- kvc status


@dataclass(frozen=True)
class HeartbeatUnreadable:
    """The controller's Lease could not be read: ``reason`` says why (e.g. forbidden)."""

    reason: str


def controller_heartbeat(
    lease: Mapping[str, Any] | HeartbeatUnreadable | None, now: dt.datetime, namespace: str = names.KVC_NAMESPACE
) -> str:
    """What the controller's heartbeat Lease says of it (``None``: there is none in ``namespace``).

    ``now`` should be the API server's time (its answer's Date), not the reader's clock: the
    controller's renewals are timed by the cluster's clocks, and a laptop's may be off.
    Stale when the last renewal is older than the Lease's duration. A restart is any change of
    holder (a new pod, or a new process in the same pod), counted in ``leaseTransitions``.
    """
    if isinstance(lease, HeartbeatUnreadable):
        return f"heartbeat not readable ({_one_line(lease.reason)})"
    if lease is None:
        return (
            "no heartbeat found (is the KVC controller running?"
            f" no Lease {names.CONTROLLER_LEASE} in namespace {_one_line(namespace)})"
        )
    spec = _mapping(lease.get("spec"))
    holder = _text(spec.get("holderIdentity"), "an unknown holder")
    duration = _count(spec.get("leaseDurationSeconds")) or names.CONTROLLER_LEASE_SECONDS
    renewed = _timestamp(spec.get("renewTime"))
    # Whole seconds, as shown: "renewed 30s ago" is still fresh with a 30-second Lease.
    age = None if renewed is None else int((now - renewed).total_seconds())
    if age is None or age > duration:
        when = "never renewed" if age is None else f"last renewed {human_age(age)} ago"
        return f"NOT RENEWING - {when} by {holder}: the controller may be down; this status may be stale"
    details = [f"{holder}, renewed {human_age(age)} ago"]
    acquired = _timestamp(spec.get("acquireTime"))
    if acquired is not None:
        details.append(f"started {human_age((now - acquired).total_seconds())} ago")
    restarts = _count(spec.get("leaseTransitions"))
    details.append(f"restarted {restarts} time{'' if restarts == 1 else 's'}")
    return f"running ({'; '.join(details)})"


def status_report(vm: Mapping[str, Any], controller: str | None = None) -> str:
    """A VolumeManager's state, then one line per volume and, under it, its nodes or its claim.

    ``controller``: what ``controller_heartbeat`` says, shown under the state.
    """
    metadata = _mapping(vm.get("metadata"))
    status = _mapping(vm.get("status"))
    lines = [f"VolumeManager {_text(metadata.get('name'))} in namespace {_text(metadata.get('namespace'))}"]
    if status:
        lines.append(f"State:    {_text(status.get('state'))}")
        lines.append(f"Message:  {_text(status.get('message'))}")
    else:
        lines.append("State:    not reported yet (is the KVC controller running?)")
    if controller is not None:
        lines.append(f"Controller: {_one_line(controller)}")
    observed, generation = status.get("observedGeneration"), metadata.get("generation")
    if isinstance(observed, int) and isinstance(generation, int) and observed < generation:
        lines.append(
            f"Note:     this status describes generation {observed}; the spec is at generation {generation}"
            " (the controller has not caught up yet)"
        )

    configs = {str(c.get("id")): c for c in _mappings(_mapping(vm.get("spec")).get("volumeConfigs"))}
    statuses = _volume_statuses(vm)
    ids = [*configs, *(i for i in statuses if i not in configs)]
    if not ids:
        return "\n".join(lines)
    headers = ["ID", "SOURCE", "PHASE", "REPLICAS", "MESSAGE"]
    rows, details = [], []
    for volume_id in ids:
        config, volume = configs.get(volume_id, {}), statuses.get(volume_id, {})
        source = volume.get("sourceType") or config.get("sourceType")
        message = volume.get("message") if volume else "not reported yet"
        rows.append(
            [_one_line(volume_id), _text(source), _text(volume.get("phase")), _replicas(volume), _text(message)]
        )
        details.append(_volume_details(volume))
    table = _aligned([headers, *rows])
    lines.append("")
    lines.append(table[0])
    for row, detail in zip(table[1:], details, strict=True):
        lines.append(row)
        lines.extend(f"    {line}" for line in detail)
    return "\n".join(lines)


def _volume_details(volume: Mapping[str, Any]) -> list[str]:
    """The lines under a volume: the claim workloads mount, then, for node-local data, one per node."""
    volume_source = _mapping(volume.get("volumeSource"))
    claim = volume.get("claimName") or _mapping(volume_source.get("persistentVolumeClaim")).get("claimName")
    lines = []
    if claim:
        persistent_volume = volume.get("persistentVolumeName")
        bound_to = f" (PersistentVolume {_one_line(persistent_volume)})" if persistent_volume else ""
        lines.append(f"claim {_one_line(claim)}{bound_to}")
    if "nodes" not in volume and "hostPath" not in volume_source:
        return lines
    nodes = _mappings(volume.get("nodes"))
    if not nodes:
        return [*lines, "no node holds or is fetching this data yet"]
    return [*lines, *_aligned([_node_row(node) for node in nodes])]


def _node_row(node: Mapping[str, Any]) -> list[str]:
    phase = _text(node.get("phase"))
    done, total = _count(node.get("bytes")), _count(node.get("totalBytes"))
    # An agent reports 0 total bytes until it has listed the source; once Ready, 0 is an empty data set.
    size = total if total or phase == NODE_READY else None
    amount = f"{human_bytes(done)} / {human_bytes(size) if size is not None else '?'}"
    return [_text(node.get("name")), progress_bar(done, size), amount, phase, _text(node.get("message"), "")]


# --------------------------------------------------------------------------- kvc datasets


class Operator(StrEnum):
    EQUALS = "="
    NOT_EQUALS = "!="
    EXISTS = "exists"
    NOT_EXISTS = "!exists"


@dataclass(frozen=True)
class Requirement:
    """One label requirement, with Kubernetes' meaning (``key!=value`` also matches objects without the key)."""

    key: str
    operator: Operator
    value: str = ""

    def matches(self, labels: Mapping[str, Any]) -> bool:
        present = self.key in labels
        if self.operator is Operator.EXISTS:
            return present
        if self.operator is Operator.NOT_EXISTS:
            return not present
        equal = present and str(labels[self.key]) == self.value
        return equal if self.operator is Operator.EQUALS else not equal

    def __str__(self) -> str:
        if self.operator is Operator.EXISTS:
            return self.key
        if self.operator is Operator.NOT_EXISTS:
            return f"!{self.key}"
        return f"{self.key}{self.operator.value}{self.value}"


Selector = tuple[Requirement, ...]


def parse_selector(text: str) -> Selector:
    """Requirements from ``team=vision,kind!=model,approved,!draft``; ValueError says what is wrong."""
    if "(" in text or ")" in text:
        raise ValueError(
            f"{text!r}: set-based requirements such as 'key in (a,b)' are not supported; {_SELECTOR_FORMS}"
        )
    requirements = []
    for part in text.split(","):
        term = part.strip()
        if not term:
            raise ValueError(f"{text!r} has an empty requirement: {_SELECTOR_FORMS}")
        if term.startswith("!"):
            requirement = Requirement(term[1:].strip(), Operator.NOT_EXISTS)
        elif "!=" in term:
            key, _, value = term.partition("!=")
            requirement = Requirement(key.strip(), Operator.NOT_EQUALS, value.strip())
        elif "=" in term:
            key, _, value = term.partition("==" if "==" in term else "=")
            requirement = Requirement(key.strip(), Operator.EQUALS, value.strip())
        else:
            requirement = Requirement(term, Operator.EXISTS)
        _check(term, requirement)
        requirements.append(requirement)
    return tuple(requirements)


def _check(term: str, requirement: Requirement) -> None:
    key = requirement.key
    prefix, slash, name = key.rpartition("/")
    if not key:
        raise ValueError(f"{term!r} has no label key: {_SELECTOR_FORMS}")
    if not _LABEL_NAME.match(name) or (slash and (len(prefix) > 253 or not _LABEL_PREFIX.match(prefix))):
        raise ValueError(
            f"{term!r}: {key!r} is not a label key (letters, digits, '-', '_' and '.', at most 63 characters,"
            f" optionally after a DNS prefix and '/'); {_SELECTOR_FORMS}"
        )
    if not _LABEL_VALUE.match(requirement.value):
        raise ValueError(
            f"{term!r}: {requirement.value!r} is not a label value (letters, digits, '-', '_' and '.',"
            " starting and ending with a letter or digit, at most 63 characters)"
        )


def matches(labels: Mapping[str, Any] | None, selector: Iterable[Requirement]) -> bool:
    """Whether labels meet every requirement (an empty selector matches everything)."""
    return all(requirement.matches(labels or {}) for requirement in selector)


class DatasetRow(NamedTuple):
    namespace: str
    volumemanager: str
    id: str
    source: str
    phase: str
    replicas: str
    labels: str


DATASET_HEADERS = tuple(field.upper() for field in DatasetRow._fields)


def dataset_rows(vms: Iterable[Mapping[str, Any]], selector: Iterable[Requirement]) -> list[DatasetRow]:
    """The volumes whose labels match, by namespace and VolumeManager, each in spec order."""
    requirements = tuple(selector)
    rows = []
    for vm in vms:
        metadata = _mapping(vm.get("metadata"))
        statuses = _volume_statuses(vm)
        for config in _mappings(_mapping(vm.get("spec")).get("volumeConfigs")):
            labels = _mapping(config.get("labels"))
            if not matches(labels, requirements):
                continue
            volume = statuses.get(str(config.get("id")), {})
            rows.append(
                DatasetRow(
                    namespace=_text(metadata.get("namespace")),
                    volumemanager=_text(metadata.get("name")),
                    id=_text(config.get("id")),
                    source=_text(config.get("sourceType")),
                    phase=_text(volume.get("phase")),
                    replicas=_replicas(volume),
                    labels=_labels(labels),
                )
            )
    return sorted(rows, key=lambda row: (row.namespace, row.volumemanager))
