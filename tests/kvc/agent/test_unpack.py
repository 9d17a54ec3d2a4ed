from __future__ import annotations

import io
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from kvc.agent.files import Budget, Tree
from kvc.agent.unpack import UnpackError, extract


def unpack(archive: Path, dest: Path, kind: str, budget: Budget | None = None, max_members: int = 1000) -> list[str]:
    with Tree(dest, budget) as tree, archive.open("rb") as handle:
        return extract(handle, archive.name, tree, kind, max_members=max_members)


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_tar(path: Path, compressed: bool) -> None:
    with tarfile.open(path, "w:gz" if compressed else "w") as tar:
        _add(tar, "data/", kind=tarfile.DIRTYPE)
        _add(tar, "data/train/a.txt", b"alpha")
        _add(tar, "data/b.txt", b"beta")
        _add(tar, "../escape.txt", b"evil")
        _add(tar, "/etc/evil.txt", b"evil")
        _add(tar, "data/link", kind=tarfile.SYMTYPE, link="/etc")
        _add(tar, "data/link/passwd", b"evil through the link")
        _add(tar, "data/hard", kind=tarfile.LNKTYPE, link="/etc/passwd")
        _add(tar, "data/dev", kind=tarfile.CHRTYPE)


@pytest.mark.parametrize(("kind", "compressed"), [("tar", False), ("tar.gz", True)])
def test_tar_extracts_files_and_skips_everything_unsafe(tmp_path: Path, kind: str, compressed: bool) -> None:
    archive = tmp_path / "a.tar"
    make_tar(archive, compressed)
    dest = tmp_path / "root" / "vol"
    dest.mkdir(parents=True)
    skipped = unpack(archive, dest, kind)
    assert (dest / "data/train/a.txt").read_bytes() == b"alpha"
    assert (dest / "data/b.txt").read_bytes() == b"beta"
    assert sorted(skipped) == sorted(["../escape.txt", "/etc/evil.txt", "data/link", "data/hard", "data/dev"])
    # The symlink was never created, so the member "through" it is an ordinary file inside.
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink())
    assert written == ["a.tar", "root/vol/data/b.txt", "root/vol/data/link/passwd", "root/vol/data/train/a.txt"]
    assert not (dest / "data" / "link").is_symlink()


def test_zip_extracts_files_and_skips_traversal_and_symlinks(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("models/bert/weights.bin", b"w" * 100)
        bundle.writestr("models/", b"")
        bundle.writestr("../../escape.txt", b"evil")
        bundle.writestr("/abs.txt", b"evil")
        link = zipfile.ZipInfo("models/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(link, "/etc")
    dest = tmp_path / "vol"
    dest.mkdir()
    skipped = unpack(archive, dest, "zip")
    assert (dest / "models/bert/weights.bin").read_bytes() == b"w" * 100
    assert sorted(skipped) == ["../../escape.txt", "/abs.txt", "models/link"]
    assert not (tmp_path / "escape.txt").exists()
    assert not (dest / "models/link").exists()


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_a_file_that_is_not_an_archive_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "notes.txt"
    archive.write_bytes(b"just text, not an archive")
    with pytest.raises(UnpackError, match=rf"notes\.txt is not a readable {re.escape(kind)} archive"):
        unpack(archive, tmp_path, kind)


def test_unknown_kind_lists_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"")
    with pytest.raises(UnpackError, match=r"unpack must be one of tar, tar\.gz, zip, not 'rar'"):
        unpack(tmp_path / "x", tmp_path, "rar")


ZEROS = 64 << 20  # what each bomb expands to; it weighs some 64 KiB


def _tar_bomb(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = ZEROS
        tar.addfile(info, io.BytesIO(bytes(ZEROS)))


def _zip_bomb(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle, bundle.open("zeros.bin", "w") as member:
        for _ in range(ZEROS >> 20):
            member.write(bytes(1 << 20))


@pytest.mark.parametrize(("kind", "make"), [("tar.gz", _tar_bomb), ("zip", _zip_bomb)])
def test_an_archive_expanding_beyond_the_capacity_fails_having_written_no_byte_past_it(
    tmp_path: Path, kind: str, make: object
) -> None:
    archive = tmp_path / f"bomb.{kind}"
    make(archive)  # type: ignore[operator]
    assert archive.stat().st_size < 1 << 20
    dest = tmp_path / "vol"
    dest.mkdir()
    capacity = 4 << 20
    with pytest.raises(UnpackError, match=r"bomb\.(tar\.gz|zip) expands beyond the volume's capacity \(4Mi"):
        unpack(archive, dest, kind, Budget(capacity=capacity))
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= capacity


def test_an_archive_of_more_members_than_a_volume_may_hold_fails(tmp_path: Path) -> None:
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tar:
        for index in range(11):
            _add(tar, f"f{index}")  # empty files: no bytes, but an inode each
    with pytest.raises(UnpackError, match=r"many\.tar holds more than 10 members"):
        unpack(archive, tmp_path, "tar", max_members=10)


def test_a_symlink_planted_in_the_replica_is_not_extracted_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    dest = tmp_path / "vol"
    (dest / "data").mkdir(parents=True)
    (dest / "data" / "link").symlink_to(outside)
    (dest / "data" / "file").symlink_to(outside / "victim")
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "data/link/victim", b"evil through the directory")
        _add(tar, "data/file", b"evil at the file's name")
    assert sorted(unpack(archive, dest, "tar")) == ["data/file", "data/link/victim"]
    assert [p.name for p in outside.iterdir()] == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious"
