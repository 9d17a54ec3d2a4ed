"""A replica's files on a node: safe paths, a staging directory, a manifest, atomic publish.

Data is written into ``<dir>.partial`` and becomes visible at ``<dir>`` only once every
file is complete and verified, by one ``rename``: a reader (or a restarted agent) never
sees half a replica as complete.  A restarted agent finds the staging directory and
resumes from what is already there.  Published data is owned by the agent and writable by
it alone (directories 0755, files 0644, or 0755 where the owner could execute them), so a
workload that runs as any other user, as Pod Security ``restricted`` requires, can read the
replica but never change it, even through a writable mount.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

logger = logging.getLogger(__name__)

MANIFEST = ".kvc-manifest.json"
STAGING_SUFFIX = ".partial"
# Archives to unpack are downloaded here, inside the staging directory, then removed.
DOWNLOADS = ".kvc-download"

# What published data may be: readable by all, writable by its owner (the agent) alone.
DIRECTORY_MODE = 0o755
FILE_MODE = 0o644
# The deepest and longest source-provided path a replica may hold. Directories are opened one
# below the other (PATH_MAX no longer bounds a depth), so a depth is bounded here: every
# directory made costs an inode and a block, and a walk of the tree holds a descriptor per level.
MAX_PATH_DEPTH = 128
MAX_PATH_LENGTH = 4096
# What a directory made is charged to a replica's budget: its block (and inode), which an
# archive of empty directories would otherwise take for free.
DIRECTORY_BYTES = 4096
# The largest manifest read back (a FIFO, or anything unbounded, at its name is not read).
MAX_MANIFEST_BYTES = 256 << 20


def md5_etag(etag: str | None) -> str | None:
    """The MD5 an S3 ETag stands for, when it is one (not for multipart uploads or SSE-KMS)."""
    value = (etag or "").strip('"')
    return value if len(value) == 32 and "-" not in value else None


def md5_of(handle: BinaryIO) -> str:
    """The MD5 of what ``handle`` holds from where it stands (see ``Tree.read``: never through a symlink)."""
    digest = hashlib.md5(usedforsecurity=False)
    with handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class UnsafePathError(ValueError):
    """A source path that would land outside the replica's directory, or a symlink met on the way."""


class DiskLimitError(ValueError):
    """Writing would take the node's free disk under the floor its agent keeps (``--min-free-disk``)."""


class CapacityError(DiskLimitError):
    """Writing would take a replica's data past its volume's capacity."""


