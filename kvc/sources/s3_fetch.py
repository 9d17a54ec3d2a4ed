"""Agent side of the S3 source: copy one object or a prefix onto this node.

Parallel across objects, resumable (a partly written file continues with a Range
request), verified (size, and MD5 where the ETag is one), safe (keys that would escape
the replica's directory are skipped and reported), bounded in time.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kvc.agent.files import (
    Manifest,
    ManifestFile,
    ReplicaDir,
    UnsafePathError,
    md5_etag,
    md5_of,
    remove_unexpected,
    safe_join,
)
from kvc.sources.transfer import CHUNK, RETRIES, FetchError, Progress, finish_unpack, run_parallel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_url(url: str) -> S3Location:
    if not url.startswith("s3://"):
        raise ValueError(f"sourceURL must start with s3://, not {url!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"sourceURL {url!r} names no bucket")
    return S3Location(bucket, key)


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str | None

    @property
    def md5(self) -> str | None:
        return md5_etag(self.etag)


def make_client(
    endpoint_url: str | None, region: str | None, access_key: str | None, secret_key: str | None, workers: int
) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or "us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            max_pool_connections=max(workers, 10),
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        ),
    )


def _describe(exc: Exception, location: S3Location) -> str:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket",):
            return f"bucket {location.bucket} does not exist"
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"object {location} not found"
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return f"access to {location} denied ({code}): check the credentials Secret and its permissions"
        return f"S3 error {code or 'unknown'} for {location}"
    return f"cannot reach S3 for {location}: {type(exc).__name__}"


def list_objects(client: Any, location: S3Location) -> list[S3Object]:
    try:
        if not location.is_prefix:
            head = client.head_object(Bucket=location.bucket, Key=location.key)
            return [S3Object(location.key, int(head["ContentLength"]), head.get("ETag"))]
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):  # "folder" markers hold no data
                    objects.append(S3Object(item["Key"], int(item["Size"]), item.get("ETag")))
    except (ClientError, BotoCoreError) as exc:
        raise FetchError(_describe(exc, location)) from exc
    if not objects:
        raise FetchError(f"no objects under {location}")
    return objects


def _relative_name(location: S3Location, key: str) -> str:
    if not location.is_prefix:
        return key.rsplit("/", 1)[-1]
    return key[len(location.key) :]


def _download(
    client: Any,
    bucket: str,
    obj: S3Object,
    target: Path,
    *,
    progress: Progress,
    deadline: float,
    should_stop: Callable[[], bool],
) -> None:
    """Bring ``target`` to the object's content, resuming from what is on disk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        have = target.stat().st_size if target.exists() else 0
        if have > obj.size:
            target.unlink()
            have = 0
        if have == obj.size:
            if obj.md5 is None or md5_of(target) == obj.md5:
                break
            # Same size, other content (a corrupted or changed file): fetch it again.
            logger.warning("s3://%s/%s: MD5 differs from its ETag; fetching it again", bucket, obj.key)
            progress.add(-have)
            target.unlink()
            attempt += 1
            if attempt > RETRIES:
                raise FetchError(f"s3://{bucket}/{obj.key} keeps failing verification: its MD5 differs from its ETag")
            continue
        if should_stop():
            raise FetchError("stopped")
        if time.monotonic() > deadline:
            raise FetchError(f"timed out downloading s3://{bucket}/{obj.key}")
        try:
            extra = {"Range": f"bytes={have}-"} if have else {}
            body = client.get_object(Bucket=bucket, Key=obj.key, **extra)["Body"]
            with target.open("ab") as handle:
                for chunk in body.iter_chunks(CHUNK):
                    handle.write(chunk)
                    progress.add(len(chunk))
                    if should_stop():
                        raise FetchError("stopped")
        except (ClientError, BotoCoreError, OSError) as exc:
            code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
            if code in ("NoSuchKey", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket"):
                raise FetchError(_describe(exc, S3Location(bucket, obj.key))) from exc
            attempt += 1
            if attempt > RETRIES:
                raise FetchError(
                    f"giving up on s3://{bucket}/{obj.key} after {RETRIES} retries: {type(exc).__name__}"
                ) from exc
            delay = min(0.5 * 2**attempt, 15.0)
            logger.warning("retrying s3://%s/%s in %.1fs (%s)", bucket, obj.key, delay, type(exc).__name__)
            time.sleep(delay)
    progress.file_done()


def fetch(
    client: Any,
    url: str,
    replica: ReplicaDir,
    progress: Progress,
    *,
    workers: int = 8,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    unpack: str | None = None,
    include: str | None = None,
) -> Manifest:
    """Copy ``url`` into ``replica`` (extracting archives when ``unpack`` names their kind) and publish it."""
    location = parse_url(url)
    deadline = time.monotonic() + timeout if timeout else float("inf")
    objects = list_objects(client, location)
    if include:
        # This node holds only its part of the data set (distributionStrategy).
        objects = [o for o in objects if fnmatch.fnmatchcase(_relative_name(location, o.key), include)]
        if not objects:
            raise FetchError(f"no objects under {location} match {include!r} from distributionStrategy")
    staging = replica.prepare()
    root = replica.downloads if unpack else staging
    root.mkdir(exist_ok=True)
    manifest = Manifest(source=url)
    planned: list[tuple[S3Object, Path, PurePosixPath]] = []
    for obj in objects:
        name = _relative_name(location, obj.key)
        try:
            target = safe_join(root, name)
        except UnsafePathError as exc:
            logger.warning("skipping unsafe key %r: %s", obj.key, exc)
            manifest.skipped.append(obj.key)
            continue
        planned.append((obj, target, PurePosixPath(target.relative_to(root))))
    if not planned:
        raise FetchError(f"no safe objects under {location}: every key would escape the volume's directory")
    remove_unexpected(root, [relative for _, _, relative in planned])
    progress.total_bytes = sum(obj.size for obj, _, _ in planned)
    progress.bytes = sum(min(t.stat().st_size, o.size) for o, t, _ in planned if t.exists())

    abort = threading.Event()

    def should_stop() -> bool:
        return abort.is_set() or (stop is not None and stop.is_set())

    def job(obj: S3Object, target: Path) -> Callable[[], None]:
        return lambda: _download(
            client, location.bucket, obj, target, progress=progress, deadline=deadline, should_stop=should_stop
        )

    run_parallel([job(o, t) for o, t, _ in planned], workers, abort, "s3-fetch")
    if unpack:
        finish_unpack(replica, unpack, manifest)
    else:
        manifest.files = [ManifestFile(str(relative), obj.size, obj.etag) for obj, _, relative in planned]
    replica.publish(manifest)
    return manifest
