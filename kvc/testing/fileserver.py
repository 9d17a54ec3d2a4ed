"""A small HTTP file server on loopback for the HTTP source's tests: serves a directory,
honours Range requests, can require a header, answer some paths with redirects, speak
TLS, and records the requests it saw."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    def __init__(
        self,
        root: Path,
        required_headers: dict[str, str] | None = None,
        *,
        redirects: dict[str, tuple[int, str]] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.root = root
        self.required_headers = required_headers or {}
        # Request path -> (status, Location): answered before any header is required.
        self.redirects = redirects or {}
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append({"path": self.path, **dict(self.headers.items())})
                if self.path in server.redirects:
                    status, location = server.redirects[self.path]
                    self.send_response(status)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                for name, value in server.required_headers.items():
                    if self.headers.get(name) != value:
                        self.send_error(401, "Unauthorized")
                        return
                path = (server.root / self.path.lstrip("/")).resolve()
                if server.root.resolve() not in path.parents or not path.is_file():
                    self.send_error(404, "Not Found")
                    return
                data = path.read_bytes()
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes=") and ranged.endswith("-"):
                    start = int(ranged[len("bytes=") : -1])
                    if start >= len(data):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    @contextmanager
    def running(self) -> Iterator[FileServer]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
