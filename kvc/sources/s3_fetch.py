"""Agent side of the S3 source: copy one object or a prefix onto this node.

Parallel across objects, resumable (a partly written file continues with a Range
request), verified (size, and MD5 where the ETag is one), safe (keys that would escape
the replica's directory are skipped and reported), bounded in time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from isal import isal_zlib

from kvc.agent.files import (
    DIRECTORY_BYTES,
    DOWNLOADS,
    MAX_OBJECTS,
    Limits,
    Manifest,
    ManifestFile,
    ReplicaDir,
    TreePath,
    UnsafePathError,
    md5_etag,
    md5_of,
    quantity,
    remove_unexpected,
    safe_relative,
)
from kvc.sources._egress import EgressPolicy
from kvc.sources._s3http import LengthMismatchError, ListingLimitError, ObjectGetter
from kvc.sources._s3url import S3Location, parse_url
from kvc.sources.transfer import CHUNK, RETRIES, USER_ERRORS, FetchError, Progress, finish_unpack, retry_delay

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class S3Object:
    """One listed object: kept for every object of a fetch, so kept small (slots, no dict)."""

    key: str
    size: int
    etag: str | None

    @property
    def md5(self) -> str | None:
        return md5_etag(self.etag)


def make_client(
    endpoint_url: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    workers: int,
) -> Any:
    session = botocore.session.Session()
    # Listings are parsed into objects of which KVC reads key, size and ETag; turning every
    # LastModified into a datetime (dateutil) cost more CPU than the rest of a listing.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return boto3.session.Session(botocore_session=session).client(
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


def list_objects(
    client: Any,
    location: S3Location,
    getter: ObjectGetter | None = None,
    max_objects: int = MAX_OBJECTS,
    check: Callable[[], None] | None = None,
) -> list[S3Object]:
    """The objects at ``location``; a prefix is listed through ``getter`` when given (see ObjectGetter.list).

    A listing of more than ``max_objects`` keys fails, having kept no more than that many;
    so does one that never ends, through either path (see ObjectGetter.list for the bounds).
    ``check`` is called before each page is asked for, and raises to stop the listing.
    """
    try:
        if not location.is_prefix and getter is not None:  # over a connection to a checked address
            size, etag = _with_retries(f"HEAD {location.key!r}", lambda: getter.head(location.key))
            return [S3Object(location.key, size, etag)]
        if not location.is_prefix:
            # Through a proxy (no getter), boto3 connects by name: the endpoint check before
            # the fetch (S3Source.fetch) and the proxy stand between it and blocked networks.
            head = client.head_object(Bucket=location.bucket, Key=location.key)
            return [S3Object(location.key, int(head["ContentLength"]), head.get("ETag"))]
        if getter is not None:
            listed = _listed_with_retries(getter, location.key, max_objects, check)
        else:
            listed = _listed_with_boto(client, location, max_objects, check)
    except ListingLimitError as exc:
        raise FetchError(
            f"the listing of {location} was stopped: {exc}; a volume holds at most {max_objects} objects "
            "(the agent's --max-objects): narrow sourceURL, or split the data into several volumes"
        ) from None
    except (ClientError, BotoCoreError, OSError) as exc:
        raise FetchError(_describe(exc, location)) from exc
    if not listed:
        raise FetchError(f"no objects under {location}")
    return listed


def _listing_check(location: S3Location, stop: threading.Event | None, deadline: float) -> Callable[[], None]:
    """What a listing calls between pages: a fetch stopped, or out of time, stops its listing too."""

    def check() -> None:
        if stop is not None and stop.is_set():
            raise FetchError("stopped")
        if time.monotonic() > deadline:
            raise FetchError(f"timed out listing {location}")

    return check


# As many as botocore's standard retry mode makes for a listing.
_LIST_ATTEMPTS = 3
_T = TypeVar("_T")


def _listed_with_retries(
    getter: ObjectGetter, prefix: str, max_objects: int, check: Callable[[], None] | None = None
) -> list[S3Object]:
    def keep(key: str, size: int, etag: str | None) -> S3Object | None:
        return None if key.endswith("/") else S3Object(key, size, etag)  # "folder" markers hold no data

    return _with_retries(f"listing {prefix!r}", lambda: getter.list(prefix, keep, max_objects, check))


# Pages in a row without a key that the boto3 path lists (as ObjectGetter.list does).
_MAX_EMPTY_PAGES = 100


def _listed_with_boto(
    client: Any, location: S3Location, max_objects: int, check: Callable[[], None] | None
) -> list[S3Object]:
    """The listing through botocore's paginator (behind a proxy), bounded as ObjectGetter.list's is:
    more than ``max_objects`` objects, more than twice that many keys (folder markers included),
    _MAX_EMPTY_PAGES pages in a row without a key, or a token given before, raise ListingLimitError."""
    listed: list[S3Object] = []
    keys = empty = 0
    seen: set[bytes] = set()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key)
    for page in pages:
        contents = page.get("Contents", [])
        listed += [S3Object(i["Key"], int(i["Size"]), i.get("ETag")) for i in contents if not i["Key"].endswith("/")]
        if len(listed) > max_objects:
            raise ListingLimitError(f"more than {max_objects} keys")
        keys += len(contents)
        if keys > 2 * max_objects:
            raise ListingLimitError(f"more than {2 * max_objects} keys listed, {len(listed)} of them objects")
        empty = 0 if contents else empty + 1
        if empty >= _MAX_EMPTY_PAGES:
            raise ListingLimitError(f"{empty} answers in a row said more keys follow, and gave none")
        token = page.get("NextContinuationToken")
        if token is not None:
            digest = hashlib.sha256(str(token).encode()).digest()
            if digest in seen:
                raise ListingLimitError("the endpoint gave the same continuation token twice")
            seen.add(digest)
            if check is not None:
                check()  # before the next page is asked for
    return listed


def _with_retries(what: str, call: Callable[[], _T]) -> _T:
    """``call()``, tried again after a broken connection (OSError) as botocore would."""
    for attempt in range(1, _LIST_ATTEMPTS):
        try:
            return call()
        except OSError as exc:
            logger.warning("%s failed (%s): trying again", what, exc)
            time.sleep(retry_delay(attempt))
    return call()  # the last attempt's failure is the fetch's


def _relative_name(location: S3Location, key: str) -> str:
    if not location.is_prefix:
        return key.rsplit("/", 1)[-1]
    return key[len(location.key) :]


class _BotoBodies:
    """Object bodies through boto3, for endpoints the direct path does not serve (proxies)."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client, self._bucket = client, bucket

    async def get(
        self,
        key: str,
        start: int = 0,
        chunk: int = CHUNK,
        checksums: dict[str, str] | None = None,
        length: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        extra: dict[str, str] = {"Range": f"bytes={start}-"} if start else {}
        if checksums is not None:
            extra["ChecksumMode"] = "ENABLED"
        response = await asyncio.to_thread(self._client.get_object, Bucket=self._bucket, Key=key, **extra)
        if length is not None and int(response.get("ContentLength", -1)) != length:
            response["Body"].close()
            raise LengthMismatchError(key, response.get("ContentLength"), length)
        if checksums is not None:
            for name in ("CRC32", "SHA256", "SHA1"):
                if value := response.get(f"Checksum{name}"):
                    checksums[name.lower()] = value
        chunks = response["Body"].iter_chunks(chunk)
        try:
            while (block := await asyncio.to_thread(next, chunks, None)) is not None:
                yield block
        finally:
            response["Body"].close()

    def close(self) -> None:
        """Nothing to release: boto3 pools its own connections."""


_Bodies = ObjectGetter | _BotoBodies
# Chunks at least this big are written and hashed on a thread (both release the GIL),
# so large files use every core; small ones are cheaper to write in place.
_OFFLOAD = 256 << 10
# Objects at least this big are copied by a thread of their own (see ObjectGetter.copy_into).
_LARGE = 8 << 20
_FATAL_CODES = ("NoSuchKey", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket")


class _Digest:
    """A check computed while a file is written in one piece, against what S3 says the object is."""

    def __init__(self, name: str, hasher: Any, expected: str) -> None:
        self.name, self._hasher, self._expected = name, hasher, expected

    def update(self, chunk: bytes | memoryview) -> None:
        self._hasher.update(chunk)

    def matches(self) -> bool:
        if self.name == "MD5":
            return bool(self._hasher.hexdigest() == self._expected)
        return base64.b64encode(self._hasher.digest()).decode() == self._expected


class _Crc32:
    def __init__(self) -> None:
        self._value = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._value = isal_zlib.crc32(chunk, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


def _digest_for(obj: S3Object, checksums: dict[str, str]) -> _Digest | None:
    """The cheapest check S3 offers for the whole object: CRC32 (a quarter of MD5's CPU), SHA, or the ETag's MD5.

    Composite checksums of multipart uploads (``...-3``) cover parts, not the file: not used.
    """
    whole = {name: value for name, value in checksums.items() if "-" not in value}
    if "crc32" in whole:
        return _Digest("CRC32", _Crc32(), whole["crc32"])
    for name in ("sha256", "sha1"):
        if name in whole:
            return _Digest(name.upper(), hashlib.new(name), whole[name])
    if obj.md5:
        return _Digest("MD5", hashlib.md5(usedforsecurity=False), obj.md5)
    return None


def _write(handle: Any, digest: _Digest | None, chunk: bytes | memoryview) -> None:
    handle.write(chunk)
    if digest is not None:
        digest.update(chunk)


def _copy_large(
    bodies: ObjectGetter,
    obj: S3Object,
    target: TreePath,
    *,
    start: int,
    progress: Progress,
    should_stop: Callable[[], bool],
) -> _Digest | None:
    """Blocking, on a thread: a large object from ``start`` into ``target``, checked on the way from 0."""
    checksums: dict[str, str] = {}
    digest: list[_Digest | None] = []

    def sink(block: memoryview) -> None:
        if not digest:
            digest.append(_digest_for(obj, checksums) if start == 0 else None)
        _write(handle, digest[0], block)
        progress.add(len(block))
        if should_stop():
            raise FetchError("stopped")

    with target.open(append=True) as handle:
        bodies.copy_into(obj.key, start, sink, checksums if start == 0 else None, length=obj.size - start)
    return digest[0] if digest else None


class _Writer:
    """Threads that create and fill small files handed over by the event loop.

    Creating a file is the costliest step of a small download on some file systems
    (0.7 ms of kernel time each was measured here); on a thread it overlaps with the
    network work of the loop instead of stalling it. A plain queue hand-off costs far
    less than one ``asyncio.to_thread`` call per file.
    """

    def __init__(self, threads: int) -> None:
        self._queue: queue.SimpleQueue[tuple[TreePath, bytes] | None] = queue.SimpleQueue()
        self._errors: list[Exception] = []
        self._threads = [threading.Thread(target=self._run, name="s3-write", daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def put(self, target: TreePath, body: bytes) -> None:
        """Hand over a file absent from disk; a failure of an earlier one is raised here, to stop the fetch."""
        self.raise_failure()
        self._queue.put((target, body))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            target, body = item
            try:
                target.write_bytes(body, exclusive=True)
            except USER_ERRORS as exc:  # a symlink met, the capacity or the disk floor reached
                self._errors.append(exc)
            except OSError as exc:
                self._errors.append(FetchError(f"cannot write {target.name}: {exc.strerror or exc}"))

    def close(self) -> None:
        """Wait for every file handed over."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def raise_failure(self) -> None:
        if self._errors:
            raise self._errors[0]


async def _handed_over(bodies: _Bodies, obj: S3Object, target: TreePath, writer: _Writer, progress: Progress) -> bool:
    """Receive a small object whole, check it in memory and hand it to ``writer``; False if it failed its check.

    Never more than its listed size is received (``length``): a longer body fails unread.
    """
    checksums: dict[str, str] = {}
    async with contextlib.aclosing(bodies.get(obj.key, 0, CHUNK, checksums, obj.size)) as chunks:
        body = b"".join([chunk async for chunk in chunks])
    digest = _digest_for(obj, checksums)
    if digest is not None:
        digest.update(body)
    if len(body) != obj.size or (digest is not None and not digest.matches()):
        logger.warning("s3://%s: the bytes received fail their check; fetching again", obj.key)
        return False
    writer.put(target, body)
    progress.add(len(body))
    return True


async def _append(
    bodies: _Bodies,
    obj: S3Object,
    target: TreePath,
    *,
    start: int,
    progress: Progress,
    should_stop: Callable[[], bool],
) -> _Digest | None:
    """Append the object's bytes from ``start``; a download from 0 returns the check computed on the way."""
    checksums: dict[str, str] = {}
    chunks = bodies.get(obj.key, start, CHUNK, checksums if start == 0 else None, obj.size - start)
    if isinstance(bodies, ObjectGetter) and obj.size - start >= _LARGE:
        await chunks.aclose()  # never started: no request was made
        return await asyncio.to_thread(
            _copy_large, bodies, obj, target, start=start, progress=progress, should_stop=should_stop
        )
    digest = None
    handle = target.open(append=True)
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if start == 0 and digest is None:
                    digest = _digest_for(obj, checksums)
                if len(chunk) >= _OFFLOAD:
                    await asyncio.to_thread(_write, handle, digest, chunk)
                else:
                    _write(handle, digest, chunk)
                progress.add(len(chunk))
                if should_stop():
                    raise FetchError("stopped")
    finally:
        handle.close()
    return digest


async def _matches(obj: S3Object, target: TreePath, streamed: _Digest | None) -> bool:
    """Whether a file of the object's size is the object: the check made while writing, else its MD5."""
    if streamed is not None:
        return streamed.matches()
    if obj.md5 is None:
        return True
    return bool(await asyncio.to_thread(lambda: md5_of(target.read())) == obj.md5)


def _usable_size(target: TreePath, size: int) -> int:
    """How much of the object is on disk; a file longer than the object is removed."""
    have = target.size()
    if have is not None and have > size:
        target.unlink()
        return 0
    return have or 0


async def _download(
    bodies: _Bodies,
    bucket: str,
    obj: S3Object,
    target: TreePath,
    *,
    progress: Progress,
    deadline: float,
    should_stop: Callable[[], bool],
    writer: _Writer | None = None,
    on_disk: bool = True,
) -> None:
    """Bring ``target`` to the object's content, resuming from what is on disk.

    A small object not on disk yet is checked in memory and handed to ``writer``.
    ``on_disk=False``: the caller knows the file is absent, and it is not looked for at
    first (a lookup in a directory where writer threads create files waits for them,
    and it would block the event loop).
    """
    attempt = 0
    # The MD5 of a file written in one piece is computed on the way in; a resumed or
    # pre-existing file is read back once to check it.
    streamed: _Digest | None = None
    while True:
        have = _usable_size(target, obj.size) if on_disk else 0
        on_disk = True
        if have == obj.size:
            if await _matches(obj, target, streamed):
                break
            check = streamed.name if streamed else "MD5"
            streamed = None
            # Same size, other content (a corrupted or changed file): fetch it again.
            logger.warning("s3://%s/%s: %s differs from the object's; fetching it again", bucket, obj.key, check)
            progress.add(-have)
            target.unlink()
            attempt += 1
            if attempt > RETRIES:
                raise FetchError(
                    f"s3://{bucket}/{obj.key} keeps failing verification: its {check} differs from the object's"
                )
            continue
        if should_stop():
            raise FetchError("stopped")
        if time.monotonic() > deadline:
            raise FetchError(f"timed out downloading s3://{bucket}/{obj.key}")
        try:
            streamed = None
            if writer is not None and have == 0 and 0 < obj.size <= CHUNK:
                if await _handed_over(bodies, obj, target, writer, progress):
                    break
                # A changed object or bytes damaged on the way: nothing was written; again.
                attempt += 1
                if attempt > RETRIES:
                    raise FetchError(f"s3://{bucket}/{obj.key} keeps failing verification")
                continue
            streamed = await _append(bodies, obj, target, start=have, progress=progress, should_stop=should_stop)
        except (ClientError, BotoCoreError, OSError) as exc:
            streamed = None
            code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
            if code in _FATAL_CODES:
                raise FetchError(_describe(exc, S3Location(bucket, obj.key))) from exc
            attempt += 1
            if attempt > RETRIES:
                raise FetchError(
                    f"giving up on s3://{bucket}/{obj.key} after {RETRIES} retries: {type(exc).__name__}"
                ) from exc
            delay = retry_delay(attempt)
            logger.warning("retrying s3://%s/%s in %.1fs (%s)", bucket, obj.key, delay, type(exc).__name__)
            await asyncio.sleep(delay)
    progress.file_done()


async def _download_all(
    bodies: _Bodies,
    bucket: str,
    planned: list[tuple[S3Object, TreePath, bool]],
    *,
    workers: int,
    progress: Progress,
    deadline: float,
    should_stop: Callable[[], bool],
) -> None:
    """Every (object, target, on disk?) on ``workers`` concurrent transfers; the first failure stops the others."""
    pending = iter(planned)
    writer = _Writer(threads=2)

    async def transfer() -> None:
        for obj, target, on_disk in pending:  # one shared iterator: each object is taken once
            await _download(
                bodies,
                bucket,
                obj,
                target,
                progress=progress,
                deadline=deadline,
                should_stop=should_stop,
                writer=writer,
                on_disk=on_disk,
            )

    # Large objects and big writes run on threads: as many as there are transfers.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(workers, thread_name_prefix="s3-fetch"))
    tasks = [asyncio.create_task(transfer()) for _ in range(max(1, min(workers, len(planned))))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        error = next((task.exception() for task in done if task.exception() is not None), None)
        if isinstance(error, USER_ERRORS):
            raise error
        if error is not None:
            raise FetchError(f"download failed: {type(error).__name__}: {error}") from error
        writer.close()
        writer.raise_failure()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bodies.close()
        writer.close()


_NO_LIMITS = Limits()


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
    egress: EgressPolicy | None = None,
    limits: Limits = _NO_LIMITS,
) -> Manifest:
    """Copy ``url`` into ``replica`` (extracting archives when ``unpack`` names their kind) and publish it.

    Within ``limits``: a listing of more objects, or of more bytes than the capacity, fails
    before anything is written; every byte written is counted against the capacity.
    """
    location = parse_url(url)
    deadline = time.monotonic() + timeout if timeout else float("inf")
    bodies: _Bodies = (
        ObjectGetter(client, location.bucket, connections=workers, egress=egress)
        if ObjectGetter.usable(client)
        else _BotoBodies(client, location.bucket)
    )
    getter = bodies if isinstance(bodies, ObjectGetter) else None
    objects = list_objects(client, location, getter, limits.max_objects, check=_listing_check(location, stop, deadline))
    if include:
        # This node holds only its part of the data set (distributionStrategy).
        objects = [o for o in objects if fnmatch.fnmatchcase(_relative_name(location, o.key), include)]
        if not objects:
            raise FetchError(f"no objects under {location} match {include!r} from distributionStrategy")
    manifest = Manifest(source=url)
    # Paths in the staging directory; archives go to DOWNLOADS, to be extracted from there.
    prefix = f"{DOWNLOADS}/" if unpack else ""
    planned: list[tuple[S3Object, str]] = []
    for obj in objects:
        try:
            planned.append((obj, prefix + str(safe_relative(_relative_name(location, obj.key)))))
        except UnsafePathError as exc:
            logger.warning("skipping unsafe key %r: %s", obj.key, exc)
            manifest.skipped.append(obj.key)
    del objects
    if not planned:
        raise FetchError(f"no safe objects under {location}: every key would escape the volume's directory")
    total = sum(obj.size for obj, _ in planned)
    # Every directory made is charged to the capacity too (DIRECTORY_BYTES each).
    directories: set[str] = set()
    for _, relative in planned:
        parent = relative.rpartition("/")[0]
        while parent and parent not in directories:
            directories.add(parent)
            parent = parent.rpartition("/")[0]
    needed = total + len(directories) * DIRECTORY_BYTES
    if limits.capacity is not None and needed > limits.capacity:
        raise FetchError(
            f"the objects under {location} hold {total} bytes in {len(directories)} directories, more than the "
            f"volume's capacity ({quantity(limits.capacity)}): raise capacity in the volumeConfig"
        )
    budget = limits.budget(replica.staging)
    with replica.tree(budget) as tree:
        # Whatever else is staged goes: files no longer listed, what an earlier attempt extracted.
        on_disk = remove_unexpected(replica.staging, [relative for _, relative in planned])
        budget.used = sum(on_disk.values())
        # Directories once per fetch, not once per file (thousands of mkdir calls otherwise).
        for directory in sorted({relative.rpartition("/")[0] for _, relative in planned}):
            tree.directory(directory)
        progress.total_bytes = total
        progress.bytes = sum(min(on_disk.get(relative, 0), obj.size) for obj, relative in planned)
        asyncio.run(
            _download_all(
                bodies,
                location.bucket,
                [(obj, tree.file(relative), relative in on_disk) for obj, relative in planned],
                workers=workers,
                progress=progress,
                deadline=deadline,
                should_stop=lambda: stop is not None and stop.is_set(),
            )
        )
        if unpack:
            archives = [relative.removeprefix(prefix) for _, relative in planned]
            finish_unpack(tree, unpack, manifest, archives, limits.max_objects)
        else:
            manifest.files = [ManifestFile(relative, obj.size, obj.etag) for obj, relative in planned]
    replica.publish(manifest)
    return manifest