def safe_relative(name: str) -> PurePosixPath:
    """Validate a source-provided relative path (an object key, an archive member).

    Rejects absolute paths, ``..`` components, NUL bytes, empty names and paths deeper than
    MAX_PATH_DEPTH components or longer than MAX_PATH_LENGTH; ``.`` and empty components
    (``a//b``) are dropped.
    """
    if len(name) > MAX_PATH_LENGTH:
        raise UnsafePathError(f"{name[:60]!r}...: a path longer than {MAX_PATH_LENGTH} characters")
    if "\x00" in name:
        raise UnsafePathError(f"{name!r}: NUL byte in path")
    if name.startswith("/"):
        raise UnsafePathError(f"{name!r}: absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts:
        raise UnsafePathError(f"{name!r}: empty path")
    if ".." in parts:
        raise UnsafePathError(f"{name!r}: '..' would leave the volume's directory")
    if len(parts) > MAX_PATH_DEPTH:
        raise UnsafePathError(f"{name[:60]!r}...: a path deeper than {MAX_PATH_DEPTH} directories")
    if parts[-1] == MANIFEST or parts[0] == DOWNLOADS:
        raise UnsafePathError(f"{name!r}: reserved name")
    return PurePosixPath(*parts)


def quantity(count: int) -> str:
    """Bytes as a Kubernetes quantity when one is exact (``5Gi``), else as bytes."""
    for suffix, unit in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if count >= unit and count % unit == 0:
            return f"{count // unit}{suffix}"
    return f"{count} bytes"


# The node's free disk is looked at again after this many bytes are written for a replica.
DISK_CHECK_BYTES = 32 << 20
# Objects (files, archive members) one replica may hold unless the agent says otherwise
# (--max-objects): what keeps a fetch's memory bounded, whatever a source lists.
MAX_OBJECTS = 200_000


@dataclass(frozen=True)
class Limits:
    """What the agent lets one replica take: its volume's capacity and the admin's bounds."""

    capacity: int | None = None  # bytes of data on disk; None: no bound
    min_free_disk: int = 0  # bytes of the node's file system that stay free; 0: no floor
    max_objects: int = MAX_OBJECTS

    def budget(self, disk: Path) -> Budget:
        return Budget(self.capacity, self.min_free_disk, disk)


class Budget:
    """The bytes one replica may take on disk (its volume's capacity), and the node's free-disk floor.

    Writers ``charge`` bytes before they write them and ``release`` those they truncate or
    remove, so ``used`` is what the replica holds: a write that would pass ``capacity``
    raises CapacityError and never happens. The file system holding ``disk`` is looked at
    before a fetch starts (``check_disk``) and every DISK_CHECK_BYTES written after: under
    ``min_free_disk`` free, DiskLimitError. Thread-safe; one lock per charge (a file or a
    buffer of up to a MiB), never per byte.
    """

    def __init__(self, capacity: int | None = None, min_free_disk: int = 0, disk: Path | None = None) -> None:
        self.capacity, self.min_free_disk, self.disk = capacity, min_free_disk, disk
        self.used = 0
        self._checked_at = 0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int | None:
        """Bytes the replica may still take; None: no capacity."""
        return None if self.capacity is None else max(self.capacity - self.used, 0)

    def over_capacity(self, what: str) -> CapacityError:
        return CapacityError(
            f"{what} would take the volume's data past its capacity ({quantity(self.capacity or 0)}): "
            "raise capacity in the volumeConfig"
        )

    def charge(self, count: int, name: str) -> None:
        """Count ``count`` bytes about to be written to ``name``; raise instead when they may not be."""
        with self._lock:
            if self.capacity is not None and self.used + count > self.capacity:
                raise self.over_capacity(f"writing {name}")
            self.used += count
            due = bool(self.min_free_disk) and self.used - self._checked_at >= DISK_CHECK_BYTES
            if due:
                self._checked_at = self.used
        if due:
            self.check_disk()

    def release(self, count: int) -> None:
        with self._lock:
            self.used -= count

    def check_disk(self) -> None:
        if not self.min_free_disk or self.disk is None:
            return
        usage = os.statvfs(self.disk)
        free = usage.f_bavail * usage.f_frsize
        if free < self.min_free_disk:
            raise DiskLimitError(
                f"the node's free disk is down to {quantity(free)}, under the {quantity(self.min_free_disk)} "
                "its agent keeps free (--min-free-disk): stopped writing"
            )


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted at a file's name fails to open instead of blocking forever.
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Directory descriptors a Tree keeps open; deeper ones are opened per use (thousands of
# directories must not exhaust the process's descriptors).
_KEPT_DIRECTORIES = 512


def _not_followed(name: str, error: OSError) -> UnsafePathError:
    return UnsafePathError(f"{name} is a symlink or not what the volume's data needs there ({error.strerror})")


class File:
    """A file of a Tree open for writing; every write is charged to the tree's budget first."""

    def __init__(self, fd: int, budget: Budget, name: str) -> None:
        self._fd, self._budget, self.name = fd, budget, name

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._budget.charge(len(view), self.name)
        while view:
            view = view[os.write(self._fd, view) :]
        return len(data)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> File:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Tree:
    """A directory tree the agent (root) writes and reads without ever following a symlink.

    Every directory below ``root`` is opened relative to its parent's descriptor with
    ``O_NOFOLLOW`` (and made when missing and ``create``), every file likewise: a symlink
    anywhere (planted before the fetch, swapped in during a download, or at a file's own
    name between a check and the write) fails that file with UnsafePathError instead of
    taking the agent outside the replica; so do a FIFO, a device, a hard link to a file
    elsewhere. Nothing is checked then used: the check is the open. Directory descriptors
    are kept for the tree's life (one open per directory, not per file); a directory
    renamed after it was opened keeps being written where it went, which only whoever
    could write the replica's directory could do (the agent alone: see ``ReplicaDir``).
    ``root`` itself is opened with ``O_NOFOLLOW`` too; the directories above it are the
    agent's. Bytes written are charged to ``budget``. Close the tree when done.
    """

    def __init__(self, root: Path, budget: Budget | None = None, *, create: bool = True) -> None:
        self.root, self.budget, self._create = root, budget or Budget(), create
        self._lock = threading.Lock()
        self._directories: dict[str, int] = {"": os.open(root, _DIRECTORY_FLAGS)}

    def close(self) -> None:
        with self._lock:
            for fd in self._directories.values():
                os.close(fd)
            self._directories.clear()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def file(self, relative: str | PurePosixPath) -> TreePath:
        return TreePath(self, str(relative))

    def directory(self, relative: str) -> None:
        """Make the directory ``relative`` (and its parents) if missing."""
        with self._directory(relative):
            pass

    @contextlib.contextmanager
    def _directory(self, relative: str) -> Iterator[int]:
        """The descriptor of the directory ``relative`` ("" for the root), reached without following a symlink."""
        kept = self._directories.get(relative)
        if kept is not None:
            yield kept
            return
        parts = relative.split("/")
        depth = len(parts) - 1  # the deepest ancestor kept open ("" at worst)
        while depth and "/".join(parts[:depth]) not in self._directories:
            depth -= 1
        fd = self._directories["/".join(parts[:depth])]
        opened: list[int] = []
        try:
            for index in range(depth, len(parts)):
                path = "/".join(parts[: index + 1])
                fd = self._open_directory(fd, parts[index], path)
                opened.append(fd)
                with self._lock:
                    if len(self._directories) < _KEPT_DIRECTORIES and path not in self._directories:
                        self._directories[path] = opened.pop()
            yield fd
        finally:
            for own in opened:
                os.close(own)

    def _open_directory(self, parent: int, name: str, shown: str) -> int:
        for _ in range(3):
            try:
                return os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                if not self._create:
                    raise
                self.budget.charge(DIRECTORY_BYTES, f"the directory {shown}")
                try:
                    os.mkdir(name, DIRECTORY_MODE, dir_fd=parent)
                except FileExistsError:  # made meanwhile by another thread, which charged it
                    self.budget.release(DIRECTORY_BYTES)
                except BaseException:
                    self.budget.release(DIRECTORY_BYTES)
                    raise
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise _not_followed(shown, exc) from None
        raise UnsafePathError(f"{shown}: the directory keeps disappearing")

    def _parent(self, relative: str) -> tuple[contextlib.AbstractContextManager[int], str]:
        parent, _, name = relative.rpartition("/")
        return self._directory(parent), name

    def open(self, relative: str, *, append: bool = False, exclusive: bool = False) -> File:
        """``relative`` open for writing: appended to, or emptied.

        ``exclusive``: the caller knows it absent (made in one system call fewer).
        """
        directory, name = self._parent(relative)
        with directory as parent:
            try:
                if exclusive:
                    with contextlib.suppress(FileExistsError):
                        fd = os.open(name, _WRITE_FLAGS | os.O_EXCL, FILE_MODE, dir_fd=parent)
                        return File(fd, self.budget, relative)  # made now: a file of its own
                fd = os.open(name, _WRITE_FLAGS | (os.O_APPEND if append else 0), FILE_MODE, dir_fd=parent)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR):
                    raise
                raise _not_followed(relative, exc) from None
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
                raise UnsafePathError(f"{relative} is not a file of the volume's own (a device, or a hard link)")
            if found.st_size and not append:
                os.ftruncate(fd, 0)
                self.budget.release(found.st_size)
        except BaseException:
            os.close(fd)
            raise
        return File(fd, self.budget, relative)

    def read(self, relative: str) -> BinaryIO:
        """``relative`` open for reading, never through a symlink."""
        directory, name = self._parent(relative)
        with directory as parent:
            try:
                fd = os.open(name, _READ_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENXIO):
                    raise
                raise _not_followed(relative, exc) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(f"{relative} is not a regular file")
        return open(fd, "rb")

    def size(self, relative: str) -> int | None:
        """Bytes in the file ``relative``; None when there is none (a symlink there is no file of the volume's)."""
        directory, name = self._parent(relative)
        try:
            with directory as parent:
                found = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(found.st_mode):
            raise UnsafePathError(f"{relative} is not a regular file")
        return found.st_size

    def unlink(self, relative: str) -> None:
        directory, name = self._parent(relative)
        with directory as parent:
            found = os.stat(name, dir_fd=parent, follow_symlinks=False)
            os.unlink(name, dir_fd=parent)
        if stat.S_ISREG(found.st_mode):
            self.budget.release(found.st_size)


@dataclass(frozen=True, slots=True)
class TreePath:
    """A file's place in a Tree: what the fetchers hold for each file to write (``relative`` is safe)."""

    tree: Tree
    relative: str

    @property
    def name(self) -> str:
        return self.relative.rpartition("/")[2]

    def open(self, *, append: bool = False, exclusive: bool = False) -> File:
        return self.tree.open(self.relative, append=append, exclusive=exclusive)

    def write_bytes(self, data: bytes, *, exclusive: bool = False) -> None:
        with self.open(exclusive=exclusive) as handle:
            handle.write(data)

    def read(self) -> BinaryIO:
        return self.tree.read(self.relative)

    def size(self) -> int | None:
        return self.tree.size(self.relative)

    def unlink(self) -> None:
        self.tree.unlink(self.relative)


@dataclass
class ManifestFile:
    path: str
    size: int
    etag: str | None = None


@dataclass
class Manifest:
    source: str
    files: list[ManifestFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def dump(self) -> str:
        return json.dumps({"source": self.source, "files": [asdict(f) for f in self.files], "skipped": self.skipped})

    @classmethod
    def load(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(
            source=data["source"],
            files=[ManifestFile(**f) for f in data.get("files", [])],
            skipped=list(data.get("skipped", [])),
        )


class ReplicaDir:
    """The directory of one replica on this node, and its staging twin."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.staging = final.with_name(final.name + STAGING_SUFFIX)

    @property
    def exists(self) -> bool:
        """Whether anything of the replica is on disk, published or staged."""
        return self.final.exists() or self.staging.exists()

    @property
    def complete(self) -> bool:
        """Whether the published data has its manifest: a regular file, not reached through a symlink."""
        try:
            with Tree(self.final, create=False) as tree:
                return tree.size(MANIFEST) is not None
        except (OSError, UnsafePathError):
            return False

    def manifest(self) -> Manifest | None:
        """The published data's manifest; None when missing, unreadable or not a regular file of its own
        (a symlink or a FIFO at its name is never followed or waited on), or longer than MAX_MANIFEST_BYTES."""
        try:
            with Tree(self.final, create=False) as tree, tree.read(MANIFEST) as handle:
                text = handle.read(MAX_MANIFEST_BYTES + 1)
            if len(text) > MAX_MANIFEST_BYTES:
                return None
            return Manifest.load(text.decode())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def downloads(self) -> Path:
        return self.staging / DOWNLOADS

    def prepare(self) -> Path:
        """The staging directory, created if needed (kept across restarts to resume)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging

    def tree(self, budget: Budget) -> Tree:
        """The staging directory (made if needed) to write into within ``budget``, once the node's
        free disk is found above its floor.

        Assumed: the directories above it are the agent's alone (its data root, made by the
        agent, never writable by a workload), so only what is below is guarded.
        """
        self.prepare()
        budget.check_disk()
        return Tree(self.staging, budget)

    def publish(self, manifest: Manifest) -> None:
        """Make the staged data visible at its final path in one rename, sealed (``seal``)."""
        with Tree(self.staging) as tree, tree.open(MANIFEST) as handle:
            handle.write(manifest.dump().encode())
            os.fsync(handle.fileno())
        seal(self.staging)
        if self.final.exists():  # an earlier, now invalid copy (e.g. failed verification)
            remove_tree(self.final)
        os.rename(self.staging, self.final)

    def verify(self, deep: bool = False) -> list[str]:
        """Problems with the published data; [] if intact.

        Checks sizes; ``deep`` also re-reads every file whose ETag is an MD5 and compares.
        """
        manifest = self.manifest()
        if manifest is None:
            return ["manifest missing or unreadable"]
        problems = []
        try:
            tree = Tree(self.final, create=False)
        except OSError:
            return ["the replica's directory is missing"]
        with tree:
            for entry in manifest.files:
                try:
                    size = tree.size(entry.path)
                except UnsafePathError:
                    problems.append(f"{entry.path} is not a regular file")
                    continue
                except OSError:
                    size = None
                if size is None:
                    problems.append(f"{entry.path} is missing")
                elif size != entry.size:
                    problems.append(f"{entry.path} has {size} bytes, expected {entry.size}")
                elif deep and (expected := md5_etag(entry.etag)) and md5_of(tree.read(entry.path)) != expected:
                    problems.append(f"{entry.path} differs from its source (MD5 {expected})")
        return problems

    def unpublish(self) -> None:
        """Turn published data back into staged data, to be checked and completed by a fetch."""
        if self.final.exists() and not self.staging.exists():
            self.final.rename(self.staging)
        (self.staging / MANIFEST).unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the replica, published and staged, whatever its depth; never raises (see ``remove_tree``)."""
        for directory in (self.final, self.staging):
            remove_tree(directory)


def _listed(fd: int) -> Iterator[os.DirEntry[str]]:
    with os.scandir(fd) as scan:
        return iter(list(scan))


@dataclass
class _Level:
    """A directory being walked: its descriptor, its path's prefix, its entries still to go, and how
    its parent's walk yields it once they are done (None for the top)."""

    fd: int
    prefix: str
    pending: Iterator[os.DirEntry[str]]
    itself: tuple[int, str, os.DirEntry[str]] | None


def _entries(top: int) -> Iterator[tuple[int, str, os.DirEntry[str], int | None]]:
    """Everything under the directory open as ``top``, children before their directory, never through a symlink:
    (its directory's descriptor, its relative path, the entry, a directory's own descriptor or None).

    A loop, not a recursion: a tree of any depth is walked (one descriptor open per level).
    """
    stack = [_Level(top, "", _listed(top), None)]
    try:
        while stack:
            level = stack[-1]
            for entry in level.pending:
                relative = level.prefix + entry.name
                if not entry.is_dir(follow_symlinks=False):
                    yield level.fd, relative, entry, None
                    continue
                try:
                    own = os.open(entry.name, _DIRECTORY_FLAGS, dir_fd=level.fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    raise _not_followed(relative, exc) from None
                try:
                    pending = _listed(own)
                except BaseException:
                    os.close(own)
                    raise
                stack.append(_Level(own, relative + "/", pending, (level.fd, relative, entry)))
                break
            else:
                stack.pop()
                if level.itself is not None:
                    parent, relative, entry = level.itself
                    try:
                        yield parent, relative, entry, level.fd
                    finally:
                        os.close(level.fd)
    finally:
        for level in stack[1:]:
            os.close(level.fd)


def remove_tree(root: Path) -> None:
    """Delete ``root`` and everything under it, never through a symlink (one at ``root`` is itself
    deleted), whatever its depth; best effort: what cannot be deleted stays, and is logged."""
    for _ in range(3):  # a walk stopped by an entry changing under it is made again
        try:
            try:
                top = os.open(root, _DIRECTORY_FLAGS)
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                os.unlink(root)  # a symlink or a file where the directory was
                return
            try:
                for parent, _, entry, own in _entries(top):
                    with contextlib.suppress(FileNotFoundError):
                        if own is not None:
                            os.rmdir(entry.name, dir_fd=parent)
                        else:
                            os.unlink(entry.name, dir_fd=parent)
            finally:
                os.close(top)
            os.rmdir(root)
            return
        except FileNotFoundError:
            return
        except Exception as exc:  # deleting must never stop the agent: logged below
            error = exc
    logger.warning("could not delete all of %s: %s: %s", root, type(error).__name__, error)


@contextlib.contextmanager
def _opened(root: Path) -> Iterator[int]:
    fd = os.open(root, _DIRECTORY_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def seal(root: Path) -> None:
    """Modes that let only the owner change anything under ``root``: whatever the umask, or the
    modes an archive asked for, no group or other write bit, no setuid, setgid or sticky bit.

    Every change is made through a descriptor opened without following symlinks. A symlink,
    a FIFO, a device or a hard link under ``root`` was planted (fetches make none): UnsafePathError.
    """
    with _opened(root) as top:
        os.fchmod(top, DIRECTORY_MODE)
        for parent, relative, entry, own in _entries(top):
            if own is not None:
                os.fchmod(own, DIRECTORY_MODE)
                continue
            found = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
                raise UnsafePathError(f"{relative} is a symlink, a hard link or a special file: planted, never fetched")
            wanted = FILE_MODE | (0o111 if found.st_mode & stat.S_IXUSR else 0)
            if stat.S_IMODE(found.st_mode) != wanted:
                fd = os.open(entry.name, _READ_FLAGS, dir_fd=parent)
                try:
                    if os.fstat(fd).st_ino != found.st_ino:
                        raise UnsafePathError(f"{relative} changed while it was sealed")
                    os.fchmod(fd, wanted)
                finally:
                    os.close(fd)


def files_under(root: Path) -> list[ManifestFile]:
    """Every regular file under ``root`` (but the manifest), with its size; nothing through a symlink."""
    with _opened(root) as top:
        files = [
            ManifestFile(relative, entry.stat(follow_symlinks=False).st_size)
            for _, relative, entry, own in _entries(top)
            if own is None and entry.is_file(follow_symlinks=False) and entry.name != MANIFEST
        ]
    return sorted(files, key=lambda f: f.path)


def remove_unexpected(root: Path, expected: Collection[str]) -> dict[str, int]:
    """Delete what a source no longer lists under ``root`` (and any symlink or special file: fetches
    make none), then the directories left empty; the sizes of the files kept, by relative path."""
    wanted = set(expected)
    kept: dict[str, int] = {}
    with _opened(root) as top:
        for parent, relative, entry, own in _entries(top):
            if own is not None:
                with contextlib.suppress(OSError):  # not empty
                    os.rmdir(entry.name, dir_fd=parent)
            elif relative in wanted and entry.is_file(follow_symlinks=False):
                kept[relative] = entry.stat(follow_symlinks=False).st_size
            else:
                os.unlink(entry.name, dir_fd=parent)
    return kept
