"""The direct S3 GET path: its signatures against botocore's, its HTTP handling on a local socket, its checks."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import socket
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from botocore.exceptions import ClientError
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc.agent.files import Tree, UnsafePathError
from kvc.sources import s3_fetch
from kvc.sources._s3http import Credentials, ObjectGetter, canonical_query, parse_listing, signed_headers
from kvc.sources.s3_fetch import S3Object, _digest_for
from kvc.sources.transfer import FetchError, Progress
from tests.kvc.sources.loopback import RawServer, loopback_client

NOW = dt.datetime(2026, 11, 28, 21, 0, 5, tzinfo=dt.UTC)


def botocore_signature(url: str, credentials: Credentials, region: str, extra: dict[str, str]) -> str:
    request = AWSRequest(method="GET", url=url, headers=dict(extra))
    boto = BotoCredentials(credentials.access_key, credentials.secret_key, credentials.token)
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        S3SigV4Auth(boto, "s3", region).add_auth(request)
    return str(request.headers["Authorization"])


keys = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=40).filter(
    lambda key: not key.startswith("/")
)


@settings(max_examples=200, deadline=None)
@given(
    key=keys,
    token=st.none() | st.text(alphabet="abcdef0123456789/+=", min_size=1, max_size=30),
    start=st.integers(min_value=0, max_value=10**12),
    region=st.sampled_from(["us-east-1", "eu-west-3", "minio"]),
)
def test_signatures_equal_botocores_for_any_key(key: str, token: str | None, start: int, region: str) -> None:
    import urllib.parse  # noqa: PLC0415

    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    path = "/bucket/" + urllib.parse.quote(key, safe="/~")
    extra = {"range": f"bytes={start}-"} if start else {}
    ours = signed_headers(
        "GET", "127.0.0.1:9000", path, credentials=credentials, region=region, now=NOW, extra=extra or None
    )
    boto_extra = {"Range": extra["range"]} if extra else {}
    if token:
        boto_extra["X-Amz-Security-Token"] = token
    assert ours["authorization"] == botocore_signature(f"http://127.0.0.1:9000{path}", credentials, region, boto_extra)


@settings(max_examples=200, deadline=None)
@given(prefix=keys, token=st.none() | st.text(alphabet="abcdefXYZ0123456789/+= ", min_size=1, max_size=30))
def test_listing_signatures_equal_botocores_for_any_prefix_and_token(prefix: str, token: str | None) -> None:
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    params = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
    if token is not None:
        params["continuation-token"] = token
    query = canonical_query(params)
    ours = signed_headers(
        "GET", "127.0.0.1:9000", "/bucket", credentials=credentials, region="eu-west-3", now=NOW, query=query
    )
    url = f"http://127.0.0.1:9000/bucket?{query}"
    assert ours["authorization"] == botocore_signature(url, credentials, "eu-west-3", {})


def test_a_listing_is_read_with_its_url_encoded_keys_and_next_token() -> None:
    page = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>'
        b"<IsTruncated>true</IsTruncated><NextContinuationToken>t/2+</NextContinuationToken>"
        b"<Contents><Key>data/a+b%26c%C3%A9.bin</Key><Size>12</Size><ETag>&quot;abc&quot;</ETag></Contents>"
        b"<Contents><Key>dir/</Key><Size>0</Size></Contents></ListBucketResult>"
    )
    assert parse_listing(page) == ([("data/a b&cé.bin", 12, '"abc"'), ("dir/", 0, None)], "t/2+")
    last = page.replace(b"<IsTruncated>true", b"<IsTruncated>false")
    assert parse_listing(last)[1] is None


def test_a_listing_with_a_document_type_is_refused_unparsed() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">]><ListBucketResult>&a;</ListBucketResult>'
    with pytest.raises(ValueError, match="document type"):
        parse_listing(bomb)


def loopback_getter(port: int) -> ObjectGetter:
    """The direct path to bucket ``bucket`` of a test server on ``port`` (1 s read timeout)."""
    return ObjectGetter(loopback_client(f"http://127.0.0.1:{port}"), "bucket", read_timeout=1)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def collect(handler: Handler, key: str = "data/a b.bin", start: int = 0) -> tuple[bytes, list[bytes]]:
    """Run one GET against a local server answering with ``handler``; the body and the request heads seen."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            heads.append(head)
            await handler(reader, writer)
            if writer.is_closing():
                return

    async def run() -> bytes:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        getter = loopback_getter(port)
        try:
            return b"".join([chunk async for chunk in getter.get(key, start, chunk=4)])
        finally:
            getter.close()
            server.close()

    return asyncio.run(run()), heads


