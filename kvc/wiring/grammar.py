"""The annotations a workload uses to ask for KVC volumes, parsed and checked (pure).

    kvc/volume: cifar100, models/bert      ids, or <volumemanager>/<id>; own namespace only
    kvc/mount-path: /data                  when one volume is asked for
    kvc/mount-path.bert: /models/bert      per volume
    kvc/containers: trainer, evaluator     containers to mount into (default: every app container)
    kvc/read-only: "false"                 writable mount (default "true")

Every mistake is a ``GrammarError`` whose message names the annotation and the fix.
"""

from __future__ import annotations

import difflib
import functools
import posixpath
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "kvc/"
VOLUME = "kvc/volume"
MOUNT_PATH = "kvc/mount-path"
MOUNT_PATH_FOR = "kvc/mount-path."
CONTAINERS = "kvc/containers"
READ_ONLY = "kvc/read-only"
KNOWN = (VOLUME, MOUNT_PATH, f"{MOUNT_PATH_FOR}<id>", CONTAINERS, READ_ONLY)
DEFAULT_MOUNT_ROOT = "/var/datasets"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_CONTAINER_NAME = _DNS_LABEL


class GrammarError(ValueError):
    """An annotation that cannot be honoured; the message says which and how to fix it."""


@dataclass(frozen=True)
class VolumeRef:
    """A volume asked for: its id, and the VolumeManager when the annotation names one."""

    volume_id: str
    manager: str | None = None

    def __str__(self) -> str:
        return f"{self.manager}/{self.volume_id}" if self.manager else self.volume_id


@dataclass(frozen=True)
class VolumeRequest:
    refs: tuple[VolumeRef, ...]
    mount_paths: Mapping[VolumeRef, str]
    containers: tuple[str, ...] | None  # None: every app container
    read_only: bool


def _parse_ref(entry: str) -> VolumeRef:
    manager, slash, volume_id = entry.rpartition("/")
    if not slash:
        manager, volume_id = "", entry
    if "/" in manager:
        raise GrammarError(
            f"{VOLUME}: {entry!r} has more than one '/': write <id> or <volumemanager>/<id> "
            "(volumes are found in the workload's own namespace only)"
        )
    if not _DNS_LABEL.match(volume_id) or len(volume_id) > 63:
        raise GrammarError(f"{VOLUME}: {volume_id!r} is not a volume id (a DNS label such as cifar100)")
    if slash and (not _DNS_SUBDOMAIN.match(manager) or len(manager) > 253):
        raise GrammarError(f"{VOLUME}: {manager!r} is not a VolumeManager name")
    return VolumeRef(volume_id, manager or None)


def _mount_path(annotation: str, value: str) -> str:
    path = value.strip()
    if not path.startswith("/"):
        raise GrammarError(f"{annotation}: {value!r} must be an absolute path such as /data")
    if ".." in path.split("/") or posixpath.normpath(path) != path.rstrip("/") or path == "/":
        raise GrammarError(f"{annotation}: {value!r} must be a normalised path below / without '..'")
    if ":" in path:
        raise GrammarError(f"{annotation}: {value!r} must not contain ':'")
    return path.rstrip("/")


def _refs(value: str) -> tuple[VolumeRef, ...]:
    entries = [entry.strip() for entry in value.split(",")]
    if not any(entries):
        raise GrammarError(f"{VOLUME} is empty: name at least one volume id")
    if "" in entries:
        raise GrammarError(f"{VOLUME}: {value!r} has an empty entry between commas")
    refs = tuple(_parse_ref(entry) for entry in entries)
    for index, ref in enumerate(refs):
        if ref in refs[:index]:
            raise GrammarError(f"{VOLUME} lists {ref} twice")
    return refs


