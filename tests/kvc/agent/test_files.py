from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from kvc.agent.files import SafeJoin, UnsafePathError, remove_unexpected


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
