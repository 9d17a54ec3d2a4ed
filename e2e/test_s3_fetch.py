"""The agent's S3 fetcher against a real S3 server on loopback (no Kubernetes needed)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from e2e.helpers import tree
from e2e.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server
from kvc.agent.files import MANIFEST, ReplicaDir
from kvc.sources import _s3http
from kvc.sources._s3http import ObjectGetter
from kvc.sources._s3url import parse_url
from kvc.sources.s3_fetch import fetch, list_objects, make_client
from kvc.sources.transfer import FetchError, Progress


@pytest.fixture
def bucket(s3: S3Server) -> tuple[Any, str]:
    client = s3.client()
    name = f"fetch-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def agent_client(s3: S3Server) -> Any:
    return make_client(s3.endpoint_url, "us-east-1", ACCESS_KEY_ID, SECRET_ACCESS_KEY, workers=8)


def seed(client: Any, bucket: str, objects: dict[str, bytes]) -> None:
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def test_prefix_is_copied_with_nested_keys_and_published_atomically(
    bucket: tuple[Any, str], agent_client: Any, tmp_path: Path
) -> None:
    client, name = bucket
    objects = {f"data/train/{i:03d}.bin": os.urandom(1000 + i) for i in range(120)}
    objects["data/labels.csv"] = b"a,b\n1,2\n"
    objects["data/"] = b""  # a "folder" marker: no file
    objects["other/ignored.txt"] = b"not under the prefix"
    seed(client, name, objects)
    replica = ReplicaDir(tmp_path / "vol")
    progress = Progress()
    manifest = fetch(agent_client, f"s3://{name}/data/", replica, progress)
    assert replica.complete
    assert not replica.staging.exists()
    expected = {
        k.removeprefix("data/"): hashlib.sha256(v).hexdigest()
        for k, v in objects.items()
        if k.startswith("data/") and k != "data/"
    }
    assert tree(replica.final) == expected
    assert progress.files == 121
    assert (
        progress.bytes
        == progress.total_bytes
        == manifest.total_bytes
        == sum(len(v) for k, v in objects.items() if k.startswith("data/"))
    )
    assert replica.verify() == []


def test_the_direct_listing_reads_what_botocore_reads_over_several_pages(
    bucket: tuple[Any, str], agent_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, name = bucket
    odd = ["data/a b.bin", "data/plus+sign.bin", "data/%41-not-escaped.bin", "data/é&=?.bin", "data/dir/"]
    seed(client, name, {key: b"x" * (i % 7) for i, key in enumerate([*odd, *(f"data/n{i:04d}" for i in range(1001))])})
    seed(client, name, {"elsewhere/x.bin": b"x"})
    location = parse_url(f"s3://{name}/data/")
    pages: list[bytes] = []
    parse = _s3http.parse_listing

    def counted(body: bytes) -> tuple[list[tuple[str, int, str | None]], str | None]:
        pages.append(body)
        return parse(body)

    monkeypatch.setattr(_s3http, "parse_listing", counted)
    direct = list_objects(agent_client, location, ObjectGetter(agent_client, name))
    assert len(pages) == 2  # a thousand keys per answer
    assert direct == list_objects(agent_client, location)  # botocore's paginator
    assert len(direct) == 1005  # the folder marker and the other prefix left out
    assert {o.key for o in direct} >= set(odd[:4])


def test_single_object_lands_under_its_base_name(bucket: tuple[Any, str], agent_client: Any, tmp_path: Path) -> None:
    client, name = bucket
    seed(client, name, {"models/bert/model.bin": b"weights" * 1000})
    replica = ReplicaDir(tmp_path / "model")
    fetch(agent_client, f"s3://{name}/models/bert/model.bin", replica, Progress())
    assert (replica.final / "model.bin").read_bytes() == b"weights" * 1000


def test_malicious_keys_never_write_outside_the_replica(
    bucket: tuple[Any, str], agent_client: Any, tmp_path: Path
) -> None:
    client, name = bucket
    seed(
        client,
        name,
        {
            "set/ok.txt": b"fine",
            "set/../escape.txt": b"evil",
            "set/a/../../escape2.txt": b"evil",
            "set//abs.txt": b"absolute once the prefix is cut",
        },
    )
    root = tmp_path / "node"
    replica = ReplicaDir(root / "vol")
    manifest = fetch(agent_client, f"s3://{name}/set/", replica, Progress())
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["node/vol/.kvc-manifest.json", "node/vol/ok.txt"]
    assert sorted(manifest.skipped) == ["set/../escape.txt", "set//abs.txt", "set/a/../../escape2.txt"]


def test_a_bucket_of_only_unsafe_keys_fails_clearly(bucket: tuple[Any, str], agent_client: Any, tmp_path: Path) -> None:
    client, name = bucket
    seed(client, name, {"/etc/passwd": b"evil", "../up.txt": b"evil"})
    replica = ReplicaDir(tmp_path / "vol")
    with pytest.raises(FetchError, match="every key would escape the volume's directory"):
        fetch(agent_client, f"s3://{name}/", replica, Progress())
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_symlink_planted_in_staging_is_not_followed(bucket: tuple[Any, str], agent_client: Any, tmp_path: Path) -> None:
    client, name = bucket
    seed(client, name, {"p/sub/file.txt": b"data", "p/top.txt": b"top"})
    outside = tmp_path / "outside"
    outside.mkdir()
    replica = ReplicaDir(tmp_path / "vol")
    replica.prepare()
    (replica.staging / "sub").symlink_to(outside)
    manifest = fetch(agent_client, f"s3://{name}/p/", replica, Progress())
    assert list(outside.iterdir()) == []
    # Fetches make no symlinks: a planted one is removed, and the data goes where it belongs.
    assert manifest.skipped == []
    assert not (replica.final / "sub").is_symlink()
    assert (replica.final / "sub" / "file.txt").read_bytes() == b"data"


@pytest.mark.parametrize("mib", [3, 9], ids=["streamed", "large-on-a-thread"])
def test_a_partial_file_is_resumed_with_a_range_request(
    s3: S3Server, bucket: tuple[Any, str], agent_client: Any, tmp_path: Path, mib: int
) -> None:
    client, name = bucket
    body = os.urandom(mib * 1024 * 1024 + 17)
    seed(client, name, {"big/blob.bin": body})
    replica = ReplicaDir(tmp_path / "vol")
    replica.prepare()
    half = len(body) // 2
    (replica.staging / "blob.bin").write_bytes(body[:half])  # what a killed agent left
    progress = Progress()
    fetch(agent_client, f"s3://{name}/big/", replica, progress)
    assert (replica.final / "blob.bin").read_bytes() == body
    # One GET, answered with part of the object (206), and only the missing bytes counted.
    gets = [line for line in s3.log_path.read_text().splitlines() if f"GET /{name}/big/blob.bin " in line]
    assert len(gets) == 1
    assert gets[0].endswith(" 206 -")
    assert progress.bytes == len(body)


def test_a_corrupted_file_of_the_right_size_is_fetched_again(
    bucket: tuple[Any, str], agent_client: Any, tmp_path: Path
) -> None:
    client, name = bucket
    body = os.urandom(50_000)
    seed(client, name, {"c/file.bin": body})
    replica = ReplicaDir(tmp_path / "vol")
    replica.prepare()
    (replica.staging / "file.bin").write_bytes(bytes(len(body)))
    fetch(agent_client, f"s3://{name}/c/", replica, Progress())
    assert (replica.final / "file.bin").read_bytes() == body


def test_files_removed_from_the_source_are_removed_from_staging(
    bucket: tuple[Any, str], agent_client: Any, tmp_path: Path
) -> None:
    client, name = bucket
    seed(client, name, {"d/keep.txt": b"keep"})
    replica = ReplicaDir(tmp_path / "vol")
    replica.prepare()
    (replica.staging / "stale.txt").write_bytes(b"from an older listing")
    fetch(agent_client, f"s3://{name}/d/", replica, Progress())
    assert sorted(p.name for p in replica.final.iterdir()) == [MANIFEST, "keep.txt"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://kvc-no-such-bucket-x/data/", "bucket kvc-no-such-bucket-x does not exist"),
        ("s3://{bucket}/missing/key.bin", "object s3://{bucket}/missing/key.bin not found"),
        ("s3://{bucket}/empty-prefix/", "no objects under s3://{bucket}/empty-prefix/"),
    ],
)
def test_missing_data_is_a_clear_error_and_nothing_is_published(
    bucket: tuple[Any, str], agent_client: Any, tmp_path: Path, url: str, message: str
) -> None:
    _, name = bucket
    replica = ReplicaDir(tmp_path / "vol")
    with pytest.raises(FetchError) as excinfo:
        fetch(agent_client, url.format(bucket=name), replica, Progress())
    assert str(excinfo.value) == message.format(bucket=name)
    assert not replica.complete


def test_verify_notices_deleted_and_truncated_files(bucket: tuple[Any, str], agent_client: Any, tmp_path: Path) -> None:
    client, name = bucket
    seed(client, name, {"v/a.bin": b"a" * 100, "v/b.bin": b"b" * 100})
    replica = ReplicaDir(tmp_path / "vol")
    fetch(agent_client, f"s3://{name}/v/", replica, Progress())
    (replica.final / "a.bin").unlink()
    (replica.final / "b.bin").write_bytes(b"b" * 10)
    assert replica.verify() == ["a.bin is missing", "b.bin has 10 bytes, expected 100"]


def test_archives_are_unpacked_safely_and_removed(bucket: tuple[Any, str], agent_client: Any, tmp_path: Path) -> None:
    client, name = bucket
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member, data in {"cifar/train/x.bin": b"x" * 1000, "../../escape.txt": b"evil"}.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    seed(client, name, {"archives/part-1.tar.gz": buffer.getvalue()})
    replica = ReplicaDir(tmp_path / "node" / "vol")
    manifest = fetch(agent_client, f"s3://{name}/archives/", replica, Progress(), unpack="tar.gz")
    assert (replica.final / "cifar/train/x.bin").read_bytes() == b"x" * 1000
    assert [f.path for f in manifest.files] == ["cifar/train/x.bin"]
    assert manifest.skipped == ["part-1.tar.gz:../../escape.txt"]
    assert not (replica.final / ".kvc-download").exists()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "node/vol/.kvc-manifest.json",
        "node/vol/cifar/train/x.bin",
    ]


def test_a_download_slower_than_its_timeout_fails_and_says_so(
    bucket: tuple[Any, str], agent_client: Any, tmp_path: Path
) -> None:
    client, name = bucket
    seed(client, name, {f"t/part-{i}.bin": os.urandom(2 * 1024 * 1024) for i in range(8)})
    # The deadline covers the listing too: on a loaded machine 10 ms may end before the download starts.
    with pytest.raises(FetchError, match=r"timed out (listing|downloading) s3://"):
        fetch(agent_client, f"s3://{name}/t/", ReplicaDir(tmp_path / "vol"), Progress(), workers=1, timeout=0.01)
    assert not ReplicaDir(tmp_path / "vol").complete
