"""The agent's write path under attack, through the whole S3 and HTTP fetches against a loopback
server and the real file system: symlinks planted or swapped in, capacity, the free-disk
floor, endless listings and bodies longer than listed."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from kvc.agent.files import DIRECTORY_BYTES, DOWNLOADS, DiskLimitError, Limits, Manifest, ReplicaDir, UnsafePathError
from kvc.agent.unpack import UnpackError
from kvc.sources import s3_fetch
from kvc.sources._s3url import parse_url
from kvc.sources.base import FetchRequest
from kvc.sources.http import HTTPSource
from kvc.sources.transfer import FetchError, Progress
from tests.kvc.sources.loopback import LoopbackS3, listing_page

MIB = 1 << 20


@pytest.fixture
def s3() -> Iterator[LoopbackS3]:
    with LoopbackS3().running() as server:
        yield server


def untouched(outside: Path) -> bool:
    return sorted(p.name for p in outside.iterdir()) == ["victim"] and (outside / "victim").read_bytes() == b"precious"


def s3_fetch_into(server: LoopbackS3, replica: ReplicaDir, limits: Limits | None = None) -> Manifest:
    return s3_fetch.fetch(server.client(), "s3://bucket/p/", replica, Progress(), workers=1, limits=limits or Limits())


def http_fetch_into(server: LoopbackS3, replica: ReplicaDir, keys: list[str], limits: Limits | None = None) -> Manifest:
    options = {"url": ",".join(f"{server.url}/bucket/{key}" for key in keys)}
    return HTTPSource().fetch(
        FetchRequest(options, {}, replica, Progress(), threading.Event(), limits=limits or Limits())
    )


def in_background(run: Callable[[], Manifest]) -> Future[Manifest]:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


# --------------------------------------------------------------------------- symlinks


def test_s3_symlinks_planted_in_the_staging_directory_are_removed_not_written_through(
    s3: LoopbackS3, tmp_path: Path, outside: Path
) -> None:
    s3.objects = {"p/a/victim": b"data through a directory", "p/b.bin": b"data at the file's name"}
    replica = ReplicaDir(tmp_path / "vol")
    replica.prepare()
    (replica.staging / "a").symlink_to(outside)
    (replica.staging / "b.bin").symlink_to(outside / "victim")
    s3_fetch_into(s3, replica)
    assert untouched(outside)
    assert (replica.final / "a" / "victim").read_bytes() == b"data through a directory"
    assert (replica.final / "b.bin").read_bytes() == b"data at the file's name"
    assert not (replica.final / "a").is_symlink()


def test_s3_a_directory_swapped_for_a_symlink_during_a_download_is_never_followed(
    s3: LoopbackS3, tmp_path: Path, outside: Path
) -> None:
    s3.objects = {"p/a.bin": bytes(2 * MIB), "p/d/victim": b"written after the swap"}
    halfway, resume = s3.pause("p/a.bin")
    replica = ReplicaDir(tmp_path / "vol")
    fetching = in_background(lambda: s3_fetch_into(s3, replica))
    assert halfway.wait(10)
    (replica.staging / "d").rename(replica.staging / "moved")
    (replica.staging / "d").symlink_to(outside)
    resume.set()
    with pytest.raises(UnsafePathError, match="d is a symlink"):  # found when sealing: never published
        fetching.result(30)
    assert untouched(outside)
    assert not replica.final.exists()


def test_http_symlinks_planted_at_a_files_name_or_for_the_downloads_are_removed_not_written_through(
    s3: LoopbackS3, tmp_path: Path, outside: Path
) -> None:
    s3.objects = {"model.bin": b"the model"}
    replica = ReplicaDir(tmp_path / "vol")
    replica.prepare()
    (replica.staging / "model.bin").symlink_to(outside / "victim")
    http_fetch_into(s3, replica, ["model.bin"])
    assert untouched(outside)
    assert (replica.final / "model.bin").read_bytes() == b"the model"


def _tar(members: dict[str, bytes], compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compressed else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_http_the_downloads_directory_swapped_for_a_symlink_during_a_download_is_never_followed(
    s3: LoopbackS3, tmp_path: Path, outside: Path
) -> None:
    s3.objects = {"a.tar": _tar({"a.txt": bytes(2 * MIB)}), "b.tar": _tar({"b.txt": b"b"})}
    halfway, resume = s3.pause("a.tar")
    s3.held["b.tar"] = hold = threading.Event()  # b.tar is opened only after the swap
    replica = ReplicaDir(tmp_path / "vol")
    options = {"url": f"{s3.url}/bucket/a.tar,{s3.url}/bucket/b.tar", "unpack": "tar"}
    request = FetchRequest(options, {}, replica, Progress(), threading.Event())
    fetching = in_background(lambda: HTTPSource().fetch(request))
    assert halfway.wait(10)
    (replica.staging / DOWNLOADS).rename(replica.staging / "moved")
    (replica.staging / DOWNLOADS).symlink_to(outside)
    hold.set()
    resume.set()
    with pytest.raises((UnsafePathError, OSError)):
        fetching.result(30)
    assert untouched(outside)


# --------------------------------------------------------------------------- disk


def test_s3_a_listing_beyond_the_capacity_fails_before_a_byte_is_written(s3: LoopbackS3, tmp_path: Path) -> None:
    s3.objects = {f"p/{i}.bin": bytes(MIB) for i in range(3)}
    replica = ReplicaDir(tmp_path / "vol")
    with pytest.raises(
        FetchError, match=r"hold 3145728 bytes in 0 directories, more than the volume's capacity \(2Mi\)"
    ):
        s3_fetch_into(s3, replica, Limits(capacity=2 * MIB))
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    assert not any(path.startswith("/bucket/p/") for path in s3.requests)


def test_s3_the_directories_a_listing_needs_count_before_a_byte_is_written(s3: LoopbackS3, tmp_path: Path) -> None:
    """Files that fill the capacity exactly, in directories that would take it past: refused up front."""
    s3.objects = {f"p/{d}/sub/{i}.bin": bytes(MIB // 2) for d in ("a", "b") for i in range(2)}
    replica = ReplicaDir(tmp_path / "vol")
    with pytest.raises(FetchError, match=r"hold 2097152 bytes in 4 directories, more than the volume's capacity"):
        s3_fetch_into(s3, replica, Limits(capacity=2 * MIB))
    assert not any(path.startswith("/bucket/p/") for path in s3.requests)
    s3_fetch_into(s3, ReplicaDir(tmp_path / "roomier"), Limits(capacity=2 * MIB + 4 * DIRECTORY_BYTES))


def test_http_a_body_beyond_the_capacity_fails_at_its_announced_length_or_once_it_has_filled_it(
    s3: LoopbackS3, tmp_path: Path
) -> None:
    s3.objects = {"announced.bin": bytes(3 * MIB), "unannounced.bin": bytes(3 * MIB)}
    s3.no_length.add("unannounced.bin")
    for key, written, message in [
        ("announced.bin", 0, r"announced\.bin: its 3145728 bytes would take the volume's data past its capacity"),
        ("unannounced.bin", MIB, r"writing unannounced\.bin would take the volume's data past its capacity \(1Mi\)"),
    ]:
        replica = ReplicaDir(tmp_path / key)
        with pytest.raises(DiskLimitError, match=message):
            http_fetch_into(s3, replica, [key], Limits(capacity=MIB))
        assert (replica.staging / key).stat().st_size == written


@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "tar.gz"])
def test_http_an_archive_expanding_beyond_the_capacity_fails_the_volume(
    s3: LoopbackS3, tmp_path: Path, compressed: bool
) -> None:
    s3.objects = {"bomb.tar": _tar({"zeros.bin": bytes(8 * MIB)}, compressed)}
    replica = ReplicaDir(tmp_path / "vol")
    request = FetchRequest(
        {"url": f"{s3.url}/bucket/bomb.tar", "unpack": "tar.gz" if compressed else "tar"},
        {},
        replica,
        Progress(),
        threading.Event(),
        limits=Limits(capacity=4 * MIB),
    )
    with pytest.raises((UnpackError, DiskLimitError), match=r"capacity \(4Mi"):
        HTTPSource().fetch(request)
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) <= 4 * MIB


def test_no_fetch_writes_under_the_free_disk_floor_and_the_message_names_the_flag(
    s3: LoopbackS3, tmp_path: Path
) -> None:
    s3.objects = {"p/a.bin": b"a", "model.bin": b"m"}
    floor = Limits(min_free_disk=1 << 60)  # an exabyte: more than this disk has free
    with pytest.raises(DiskLimitError, match=r"the node's free disk is down to .*\(--min-free-disk\): stopped writing"):
        s3_fetch_into(s3, ReplicaDir(tmp_path / "s3"), floor)
    with pytest.raises(DiskLimitError, match=r"--min-free-disk"):
        http_fetch_into(s3, ReplicaDir(tmp_path / "http"), ["model.bin"], floor)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# --------------------------------------------------------------------------- memory


def test_s3_a_listing_of_more_keys_than_a_volume_may_hold_stops_there(s3: LoopbackS3, tmp_path: Path) -> None:
    s3.pages = lambda token: listing_page(
        [(f"p/{token}-{i:04d}", 1) for i in range(1000)], f"{int(token or 0) + 1}"
    )  # a thousand new keys per answer, forever
    with pytest.raises(FetchError, match=r"more than 2500 keys; a volume holds at most 2500 objects"):
        s3_fetch_into(s3, ReplicaDir(tmp_path / "vol"), Limits(max_objects=2500))
    assert len(s3.requests) == 3


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda token: f"{int(token or 0) + 1}", "100 answers in a row said more keys follow, and gave none"),
        (lambda token: "again", "the same continuation token twice"),
    ],
    ids=["new-tokens", "same-token"],
)
def test_s3_a_listing_that_never_ends_fails_with_a_message(
    s3: LoopbackS3, tmp_path: Path, token: Callable[[str | None], str], message: str
) -> None:
    s3.pages = lambda previous: listing_page([], token(previous))
    with pytest.raises(FetchError, match=message):
        s3_fetch_into(s3, ReplicaDir(tmp_path / "vol"))
    assert len(s3.requests) <= 101


@pytest.mark.parametrize("size", [10, 2 * MIB, 9 * MIB], ids=["in-memory", "streamed", "large"])
def test_s3_a_body_longer_than_its_listed_size_fails_unread(s3: LoopbackS3, tmp_path: Path, size: int) -> None:
    s3.objects = {"p/x.bin": bytes(size)}
    s3.announced["p/x.bin"] = 1 << 40  # a TiB: read whole, or buffered, it would never end
    replica = ReplicaDir(tmp_path / "vol")
    with pytest.raises(FetchError, match=rf"object p/x\.bin answered {1 << 40} bytes where its listing said {size}"):
        s3_fetch_into(s3, replica)
    assert (replica.staging / "x.bin").stat().st_size == 0 if size > MIB else not (replica.staging / "x.bin").exists()


def test_s3_a_listing_of_folder_markers_forever_fails_after_a_bounded_number_of_requests(
    s3: LoopbackS3, tmp_path: Path
) -> None:
    def markers(token: str | None) -> bytes:
        page = int(token or 0)
        # A thousand new "folder" markers (nothing kept) per answer; the 50th answer would end it.
        return listing_page([(f"p/d{page}-{i}/", 0) for i in range(1000)], f"{page + 1}" if page < 50 else None)

    s3.pages = markers
    with pytest.raises(FetchError, match=r"more than 5000 keys listed, 0 of them objects"):
        s3_fetch_into(s3, ReplicaDir(tmp_path / "vol"), Limits(max_objects=2500))
    assert len(s3.requests) == 6


def test_s3_a_continuation_token_given_again_later_fails(s3: LoopbackS3, tmp_path: Path) -> None:
    # a, b, a, b...; the 20th answer would end it.
    s3.pages = lambda token: listing_page(
        [("p/d/", 0)], ("b" if token == "a" else "a") if len(s3.requests) < 20 else None
    )
    with pytest.raises(FetchError, match=r"the same continuation token twice"):
        s3_fetch_into(s3, ReplicaDir(tmp_path / "vol"))
    assert len(s3.requests) == 3


@pytest.mark.parametrize("ends", ["stop", "timeout"])
def test_s3_a_listing_in_progress_ends_when_its_fetch_is_stopped_or_out_of_time(
    s3: LoopbackS3, tmp_path: Path, ends: str
) -> None:
    stop = threading.Event()

    def slow_markers(token: str | None) -> bytes:
        page = int(token or 0)
        if page == 10 and ends == "stop":
            stop.set()  # the volume is deleted
        time.sleep(0.02)
        # One marker per answer: no bound on keys or empty answers is near; the 200th would end it.
        return listing_page([(f"p/d{page}/", 0)], f"{page + 1}" if page < 200 else None)

    s3.pages = slow_markers
    message = r"^stopped$" if ends == "stop" else r"timed out listing s3://bucket/p/"
    timeout = 0.5 if ends == "timeout" else None
    with pytest.raises(FetchError, match=message):
        s3_fetch.fetch(
            s3.client(),
            "s3://bucket/p/",
            ReplicaDir(tmp_path / "vol"),
            Progress(),
            workers=1,
            stop=stop,
            timeout=timeout,
        )
    assert len(s3.requests) <= (11 if ends == "stop" else 40)


def test_s3_the_boto3_listing_behind_a_proxy_is_bounded_too(s3: LoopbackS3) -> None:
    s3.pages = lambda token: listing_page(
        [(f"p/d{token}-{i}/", 0) for i in range(1000)], f"{int(token or 0) + 1}" if int(token or 0) < 50 else None
    )
    with pytest.raises(FetchError, match=r"more than 5000 keys listed, 0 of them objects"):
        s3_fetch.list_objects(s3.client(), parse_url("s3://bucket/p/"), None, 2500)
    assert len(s3.requests) == 6


def test_s3_a_key_deeper_than_a_volume_may_hold_is_skipped_and_nothing_deep_made(
    s3: LoopbackS3, tmp_path: Path
) -> None:
    deep = "p/" + "/".join(["d"] * 1500) + "/f"
    s3.objects = {deep: b"x", "p/ok.txt": b"ok"}
    replica = ReplicaDir(tmp_path / "vol")
    manifest = s3_fetch_into(s3, replica)
    assert manifest.skipped == [deep]
    assert sorted(p.name for p in replica.final.iterdir()) == [".kvc-manifest.json", "ok.txt"]
