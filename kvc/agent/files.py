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

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

MANIFEST = ".kvc-manifest.json"
STAGING_SUFFIX = ".partial"
# Archives to unpack are downloaded here, inside the staging directory, then removed.
DOWNLOADS = ".kvc-download"

# What published data may be: readable by all, writable by its owner (the agent) alone.
DIRECTORY_MODE = 0o755
FILE_MODE = 0o644


def md5_etag(etag: str | None) -> str | None:
    """The MD5 an S3 ETag stands for, when it is one (not for multipart uploads or SSE-KMS)."""
    value = (etag or "").strip('"')
    return value if len(value) == 32 and "-" not in value else None


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class UnsafePathError(ValueError):
    """A source path that would land outside the replica's directory."""


def safe_relative(name: str) -> PurePosixPath:
    """Validate a source-provided relative path (an object key, an archive member).

    Rejects absolute paths, ``..`` components, NUL bytes and empty names; ``.`` and empty
    components (``a//b``) are dropped.
    """
    if "\x00" in name:
        raise UnsafePathError(f"{name!r}: NUL byte in path")
    if name.startswith("/"):
        raise UnsafePathError(f"{name!r}: absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts:
        raise UnsafePathError(f"{name!r}: empty path")
    if ".." in parts:
        raise UnsafePathError(f"{name!r}: '..' would leave the volume's directory")
    if parts[-1] == MANIFEST or parts[0] == DOWNLOADS:
        raise UnsafePathError(f"{name!r}: reserved name")
    return PurePosixPath(*parts)


class SafeJoin:
    """``join(name)`` is ``root / name``, guaranteed to stay under ``root`` even with symlinks on disk.

    No ``..`` part (``safe_relative``) and no symlink at any level below ``root`` means the
    path resolves under ``root``. Each directory is looked at once per joiner: for a data
    set of thousands of files in a few directories, one ``lstat`` per file instead of
    resolving every path from ``/`` (twenty system calls each).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._directories_checked: set[PurePosixPath] = set()

    def __call__(self, name: str) -> Path:
        relative = safe_relative(name)
        for depth in range(1, len(relative.parts) + 1):
            prefix = PurePosixPath(*relative.parts[:depth])
            is_leaf = depth == len(relative.parts)
            if not is_leaf and prefix in self._directories_checked:
                continue
            if (self.root / prefix).is_symlink():
                raise UnsafePathError(f"{name!r}: {prefix} is a symlink")
            if not is_leaf:
                self._directories_checked.add(prefix)
        return self.root / relative


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
        return (self.final / MANIFEST).is_file()

    def manifest(self) -> Manifest | None:
        try:
            return Manifest.load((self.final / MANIFEST).read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def downloads(self) -> Path:
        return self.staging / DOWNLOADS

    def prepare(self) -> Path:
        """The staging directory, created if needed (kept across restarts to resume)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging

    def publish(self, manifest: Manifest) -> None:
        """Make the staged data visible at its final path in one rename, sealed (``seal``)."""
        manifest_path = self.staging / MANIFEST
        manifest_path.write_text(manifest.dump())
        with open(manifest_path, "rb") as handle:
            os.fsync(handle.fileno())
        seal(self.staging)
        if self.final.exists():  # an earlier, now invalid copy (e.g. failed verification)
            shutil.rmtree(self.final)
        os.rename(self.staging, self.final)

    def verify(self, deep: bool = False) -> list[str]:
        """Problems with the published data; [] if intact.

        Checks sizes; ``deep`` also re-reads every file whose ETag is an MD5 and compares.
        """
        manifest = self.manifest()
        if manifest is None:
            return ["manifest missing or unreadable"]
        problems = []
        for entry in manifest.files:
            path = self.final / entry.path
            try:
                size = path.stat().st_size
            except OSError:
                problems.append(f"{entry.path} is missing")
                continue
            if size != entry.size:
                problems.append(f"{entry.path} has {size} bytes, expected {entry.size}")
            elif deep and (expected := md5_etag(entry.etag)) and md5_of(path) != expected:
                problems.append(f"{entry.path} differs from its source (MD5 {expected})")
        return problems

    def unpublish(self) -> None:
        """Turn published data back into staged data, to be checked and completed by a fetch."""
        if self.final.exists() and not self.staging.exists():
            self.final.rename(self.staging)
        (self.staging / MANIFEST).unlink(missing_ok=True)

    def remove(self) -> None:
        for directory in (self.final, self.staging):
            shutil.rmtree(directory, ignore_errors=True)


def seal(root: Path) -> None:
    """Modes that let only the owner change anything under ``root``: whatever the umask, or the
    modes an archive asked for, no group or other write bit, no setuid, setgid or sticky bit.
    Symbolic links are left alone (fetches never make them, and a link's mode means nothing)."""
    os.chmod(root, DIRECTORY_MODE)
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, DIRECTORY_MODE)
        for name in files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, FILE_MODE | (0o111 if mode & stat.S_IXUSR else 0))


def files_under(root: Path) -> list[ManifestFile]:
    """Every regular file under ``root`` (but the manifest), with its size."""
    return [
        ManifestFile(str(path.relative_to(root)), path.stat().st_size)
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink() and path.name != MANIFEST
    ]


def remove_unexpected(staging: Path, expected: Sequence[PurePosixPath]) -> dict[Path, int]:
    """Delete files in a staging directory that the source no longer lists; the sizes of those kept."""
    keep = {staging / path for path in expected}
    kept: dict[Path, int] = {}
    for path in sorted(staging.rglob("*"), reverse=True):
        if path.is_file() or path.is_symlink():
            if path not in keep:
                path.unlink()
            else:
                kept[path] = path.lstat().st_size
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return kept
