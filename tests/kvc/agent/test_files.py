from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvc.agent import files as files_module
from kvc.agent.files import (
    DIRECTORY_BYTES,
    MANIFEST,
    MAX_PATH_DEPTH,
    MAX_PATH_LENGTH,
    Budget,
    CapacityError,
    DiskLimitError,
    Manifest,
    ReplicaDir,
    Tree,
    UnsafePathError,
    files_under,
    remove_unexpected,
    safe_relative,
    seal,
)


def test_names_are_made_relative_and_plain() -> None:
    assert str(safe_relative("a/b/c.bin")) == "a/b/c.bin"
    assert str(safe_relative("./a//d.bin")) == "a/d.bin"


@pytest.mark.parametrize("name", ["../x", "a/../../x", "", "/", "a/..", "/etc/passwd"])
def test_names_that_would_leave_the_root_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relative(name)


def test_a_symlinked_directory_is_never_written_through_at_any_depth(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "link").symlink_to(outside)
    with Tree(root) as tree, pytest.raises(UnsafePathError, match="a/link is a symlink"):
        tree.file("a/link/victim").write_bytes(b"evil")
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious"


def test_a_symlink_at_a_files_own_name_is_neither_written_nor_truncated(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    with Tree(root) as tree:
        tree.file("d/one.bin").write_bytes(b"1")  # the directory is open and kept from here on
        (root / "d" / "two.bin").symlink_to(outside / "victim")
        for append in (False, True):
            with pytest.raises(UnsafePathError, match=r"d/two\.bin is a symlink"):
                tree.file("d/two.bin").open(append=append)
        with pytest.raises(UnsafePathError):
            tree.file("d/two.bin").write_bytes(b"evil", exclusive=True)
        with pytest.raises(UnsafePathError):
            tree.file("d/two.bin").read()
    assert (outside / "victim").read_bytes() == b"precious"


def test_a_directory_swapped_for_a_symlink_after_it_was_opened_is_not_followed(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with Tree(root) as tree:
        tree.directory("d")
        (root / "d").rename(root / "moved")
        (root / "d").symlink_to(outside)
        tree.file("d/victim").write_bytes(b"written where the directory went")
        with Tree(root) as fresh, pytest.raises(UnsafePathError):  # and a new walk refuses the link
            fresh.file("d/victim").write_bytes(b"evil")
    assert (outside / "victim").read_bytes() == b"precious"
    assert (root / "moved" / "victim").read_bytes() == b"written where the directory went"


def test_hard_links_and_fifos_are_refused_without_blocking(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.link(outside / "victim", root / "hard")
    os.mkfifo(root / "fifo")
    with Tree(root) as tree:
        for name in ("hard", "fifo"):
            with pytest.raises(UnsafePathError):
                tree.file(name).write_bytes(b"evil")
    assert (outside / "victim").read_bytes() == b"precious"


def test_a_root_reached_through_a_symlinked_parent_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real" / "replica").mkdir(parents=True)
    (tmp_path / "via").symlink_to(tmp_path / "real")
    with Tree(tmp_path / "via" / "replica") as tree:
        tree.file("a/f.bin").write_bytes(b"x")
    assert (tmp_path / "real" / "replica" / "a" / "f.bin").read_bytes() == b"x"


def test_bytes_past_the_capacity_are_never_written(tmp_path: Path) -> None:
    with Tree(tmp_path, Budget(capacity=10)) as tree:
        tree.file("a").write_bytes(b"12345")
        with tree.file("b").open() as handle:
            handle.write(b"1234")
            with pytest.raises(CapacityError, match=r"writing b would take the volume's data past its capacity"):
                handle.write(b"56")
        tree.file("a").write_bytes(b"123456")  # rewriting a file frees what it held
        tree.file("a").unlink()
        assert tree.budget.used == 4
    assert (tmp_path / "b").read_bytes() == b"1234"


def test_under_the_free_disk_floor_nothing_more_is_written(tmp_path: Path) -> None:
    budget = Budget(min_free_disk=1 << 60, disk=tmp_path)  # an exabyte: more than any disk has free
    with pytest.raises(DiskLimitError, match=r"under the 1024Pi|--min-free-disk"):
        budget.check_disk()
    budget.min_free_disk = 0  # the fetch starts, then the disk fills
    with Tree(tmp_path, budget) as tree, tree.file("big").open() as handle:
        handle.write(bytes(1 << 20))
        budget.min_free_disk = 1 << 60
        with pytest.raises(DiskLimitError):
            handle.write(bytes(64 << 20))  # more than DISK_CHECK_BYTES: the disk is looked at first
    assert (tmp_path / "big").stat().st_size == 1 << 20


def test_unexpected_files_and_any_symlink_are_removed_and_the_sizes_of_those_kept_returned(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "keep.bin").write_bytes(b"12345")
    (root / "d" / "gone.bin").write_bytes(b"x")
    (root / "d" / "listed-link").symlink_to(outside / "victim")
    (root / "dirlink").symlink_to(outside)
    (root / "empty").mkdir()
    kept = remove_unexpected(root, ["d/keep.bin", "d/new.bin", "d/listed-link", "dirlink/victim"])
    assert kept == {"d/keep.bin": 5}  # new.bin is not there: not in it
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["d", "d/keep.bin"]
    assert (outside / "victim").read_bytes() == b"precious"


def test_sealing_never_changes_what_a_planted_symlink_points_to(tmp_path: Path, outside: Path) -> None:
    (outside / "victim").chmod(0o600)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "link").symlink_to(outside / "victim")
    with pytest.raises(UnsafePathError, match="link is a symlink"):
        seal(staging)
    assert stat.S_IMODE((outside / "victim").stat().st_mode) == 0o600


def test_a_symlink_in_published_data_fails_its_verification(tmp_path: Path, outside: Path) -> None:
    replica = _published(tmp_path)
    (replica.final / "b.bin").unlink()
    (replica.final / "b.bin").symlink_to(outside / "victim")
    assert replica.verify(deep=True) == ["b.bin is not a regular file"]


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


# --------------------------------------------------------------------------- depth


def test_names_deeper_or_longer_than_a_replica_may_hold_are_refused() -> None:
    assert len(safe_relative("/".join(["d"] * MAX_PATH_DEPTH)).parts) == MAX_PATH_DEPTH
    with pytest.raises(UnsafePathError, match=f"deeper than {MAX_PATH_DEPTH} directories"):
        safe_relative("/".join(["d"] * (MAX_PATH_DEPTH + 1)))
    with pytest.raises(UnsafePathError, match=f"longer than {MAX_PATH_LENGTH} characters"):
        safe_relative("a/" + "x" * MAX_PATH_LENGTH)


def _deep_tree(root: Path, depth: int) -> None:
    """``root/d/d/.../d/f`` ``depth`` directories deep, made relative to each parent's descriptor
    (no path that long could be given whole)."""
    root.mkdir(parents=True, exist_ok=True)
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fds[-1])
            fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fds[-1]))
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture
def shallow_recursion() -> Iterator[int]:
    """A recursion limit a tree of that many levels is deeper than (as 1,500 levels are than Python's own)."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(200)
    yield 300
    sys.setrecursionlimit(before)


def test_a_tree_deeper_than_the_recursion_limit_is_listed_sealed_cleaned_and_removed(
    tmp_path: Path, shallow_recursion: int
) -> None:
    replica = ReplicaDir(tmp_path / "vm" / "deep")
    _deep_tree(replica.staging, shallow_recursion)
    _deep_tree(replica.final, shallow_recursion)
    deepest = "/".join(["d"] * shallow_recursion) + "/f"
    assert [f.path for f in files_under(replica.staging)] == [deepest]
    seal(replica.staging)
    assert remove_unexpected(replica.staging, [deepest]) == {deepest: 0}
    assert remove_unexpected(replica.staging, []) == {}  # the file, then every directory left empty
    assert os.listdir(replica.staging) == []
    _deep_tree(replica.staging, shallow_recursion)
    replica.remove()
    assert not replica.exists


def test_removing_a_replica_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replica = ReplicaDir(tmp_path / "vm" / "r")
    _deep_tree(replica.final, 3)

    def broken(*_: object, **__: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(files_module, "_entries", broken)
    replica.remove()  # logged; left for the next attempt
    assert replica.final.exists()
    monkeypatch.undo()
    replica.remove()
    assert not replica.exists


def test_directories_made_are_charged_to_the_capacity(tmp_path: Path) -> None:
    with Tree(tmp_path, Budget(capacity=10 * DIRECTORY_BYTES)) as tree:
        for index in range(10):
            tree.directory(f"d{index}")
        tree.directory("d0")  # there already: no charge
        assert tree.budget.used == 10 * DIRECTORY_BYTES
        with pytest.raises(CapacityError, match=r"the directory d10 would take the volume's data past its capacity"):
            tree.directory("d10/e")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"d{index}" for index in range(10)]


# --------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("planted", ["fifo", "symlink"])
def test_a_fifo_or_a_symlink_at_the_manifests_name_is_no_manifest(tmp_path: Path, outside: Path, planted: str) -> None:
    replica = _published(tmp_path)
    manifest = replica.final / MANIFEST
    (outside / "manifest.json").write_text(manifest.read_text())
    manifest.chmod(0o644)
    manifest.unlink()
    if planted == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to(outside / "manifest.json")
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.extend([replica.complete, replica.manifest()]), daemon=True)
    reader.start()
    reader.join(5)
    assert found == [False, None]  # not blocked on the FIFO; not read through the symlink


def test_a_manifest_larger_than_any_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replica = _published(tmp_path)
    assert replica.manifest() is not None
    monkeypatch.setattr(files_module, "MAX_MANIFEST_BYTES", 10)
    assert replica.manifest() is None
