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

import contextlib
import shutil
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO

from kvc.agent.files import MAX_OBJECTS, CapacityError, Tree, UnsafePathError, quantity, safe_relative

KINDS = ("tar", "tar.gz", "zip")
_COPY_CHUNK = 1 << 20
# The most bytes of one tar header kept in memory: a GNU long name or link, a pax header, a GNU
# sparse map. tarfile reads each whole, whatever size it declares (a 261 KB tar.gz made it
# take 269 MiB): a larger one fails the archive, having read nothing of it.
MAX_TAR_HEADER = 64 << 10
# Extended headers (long names, pax) before one member: tarfile reads each inside the last.
_MAX_TAR_HEADERS_IN_A_ROW = 8
# The largest zip central directory read, per member a volume may hold (zipfile reads it whole
# and makes an object of every entry before anything can be counted).
_ZIP_DIRECTORY_BYTES_PER_MEMBER = 512
_ZIP_DIRECTORY_MIN_BYTES = 1 << 20


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


def _header_bounded(size: int, what: str) -> None:
    if size > MAX_TAR_HEADER:
        raise tarfile.HeaderError(f"a {what} header of {size} bytes, more than the {MAX_TAR_HEADER} a header may take")


@contextlib.contextmanager
def _nested(tar: tarfile.TarFile) -> Iterator[None]:
    """One more extended header in a row (each read inside the last by tarfile): a bounded number."""
    depth = getattr(tar, "_kvc_headers_in_a_row", 0) + 1
    if depth > _MAX_TAR_HEADERS_IN_A_ROW:
        raise tarfile.HeaderError(f"more than {_MAX_TAR_HEADERS_IN_A_ROW} extended headers in a row")
    setattr(tar, "_kvc_headers_in_a_row", depth)  # noqa: B010 - TarFile declares no such attribute
    try:
        yield
    finally:
        setattr(tar, "_kvc_headers_in_a_row", depth - 1)  # noqa: B010


_nti: Callable[[bytes], int] = tarfile.nti  # type: ignore[attr-defined]


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's headers, each read only when it declares at most MAX_TAR_HEADER bytes."""

    def _proc_gnulong(self, tar: tarfile.TarFile) -> Any:
        _header_bounded(self.size, "GNU long-name")
        with _nested(tar):
            return super()._proc_gnulong(tar)  # type: ignore[misc]

    def _proc_pax(self, tar: tarfile.TarFile) -> Any:
        _header_bounded(self.size, "pax")
        with _nested(tar):
            return super()._proc_pax(tar)  # type: ignore[misc]

    def _proc_sparse(self, tar: tarfile.TarFile) -> Any:
        """tarfile's own (3.11), but for its bound: extension blocks are read while they say more follow."""
        structs, extended, original_size = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        read = 0
        while extended:
            read += tarfile.BLOCKSIZE
            _header_bounded(read, "GNU sparse")
            block = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise tarfile.HeaderError("a truncated GNU sparse header")
            for position in range(0, 21 * 24, 24):
                try:
                    offset, count = _nti(block[position : position + 12]), _nti(block[position + 12 : position + 24])
                except ValueError:
                    break
                if offset and count:
                    structs.append((offset, count))
            extended = bool(block[504])
        self.sparse = structs
        self.offset_data = tar.fileobj.tell()
        tar.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = original_size
        return self

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: object, tar: tarfile.TarFile) -> None:
        """tarfile's own (3.11), but for its bound: the map it reads is at most MAX_TAR_HEADER bytes."""
        buffer = tar.fileobj.read(tarfile.BLOCKSIZE)
        read = len(buffer)
        try:
            fields, buffer = buffer.split(b"\n", 1)
            wanted = 2 * int(fields)
            numbers: list[int] = []
            while len(numbers) < wanted:
                if b"\n" not in buffer:
                    read += tarfile.BLOCKSIZE
                    _header_bounded(read, "GNU sparse map")
                    buffer += tar.fileobj.read(tarfile.BLOCKSIZE)
                number, buffer = buffer.split(b"\n", 1)
                numbers.append(int(number))
        except ValueError as exc:
            raise tarfile.HeaderError(f"an unreadable GNU sparse map: {exc}") from None
        next.offset_data = tar.fileobj.tell()
        next.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))  # type: ignore[assignment]


def _extract_tar(archive: BinaryIO, name: str, dest: Tree, compressed: bool, members: _Members) -> list[str]:
    skipped = []
    try:
        with tarfile.open(fileobj=archive, mode="r:gz" if compressed else "r:", tarinfo=_BoundedTarInfo) as tar:
            while (member := tar.next()) is not None:
                # Streamed: the headers read so far are not kept (a million members, a million TarInfos).
                tar.members.clear()  # type: ignore[attr-defined]
                members.next()
                # Global pax headers add up: bounded as one.
                if tar.pax_headers and sum(len(k) + len(v) for k, v in tar.pax_headers.items()) > MAX_TAR_HEADER:
                    raise tarfile.HeaderError(f"global pax headers of more than {MAX_TAR_HEADER} bytes")
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


_EndRecData: Callable[[BinaryIO], list[Any] | None] = zipfile._EndRecData  # type: ignore[attr-defined]


def _check_zip_directory(archive: BinaryIO, name: str, limit: int) -> None:
    """Refuse a zip whose central directory holds more than ``limit`` entries, or is larger than a
    directory of that many may be, reading its entries' fixed 46 bytes only: zipfile would make an
    object of every entry (a million entries, gigabytes) before any could be counted.

    What is not a zip's end record is left for zipfile to report.
    """
    end = _EndRecData(archive)
    if not end:
        return
    declared, size, location = end[4], end[5], end[9]  # zipfile's _ECD_* indices
    if declared > limit:
        raise UnpackError(f"{name} declares {declared} members, more than the {limit} one volume may hold")
    most = max(limit * _ZIP_DIRECTORY_BYTES_PER_MEMBER, _ZIP_DIRECTORY_MIN_BYTES)
    if size > most:
        raise UnpackError(f"{name} has a central directory of {size} bytes, more than the {most} read")
    start = location - size if end[0] != b"PK\x06\x06" else location - size - 56 - 20  # zipfile's own sums
    count = position = 0
    chunk, chunk_at = b"", 0
    while position < size:
        if position + 46 > chunk_at + len(chunk):
            archive.seek(start + position)
            chunk, chunk_at = archive.read(min(max(size - position, 46), 1 << 20)), position
            if len(chunk) < 46:
                return  # truncated: zipfile says so
        at = position - chunk_at
        if chunk[at : at + 4] != b"PK\x01\x02":
            return  # not an entry: zipfile says so
        count += 1
        if count > limit:
            raise UnpackError(f"{name} holds more than {limit} members, the most one volume may hold")
        lengths = struct.unpack_from("<HHH", chunk, at + 28)
        position += 46 + sum(lengths)


def _extract_zip(archive: BinaryIO, name: str, dest: Tree, members: _Members) -> list[str]:
    skipped = []
    try:
        _check_zip_directory(archive, name, members.limit)
        archive.seek(0)
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
