from __future__ import annotations

import io
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from kvc.agent.unpack import UnpackError, extract


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
    skipped = extract(archive, dest, kind)
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
    skipped = extract(archive, dest, "zip")
    assert (dest / "models/bert/weights.bin").read_bytes() == b"w" * 100
    assert sorted(skipped) == ["../../escape.txt", "/abs.txt", "models/link"]
    assert not (tmp_path / "escape.txt").exists()
    assert not (dest / "models/link").exists()


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_a_file_that_is_not_an_archive_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "notes.txt"
    archive.write_bytes(b"just text, not an archive")
    with pytest.raises(UnpackError, match=rf"notes\.txt is not a readable {re.escape(kind)} archive"):
        extract(archive, tmp_path, kind)


def test_unknown_kind_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnpackError, match=r"unpack must be one of tar, tar\.gz, zip, not 'rar'"):
        extract(tmp_path / "x", tmp_path, "rar")