def answer(status: str, body: bytes, headers: str = "") -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body)
        await writer.drain()

    return handler


def test_the_body_arrives_whole_and_the_request_is_signed_with_its_range() -> None:
    body, heads = collect(answer("206 Partial Content", b"0123456789"), start=5)
    assert body == b"0123456789"
    head = heads[0].decode()
    assert head.startswith("GET /bucket/data/a%20b.bin HTTP/1.1\r\n")
    assert "range: bytes=5-\r\n" in head
    assert "authorization: AWS4-HMAC-SHA256 Credential=a/" in head


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (answer("404 Not Found", b"<Error><Code>NoSuchKey</Code></Error>"), "NoSuchKey"),
        (answer("403 Forbidden", b"<Error><Code>AccessDenied</Code></Error>"), "AccessDenied"),
        (answer("503 Slow Down", b"not xml"), "503"),
    ],
    ids=["missing", "denied", "throttled"],
)
def test_error_answers_raise_client_errors_with_the_s3_code(handler: Handler, expected: str) -> None:
    with pytest.raises(ClientError) as raised:
        collect(handler)
    assert raised.value.response["Error"]["Code"] == expected


async def _short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    await writer.drain()
    writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(5)


async def _not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
    await writer.drain()


async def _chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize(
    ("handler", "error", "message"),
    [
        (_short_body, ConnectionError, "connection closed while reading data/a b.bin"),
        (_silent, TimeoutError, "no answer for data/a b.bin within 1s"),
        (_not_http, ConnectionError, "not an HTTP answer"),
        (_chunked, ConnectionError, "answer without Content-Length"),
    ],
    ids=["cut-short", "silent", "not-http", "no-length"],
)
def test_broken_answers_raise_errors_the_fetcher_retries(
    handler: Handler, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        collect(handler)


def test_a_connection_is_reused_for_the_next_object() -> None:
    async def run() -> list[bytes]:
        accepted: list[int] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(1)
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        getter = ObjectGetter(loopback_client(f"http://127.0.0.1:{port}"), "bucket")
        bodies = [b"".join([c async for c in getter.get(f"k{i}")]) for i in range(3)]
        getter.close()
        server.close()
        assert len(accepted) == 1
        return bodies

    assert asyncio.run(run()) == [b"ok"] * 3


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


DATA = b"the data set, byte for byte" * 1000
CRC32 = _b64(zlib.crc32(DATA).to_bytes(4, "big"))
SHA256 = _b64(hashlib.sha256(DATA).digest())
MD5 = hashlib.md5(DATA, usedforsecurity=False).hexdigest()


@pytest.mark.parametrize(
    ("checksums", "etag", "expected"),
    [
        ({"crc32": CRC32, "sha256": SHA256}, f'"{MD5}"', "CRC32"),
        ({"sha256": SHA256}, f'"{MD5}"', "SHA256"),
        ({"crc32": "AAAAAA==-3"}, f'"{MD5}"', "MD5"),  # composite (multipart): covers parts only
        ({}, f'"{MD5}"', "MD5"),
        ({}, '"9b2cf535f27731c974343645a3985328-2"', None),  # multipart ETag: size is all there is
    ],
    ids=["crc32-first", "sha256", "composite-ignored", "etag-md5", "nothing"],
)
def test_the_cheapest_whole_object_check_is_chosen_and_it_holds_for_the_right_bytes(
    checksums: dict[str, str], etag: str, expected: str | None
) -> None:
    digest = _digest_for(S3Object("k", len(DATA), etag), checksums)
    assert (digest.name if digest else None) == expected
    if digest is None:
        return
    for start in range(0, len(DATA), 4096):
        digest.update(DATA[start : start + 4096])
    assert digest.matches()
    other = _digest_for(S3Object("k", len(DATA), etag), checksums)
    assert other is not None
    other.update(DATA[:-1] + b"?")
    assert not other.matches()


class CorruptingBodies:
    """An S3 whose checksum header is right and whose bytes are wrong the first ``bad`` times."""

    def __init__(self, bad: int) -> None:
        self.bad, self.requests = bad, 0

    async def get(
        self,
        key: str,
        start: int = 0,
        chunk: int = 1 << 20,
        checksums: dict[str, str] | None = None,
        length: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        self.requests += 1
        if checksums is not None:
            checksums["crc32"] = CRC32
        yield DATA[start:] if self.requests > self.bad else b"?" * (len(DATA) - start)

    def close(self) -> None:
        pass


def download(bodies: Any, target: Path, small_in_memory: bool) -> None:
    """Streamed to disk and checked there, or (small objects) checked in memory and handed to the writer."""
    writer = s3_fetch._Writer(threads=1) if small_in_memory else None
    tree = Tree(target.parent)
    try:
        asyncio.run(
            s3_fetch._download(
                bodies,
                "bucket",
                S3Object("k", len(DATA), '"9b2cf535f27731c974343645a3985328-2"'),
                tree.file(target.name),
                progress=Progress(),
                deadline=float("inf"),
                should_stop=lambda: False,
                writer=writer,
            )
        )
    finally:
        if writer is not None:
            writer.close()
        tree.close()


@pytest.mark.parametrize("small_in_memory", [False, True], ids=["streamed", "in-memory"])
def test_bytes_corrupted_in_transit_are_fetched_again(tmp_path: Path, small_in_memory: bool) -> None:
    bodies = CorruptingBodies(bad=2)
    download(bodies, tmp_path / "k", small_in_memory)
    assert (tmp_path / "k").read_bytes() == DATA
    assert bodies.requests == 3


@pytest.mark.parametrize(
    ("small_in_memory", "message"),
    [(False, "keeps failing verification: its CRC32 differs"), (True, "keeps failing verification")],
    ids=["streamed", "in-memory"],
)
def test_bytes_that_never_match_their_checksum_fail_and_nothing_is_kept(
    tmp_path: Path, small_in_memory: bool, message: str
) -> None:
    with pytest.raises(FetchError, match=rf"s3://bucket/k {message}"):
        download(CorruptingBodies(bad=100), tmp_path / "k", small_in_memory)
    assert not (tmp_path / "k").exists()


def test_a_file_the_writer_cannot_create_fails_the_fetch_naming_it(tmp_path: Path) -> None:
    (tmp_path / "d" / "k").mkdir(parents=True)  # where the file goes
    writer = s3_fetch._Writer(threads=1)
    with Tree(tmp_path) as tree:
        writer.put(tree.file("d/k"), b"data")
        writer.close()
    with pytest.raises(UnsafePathError, match=r"d/k is a symlink or not what the volume's data needs there"):
        writer.raise_failure()


class _ListingServer(RawServer):
    """A loopback HTTP server whose every answer is ``reply`` (raw bytes, or None: answer nothing)."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        super().__init__()

    def answer(self, connection: socket.socket) -> None:
        self.requests.append(connection.recv(65536))
        if self.reply is None:
            connection.recv(1)  # until the client gives up
            return
        connection.sendall(self.reply)

    def getter(self) -> ObjectGetter:
        return loopback_getter(self.port)


def _http(status: str, body: bytes) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [
        (_http("403 Forbidden", b"<Error><Code>AccessDenied</Code></Error>"), ClientError, "AccessDenied"),
        (_http("200 OK", b"<ListBucketResult><Contents><Key>"), ConnectionError, "unreadable listing of 'p/'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n<List", ConnectionError, "IncompleteRead listing 'p/'"),
        (b"garbage\r\n\r\n", ConnectionError, "BadStatusLine listing 'p/'"),
        (None, TimeoutError, "no answer within 1s listing 'p/'"),
    ],
    ids=["refused", "truncated-xml", "short-body", "not-http", "silent"],
)
def test_a_failed_listing_raises_what_the_fetcher_reports_or_retries(
    reply: bytes | None, error: type[Exception], message: str
) -> None:
    server = _ListingServer(reply)
    try:
        with pytest.raises(error, match=message):
            server.getter().list("p/", lambda *listed: listed, 1000)
        # Path-style, signed, the prefix and the URL encoding asked for.
        assert server.requests[0].startswith(b"GET /bucket?encoding-type=url&list-type=2&prefix=p%2F HTTP/1.1")
        assert b"authorization: aws4-hmac-sha256 credential=a/" in server.requests[0].lower()
    finally:
        server.close()
