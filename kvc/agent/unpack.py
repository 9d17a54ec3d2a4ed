"""Safe extraction of tar, tar.gz and zip archives into a replica's directory.

Only regular files and directories are extracted.  Members with absolute paths, ``..``
components, or paths through a symlink are skipped, and so are symlinks, hard links and
device files themselves: an archive can never write outside the replica's directory.
Skipped members are returned so the agent can report them. Files are written through a
``Tree`` (never through a symlink) within its budget: an archive that expands beyond the
volume's capacity (a decompression bomb) fails, having written no byte past it, and so
does one with more members than a replica may hold (empty files cost inodes, not bytes).
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from typing import IO, BinaryIO

from kvc.agent.files import MAX_OBJECTS, CapacityError, Tree, UnsafePathError, quantity, safe_relative

KINDS = ("tar", "tar.gz", "zip")
_COPY_CHUNK = 1 << 20


class UnpackError(ValueError):
    """An archive that cannot be read as the kind the user named."""


def _write(source: IO[bytes], dest: Tree, name: str) -> None:
    with dest.open(str(safe_relative(name))) as out:
        shutil.copyfileobj(source, out, _COPY_CHUNK)


class _Members:
    """Counts an archive's members against the most a replica may hold."""

    def __init__(self, archive: str, limit: int) -> None:
        self.archive, self.limit, self.count = archive, limit, 0

    def next(self) -> None:
        self.count += 1
        if self.count > self.limit:
            raise UnpackError(f"{self.archive} holds more than {self.limit} members, the most one volume may hold")


def _extract_tar(archive: BinaryIO, name: str, dest: Tree, compressed: bool, members: _Members) -> list[str]:
    skipped = []
    try:
        with tarfile.open(fileobj=archive, mode="r:gz" if compressed else "r:") as tar:
            while (member := tar.next()) is not None:
                # Streamed: the headers read so far are not kept (a million members, a million TarInfos).
                tar.members.clear()  # type: ignore[attr-defined]
                members.next()
                if member.isdir():
                    try:
                        dest.directory(str(safe_relative(member.name)))
                    except UnsafePathError:
                        skipped.append(member.name)
                    continue
                stream = tar.extractfile(member) if member.isfile() else None  # not links, devices, fifos
                if stream is None:
                    skipped.append(member.name)
                    continue
                try:
                    with stream:
                        _write(stream, dest, member.name)
                except UnsafePathError:
                    skipped.append(member.name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        kind = "tar.gz" if compressed else "tar"
        raise UnpackError(f"{name} is not a readable {kind} archive: {exc}") from exc
    return skipped


def _extract_zip(archive: BinaryIO, name: str, dest: Tree, members: _Members) -> list[str]:
    skipped = []
    try:
        with zipfile.ZipFile(archive) as bundle:
            infos = bundle.infolist()
            for _ in infos:
                members.next()
            remaining = dest.budget.remaining
            declared = sum(info.file_size for info in infos)
            if remaining is not None and declared > remaining:
                raise dest.budget.over_capacity(f"its {declared} bytes")
            for info in infos:
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    skipped.append(info.filename)
                    continue
                try:
                    if info.is_dir():
                        dest.directory(str(safe_relative(info.filename)))
                        continue
                    with bundle.open(info) as stream:
                        _write(stream, dest, info.filename)
                except UnsafePathError:
                    skipped.append(info.filename)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UnpackError(f"{name} is not a readable zip archive: {exc}") from exc
    return skipped


def extract(archive: BinaryIO, name: str, dest: Tree, kind: str, *, max_members: int = MAX_OBJECTS) -> list[str]:
    """Extract ``archive`` (named ``name`` in messages) into ``dest``; returns the members skipped as unsafe."""
    members = _Members(name, max_members)
    try:
        if kind == "zip":
            return _extract_zip(archive, name, dest, members)
        if kind in ("tar", "tar.gz"):
            return _extract_tar(archive, name, dest, kind == "tar.gz", members)
    except CapacityError:
        capacity = quantity(dest.budget.capacity or 0)
        raise UnpackError(
            f"{name} expands beyond the volume's capacity ({capacity}, the archives' own bytes included "
            "while they are extracted): a decompression bomb, or raise capacity in the volumeConfig"
        ) from None
    raise UnpackError(f"unpack must be one of {', '.join(KINDS)}, not {kind!r}")
