"""A loopback server that plays S3 (ListObjectsV2, GetObject with Range) and plain HTTP, and
misbehaves on demand: pauses a body halfway, announces another length, sends no length,
lists keys or empty pages forever."""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from xml.sax.saxutils import escape

import boto3


def loopback_client(endpoint_url: str) -> Any:
    """A boto3 S3 client for a test server at ``endpoint_url``, with a throwaway key pair."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="a",
        aws_secret_access_key="b",
    )


class RawServer:
    """A loopback TCP server that hands each connection, in turn, to ``answer`` (closed after)."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def answer(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            with connection:
                self.answer(connection)

    def close(self) -> None:
        self._socket.close()


def listing_page(keys: list[tuple[str, int]], token: str | None) -> bytes:
    """A ListObjectsV2 answer (``encoding-type=url``) with these (key, size) and a next token, if any."""
    contents = "".join(
        f"<Contents><Key>{escape(urllib.parse.quote(key))}</Key><Size>{size}</Size></Contents>" for key, size in keys
    )
    more = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>" if token else ""
    return f'<?xml version="1.0"?><ListBucketResult><Name>bucket</Name>{more}{contents}</ListBucketResult>'.encode()


class LoopbackS3:
    """Bucket ``bucket`` holding ``objects``; ``pages`` (token or None -> answer) replaces its listing."""

    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects = dict(objects or {})
        self.pages: Callable[[str | None], bytes] | None = None
        self.paused: dict[str, threading.Event] = {}  # key -> let the rest of its body go
        self.halfway: dict[str, threading.Event] = {}  # key -> set when half its body is sent
        self.announced: dict[str, int] = {}  # key -> the Content-Length said, whatever the body
        self.no_length: set[str] = set()  # keys sent without Content-Length, until the connection closes
        self.held: dict[str, threading.Event] = {}  # key -> answer only once set
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms per answer

            def do_GET(self) -> None:
                server.requests.append(self.path)
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                if "list-type" in query:
                    token = query.get("continuation-token", [None])[0]
                    body = server.pages(token) if server.pages else server.listing(query.get("prefix", [""])[0])
                    self._answer(200, body)
                    return
                key = urllib.parse.unquote(url.path).removeprefix("/bucket/")
                if key not in server.objects:
                    self._answer(404, b"<Error><Code>NoSuchKey</Code></Error>")
                    return
                with contextlib.suppress(ConnectionError):  # the client gave up on a body: as it should
                    server.send(self, key)

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def listing(self, prefix: str) -> bytes:
        return listing_page([(k, len(v)) for k, v in sorted(self.objects.items()) if k.startswith(prefix)], None)

    def send(self, handler: BaseHTTPRequestHandler, key: str) -> None:
        if key in self.held:
            self.held[key].wait(30)
        data = self.objects[key]
        ranged = handler.headers.get("Range", "")
        start = int(ranged[len("bytes=") : -1]) if ranged.startswith("bytes=") else 0
        handler.send_response(206 if start else 200)
        if key in self.no_length:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        else:
            handler.send_header("Content-Length", str(self.announced.get(key, len(data) - start)))
        handler.end_headers()
        body = data[start:]
        if key in self.paused:
            half = len(body) // 2
            handler.wfile.write(body[:half])
            handler.wfile.flush()
            self.halfway.setdefault(key, threading.Event()).set()
            self.paused[key].wait(30)
            body = body[half:]
        handler.wfile.write(body)

    def pause(self, key: str) -> tuple[threading.Event, threading.Event]:
        """(set when half of ``key``'s body is out, set it to send the rest)."""
        self.halfway[key] = threading.Event()
        self.paused[key] = threading.Event()
        return self.halfway[key], self.paused[key]

    def client(self) -> Any:
        return loopback_client(self.url)

    @contextmanager
    def running(self) -> Iterator[LoopbackS3]:
        thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            for event in [*self.paused.values(), *self.held.values()]:
                event.set()
            self._server.shutdown()
            self._server.server_close()
