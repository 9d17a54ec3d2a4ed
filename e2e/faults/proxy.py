"""A TCP proxy on a fixed loopback port, for restarting a server without losing its data.

moto keeps objects in memory, so a restarted moto is empty until it is seeded again; if
agents could reach it meanwhile they would copy a half-seeded bucket, which no real S3
restart shows.  The fault suite points its volumes at this proxy instead: a "restart"
takes the proxy down (listener closed, live connections cut: clients see resets, then
refused connections), starts a new moto on another port, seeds it, and brings the proxy
back up in front of it.  To the agents that is an S3 endpoint that crashed and came back
with its data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from e2e.cluster import free_port

logger = logging.getLogger(__name__)

_CHUNK = 1 << 16


class TcpProxy:
    def __init__(self, backend_port: int, port: int | None = None) -> None:
        self.port = port or free_port()
        self.backend_port = backend_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)  # type: ignore[arg-type]

    def start(self) -> TcpProxy:
        self._thread.start()
        self.up()
        return self

    def up(self, backend_port: int | None = None) -> None:
        """Listen again (same port), forwarding to ``backend_port`` from now on."""
        if backend_port is not None:
            self.backend_port = backend_port
        self._call(self._listen())

    def down(self) -> None:
        """Refuse new connections and cut the open ones, as a crashed server would."""
        self._call(self._close())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, backend_writer}
        try:
            await asyncio.gather(self._pipe(client_reader, backend_writer), self._pipe(backend_reader, client_writer))
        finally:
            for writer in (client_writer, backend_writer):
                self._writers.discard(writer)
                writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # Half-close: the other direction may still carry a response.
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