def _mount_paths(ours: Mapping[str, str], refs: tuple[VolumeRef, ...]) -> dict[VolumeRef, str]:
    mount_paths: dict[VolumeRef, str] = {}
    if MOUNT_PATH in ours:
        if len(refs) != 1:
            raise GrammarError(
                f"{MOUNT_PATH} applies when one volume is asked for; with several use {MOUNT_PATH_FOR}<id>"
            )
        mount_paths[refs[0]] = _mount_path(MOUNT_PATH, ours[MOUNT_PATH])
    for key, value in ours.items():
        if not key.startswith(MOUNT_PATH_FOR):
            continue
        volume_id = key[len(MOUNT_PATH_FOR) :]
        matching = [ref for ref in refs if ref.volume_id == volume_id]
        if not matching:
            asked = ", ".join(ref.volume_id for ref in refs)
            raise GrammarError(f"{key} names a volume that {VOLUME} does not ask for ({asked})")
        if len(matching) > 1:
            raise GrammarError(f"{key} is ambiguous: {VOLUME} asks for {volume_id} from two VolumeManagers")
        if matching[0] in mount_paths:
            raise GrammarError(f"{MOUNT_PATH} and {key} both set the mount path of {volume_id}: keep one")
        mount_paths[matching[0]] = _mount_path(key, value)
    for ref in refs:
        mount_paths.setdefault(ref, f"{DEFAULT_MOUNT_ROOT}/{ref.volume_id}")
    paths = list(mount_paths.values())
    for path in paths:
        if paths.count(path) > 1:
            raise GrammarError(f"two volumes would be mounted at {path}: give each its own {MOUNT_PATH_FOR}<id>")
        inner = next((other for other in paths if other.startswith(path.rstrip("/") + "/")), None)
        if inner is not None:
            raise GrammarError(
                f"two volumes would be mounted one inside the other, at {path} and {inner}: "
                f"give each its own {MOUNT_PATH_FOR}<id>"
            )
    return mount_paths


def _containers(value: str) -> tuple[str, ...]:
    names = [name.strip() for name in value.split(",")]
    if not any(names) or "" in names:
        raise GrammarError(f"{CONTAINERS}: {value!r} must list container names separated by commas")
    bad = [name for name in names if not _CONTAINER_NAME.match(name)]
    if bad:
        raise GrammarError(f"{CONTAINERS}: {bad[0]!r} is not a container name")
    return tuple(dict.fromkeys(names))


def _read_only(value: str) -> bool:
    normalised = value.strip().lower()
    if normalised not in ("true", "false"):
        raise GrammarError(f'{READ_ONLY} must be "true" or "false", not {value!r}')
    return normalised == "true"


_EXACT = (VOLUME, MOUNT_PATH, CONTAINERS, READ_ONLY)


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, _EXACT, n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def parse(annotations: Mapping[str, str]) -> VolumeRequest | None:
    """The request in ``annotations``; None when they ask for no KVC volume."""
    ours = tuple(sorted((key, value) for key, value in annotations.items() if key.startswith(PREFIX)))
    if all(isinstance(value, str) for _, value in ours) and sum(len(k) + len(v) for k, v in ours) <= _CACHED_SIZE:
        return _parse_cached(ours)
    return _parse(dict(ours))


# Admission sees the same few annotation sets over and over (every pod of a job, every
# retry); parsing is pure, so its results are shared. Mistakes raise and are not cached.
# Only small sets are kept, so that odd annotations (up to 256 KiB each) cannot fill memory.
_CACHED_SIZE = 4096


@functools.lru_cache(maxsize=1024)
def _parse_cached(ours: tuple[tuple[str, str], ...]) -> VolumeRequest | None:
    return _parse(dict(ours))


def _parse(ours: Mapping[str, str]) -> VolumeRequest | None:
    # Unknown keys first: a misspelt kvc/volume (kvc/volumes) is better named as such than
    # reported as a missing kvc/volume.
    for key in sorted(ours):
        if key not in _EXACT and not key.startswith(MOUNT_PATH_FOR):
            raise GrammarError(f"unknown annotation {key}{_did_you_mean(key)}: KVC reads {', '.join(KNOWN)}")
    if VOLUME not in ours:
        if ours:
            raise GrammarError(f"{', '.join(sorted(ours))} given without {VOLUME}: add {VOLUME}: <id>")
        return None
    refs = _refs(ours[VOLUME])
    return VolumeRequest(
        refs=refs,
        # Read-only: the request may be shared by many admissions (see _parse_cached).
        mount_paths=types.MappingProxyType(_mount_paths(ours, refs)),
        containers=_containers(ours[CONTAINERS]) if CONTAINERS in ours else None,
        read_only=_read_only(ours[READ_ONLY]) if READ_ONLY in ours else True,
    )
