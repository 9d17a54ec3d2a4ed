from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from kvc.agent.files import (
    MANIFEST,
    Manifest,
    ReplicaDir,
    SafeJoin,
    UnsafePathError,
    files_under,
    remove_unexpected,
)


def test_names_are_joined_under_the_root(tmp_path: Path) -> None:
    join = SafeJoin(tmp_path)
    assert join("a/b/c.bin") == tmp_path / "a" / "b" / "c.bin"
    assert join("./a//d.bin") == tmp_path / "a" / "d.bin"


@pytest.mark.parametrize("name", ["../x", "a/../../x", "", "/", "a/.."])
def test_names_that_would_leave_the_root_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError):
        SafeJoin(tmp_path)(name)


def test_a_symlinked_directory_is_refused_at_any_depth(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "link").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="a/link is a symlink"):
        SafeJoin(root)("a/link/file.bin")


def test_a_symlinked_file_is_refused_even_in_a_directory_already_checked(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    join = SafeJoin(tmp_path)
    assert join("d/one.bin") == tmp_path / "d" / "one.bin"
    (tmp_path / "d" / "two.bin").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePathError, match=r"d/two\.bin is a symlink"):
        join("d/two.bin")


def test_a_root_reached_through_a_symlink_is_fine(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    assert SafeJoin(tmp_path / "via")("f.bin") == tmp_path / "via" / "f.bin"


def test_unexpected_files_are_removed_and_the_sizes_of_those_kept_returned(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.bin").write_bytes(b"12345")
    (tmp_path / "d" / "gone.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    kept = remove_unexpected(tmp_path, [PurePosixPath("d/keep.bin"), PurePosixPath("d/new.bin")])
    assert kept == {tmp_path / "d" / "keep.bin": 5}  # new.bin is not there: not in it
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["d", "d/keep.bin"]


def _published(tmp_path: Path) -> ReplicaDir:
    """A replica staged with the loosest modes an archive or a umask could give, then published."""
    replica = ReplicaDir(tmp_path / "vm" / "cifar-1")
    staging = replica.prepare()
    (staging / "train").mkdir()
    for path, mode in [(staging / "train" / "a.bin", 0o777), (staging / "run.sh", 0o4775), (staging / "b.bin", 0o666)]:
        path.write_bytes(b"data")
        path.chmod(mode)
    (staging / "train").chmod(0o1777)
    staging.chmod(0o777)
    replica.publish(Manifest(source="s3://b/", files=files_under(staging)))
    return replica


def test_published_data_is_writable_by_its_owner_alone(tmp_path: Path) -> None:
    final = _published(tmp_path).final
    modes = {str(p.relative_to(final)): stat.S_IMODE(p.stat().st_mode) for p in [final, *final.rglob("*")]}
    assert modes == {
        ".": 0o755,
        "train": 0o755,
        "train/a.bin": 0o755,  # executable by its owner: stays executable, for everyone
        "run.sh": 0o755,  # no setuid
        "b.bin": 0o644,
        MANIFEST: 0o644,
    }


def _as_user(uid: int, action: Callable[[], object]) -> str:
    """Run ``action`` in a child process switched to ``uid``: "allowed", or the error's name."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery past this point, only an exit code
        code = 0
        try:
            os.setgid(uid)
            os.setuid(uid)
            action()
        except PermissionError:
            code = 13
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "allowed", 13: "PermissionError"}.get(os.waitstatus_to_exitcode(status), "other error")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_workload_of_another_user_cannot_change_a_replica() -> None:
    """What a pod under Pod Security `restricted` (never UID 0) can do with the files, even
    through a writable mount: read them, and nothing else."""
    # Not under tmp_path: its parents are private to root, and reading must be possible.
    public = Path(tempfile.mkdtemp(prefix="kvc-seal-"))
    public.chmod(0o755)
    try:
        _check_only_reads(_published(public).final)
    finally:
        shutil.rmtree(public)


def _check_only_reads(final: Path) -> None:
    attempts: dict[str, Callable[[], object]] = {
        "read": (final / "b.bin").read_bytes,
        "overwrite": lambda: (final / "b.bin").write_bytes(b"changed"),
        "append": lambda: (final / "train" / "a.bin").open("ab").close(),
        "create": lambda: (final / "train" / "new.bin").write_bytes(b"new"),
        "delete": (final / "train" / "a.bin").unlink,
        "rename": lambda: (final / "b.bin").rename(final / "c.bin"),
        "chmod": lambda: (final / "b.bin").chmod(0o666),
        "mkdir": (final / "d").mkdir,
    }
    outcome = {what: _as_user(65534, action) for what, action in attempts.items()}
    assert outcome == {what: "allowed" if what == "read" else "PermissionError" for what in attempts}
    assert (final / "b.bin").read_bytes() == b"data"
    assert sorted(p.name for p in final.rglob("*")) == sorted([MANIFEST, "a.bin", "b.bin", "run.sh", "train"])
