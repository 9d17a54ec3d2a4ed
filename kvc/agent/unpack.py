"""Safe extraction of tar, tar.gz and zip archives into a replica's directory.

Only regular files and directories are extracted.  Members with absolute paths, ``..``
components, or paths through a symlink are skipped, and so are symlinks, hard links and
device files themselves: an archive can never write outside the replica's directory.
Skipped members are returned so the agent can report them.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import IO

from kvc.agent.files import SafeJoin, UnsafePathError

KINDS = ("tar", "tar.gz", "zip")
_COPY_CHUNK = 1 << 20


class UnpackError(ValueError):
    """An archive that cannot be read as the kind the user named."""


def _write(source: IO[bytes], target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        shutil.copyfileobj(source, out, _COPY_CHUNK)
    return target.stat().st_size


def _extract_tar(archive: Path, dest: Path, compressed: bool) -> list[str]:
    skipped = []
    try:
        with tarfile.open(archive, "r:gz" if compressed else "r:") as tar:
            join = SafeJoin(dest)
            for member in tar:
                if member.isdir():
                    try:
                        join(member.name).mkdir(parents=True, exist_ok=True)
                    except UnsafePathError:
                        skipped.append(member.name)
                    continue
                if not member.isfile():  # symlinks, hard links, devices, fifos
                    skipped.append(member.name)
                    continue
                try:
                    target = join(member.name)
                except UnsafePathError:
                    skipped.append(member.name)
                    continue
                stream = tar.extractfile(member)
                if stream is None:
                    skipped.append(member.name)
                    continue
                with stream:
                    _write(stream, target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        kind = "tar.gz" if compressed else "tar"
        raise UnpackError(f"{archive.name} is not a readable {kind} archive: {exc}") from exc
    return skipped


def _extract_zip(archive: Path, dest: Path) -> list[str]:
    skipped = []
    try:
        with zipfile.ZipFile(archive) as bundle:
            join = SafeJoin(dest)
            for info in bundle.infolist():
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    skipped.append(info.filename)
                    continue
                try:
                    target = join(info.filename)
                except UnsafePathError:
                    skipped.append(info.filename)
                    continue
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                with bundle.open(info) as stream:
                    _write(stream, target)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UnpackError(f"{archive.name} is not a readable zip archive: {exc}") from exc
    return skipped


def extract(archive: Path, dest: Path, kind: str) -> list[str]:
    """Extract ``archive`` into ``dest``; returns the members that were skipped as unsafe."""
    if kind == "zip":
        return _extract_zip(archive, dest)
    if kind in ("tar", "tar.gz"):
        return _extract_tar(archive, dest, compressed=kind == "tar.gz")
    raise UnpackError(f"unpack must be one of {', '.join(KINDS)}, not {kind!r}")
