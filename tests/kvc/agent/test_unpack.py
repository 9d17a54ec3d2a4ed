from __future__ import annotations

import contextlib
import gzip
import io
import re
import stat
import struct
import tarfile
import tracemalloc
import zipfile
from collections.abc import Callable
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


# --------------------------------------------------------------------------- memory and depth


def _peak_while(action: Callable[[], object]) -> int:
    """The most bytes Python held at once while ``action`` ran (what it raised is the caller's)."""
    tracemalloc.start()
    try:
        with contextlib.suppress(UnpackError):
            action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("header", "form"),
    [("GNU long-name", tarfile.GNU_FORMAT), ("pax", tarfile.PAX_FORMAT)],
    ids=["gnu-long-name", "pax"],
)
def test_a_tar_header_declaring_megabytes_fails_without_reading_them(tmp_path: Path, header: str, form: int) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with gzip.open(archive, "wb") as packed, tarfile.open(fileobj=packed, mode="w", format=form) as tar:
        info = tarfile.TarInfo("x" * (16 << 20))  # 16 MiB of name: a 16 KB archive
        if form == tarfile.PAX_FORMAT:
            info.name, info.pax_headers = "a", {"comment": "x" * (16 << 20)}
        tar.addfile(info, io.BytesIO())
    assert archive.stat().st_size < 100_000
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(
        UnpackError, match=rf"bomb\.tar\.gz is not a readable tar\.gz archive: a {header} header of \d+ bytes"
    ):
        unpack(archive, dest, "tar.gz")
    assert _peak_while(lambda: unpack(archive, dest, "tar.gz")) < 4 << 20
    assert list(dest.iterdir()) == []


def test_extended_tar_headers_in_a_row_are_bounded(tmp_path: Path) -> None:
    long_name = tarfile.TarInfo("././@LongLink")
    long_name.type, long_name.size = tarfile.GNUTYPE_LONGNAME, 100
    block = long_name.tobuf(tarfile.USTAR_FORMAT) + b"n" * 100 + bytes(412)
    archive = tmp_path / "chain.tar"
    archive.write_bytes(block * 5000 + bytes(1024))  # each header read inside the last by tarfile
    with pytest.raises(UnpackError, match=r"more than 8 extended headers in a row"):
        unpack(archive, tmp_path, "tar")


def _zip_of_entries(count: int, declared: int) -> bytes:
    """A zip of one local file and ``count`` central directory entries naming it, saying ``declared``."""
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    entry = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
    directory = (entry + b"a") * count
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, min(declared, 0xFFFF), min(declared, 0xFFFF), len(directory), len(local), 0
    )
    return local + directory + end


@pytest.mark.parametrize("declared", [20_000, 1], ids=["said", "lied-about"])
def test_a_zip_of_more_entries_than_a_volume_may_hold_fails_before_they_are_read(tmp_path: Path, declared: int) -> None:
    archive = tmp_path / "many.zip"
    archive.write_bytes(_zip_of_entries(20_000, declared))  # 940 KB: 20,000 ZipInfos
    with pytest.raises(UnpackError, match=r"many\.zip (declares 20000|holds more than 1000) members"):
        unpack(archive, tmp_path, "zip")
    assert _peak_while(lambda: unpack(archive, tmp_path, "zip")) < 4 << 20


def test_a_zip_central_directory_larger_than_its_members_could_need_is_not_read(tmp_path: Path) -> None:
    archive = tmp_path / "big.zip"
    archive.write_bytes(_zip_of_entries(40_000, 1))
    with pytest.raises(UnpackError, match=r"big\.zip has a central directory of 1880000 bytes, more than the 1048576"):
        unpack(archive, tmp_path, "zip", max_members=10)


def test_a_path_deeper_than_a_replica_may_hold_is_skipped_and_nothing_deep_made(tmp_path: Path) -> None:
    archive = tmp_path / "deep.tar.gz"
    deep = "/".join(["d"] * 1500) + "/f"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, deep, b"x")
        _add(tar, "/".join(["e"] * 1500) + "/", kind=tarfile.DIRTYPE)
        _add(tar, "ok.txt", b"ok")
    assert archive.stat().st_size < 1000
    dest = tmp_path / "dest"
    dest.mkdir()
    assert unpack(archive, dest, "tar.gz") == [deep, "/".join(["e"] * 1500)]
    assert sorted(p.name for p in dest.iterdir()) == ["ok.txt"]


def test_empty_directories_count_against_the_capacity(tmp_path: Path) -> None:
    archive = tmp_path / "dirs.tar"
    with tarfile.open(archive, "w") as tar:
        for index in range(100):
            _add(tar, f"d{index}/", kind=tarfile.DIRTYPE)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnpackError, match=r"dirs\.tar expands beyond the volume's capacity \(40Ki"):
        unpack(archive, dest, "tar", Budget(capacity=40 << 10))
    assert len(list(dest.iterdir())) == 10
