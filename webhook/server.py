"""The webhook's HTTPS server (aiohttp on uvloop): admission endpoints, health, readiness, metrics.

- ``POST /mutate``: AdmissionReview v1 for pods, tfjobs and pytorchjobs. A body that is
  not JSON, or not an AdmissionReview, gets HTTP 400; bodies over ``MAX_BODY`` get 413.
- ``/healthz`` (alive), ``/readyz`` (the VolumeManager index has synced), ``/metrics``.
- The serving certificate is re-read when its files change: new connections get the new
  certificate, open ones finish undisturbed, and no request is refused meanwhile.
- With a client CA (``--client-ca-file``), /mutate answers only callers that present a
  certificate of that CA (and, with ``--client-name``, of one of those names): the API server,
  given one in its AdmissionConfiguration. Anyone else who can reach the port learns nothing
  of any namespace's VolumeManagers, ids or node paths. The probes and /metrics stay open.

``serve`` is what one serving process does; ``webhook.workers.run`` serves from this process
or from several worker processes that it hands the connections to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from kvc.wiring.mutation import Denial
from webhook.admission import BadReviewError, Decision, decide
from webhook.index import READ_THROUGHS, ReadThrough, VolumeIndex, namespace_lister

logger = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024  # the API server sends at most ~3 MiB objects
# Longest wait for the API server's list of a namespace's VolumeManagers (ReadThrough) before
# answering from the index: the request gets its refusal message well inside the API
# server's 5 s wait for the webhook, never a timeout.
READ_THROUGH_SECONDS = 2.5
CERT_CHECK_SECONDS = 5.0
# In-flight admissions get this long to finish on SIGTERM: the API server's timeout for us.
SHUTDOWN_SECONDS = 5.0
# Set (by webhook.workers) when several processes serve: /metrics then adds up their files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

ADMISSIONS = Counter("kvc_webhook_admissions_total", "Admission requests by result", ["result"])
DENIALS = Counter("kvc_webhook_denials_total", "Denied admissions by reason", ["reason"])
LATENCY = Histogram(
    "kvc_webhook_admission_seconds",
    "Time to decide an admission request",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
# Looked up once: labels() takes a lock and a dict lookup on every call.
_ALLOWED, _PATCHED, _DENIED, _REJECTED = (ADMISSIONS.labels(r) for r in ("allowed", "patched", "denied", "rejected"))
_UNAUTHENTICATED = ADMISSIONS.labels("unauthenticated")
_INDEX_KEY = web.AppKey("index", VolumeIndex)
_READY_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("ready")
_READ_THROUGH_KEY: web.AppKey[ReadThrough | None] = web.AppKey("read_through")


@dataclass(frozen=True)
class Callers:
    """Who may ask for admissions: anyone (no client CA), or the holders of a client
    certificate the TLS context verified, of one of ``names`` (CN or DNS SAN) when given."""

    required: bool = False
    names: frozenset[str] = frozenset()

    def refusal(self, peer: Any) -> str | None:
        """Why the peer (``ssl.SSLSocket.getpeercert()``) may not ask; None when it may."""
        if not self.required:
            return None
        if not peer:
            return "KVC answers admission requests from the Kubernetes API server only: present its client certificate"
        if not self.names:
            return None
        subject = {value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"}
        alternative = {value for kind, value in peer.get("subjectAltName", ()) if kind == "DNS"}
        if (subject | alternative) & self.names:
            return None
        return "this client certificate is not one KVC accepts admission requests from"


_CALLERS_KEY = web.AppKey("callers", Callers)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop the webhook serves on (uvloop: its transports and TLS cost about a
    third less CPU per request than asyncio's, measured with `make bench`)."""
    return uvloop.new_event_loop()


async def _decide(review: Any, index: VolumeIndex, read_through: ReadThrough | None) -> Decision:
    """decide() against the index; a ref the index does not hold is looked for again in what
    the API server has now (ReadThrough) before the request is refused as unknown."""
    decision = decide(review, index.catalog)
    if read_through is None or decision.denial is not Denial.UNKNOWN:
        return decision
    try:
        fresh = await asyncio.wait_for(read_through.catalog(decision.namespace), READ_THROUGH_SECONDS)
    except Exception as exc:  # the API server is unreachable or slow: the index's answer stands
        logger.warning(
            "could not list VolumeManagers in %s to look for a volume: %s", decision.namespace, type(exc).__name__
        )
        return decision
    decision = decide(review, lambda namespace: fresh)
    READ_THROUGHS.labels("found" if decision.denial is None else "unknown").inc()
    return decision


async def mutate(request: web.Request) -> web.Response:
    started = time.perf_counter()
    transport = request.transport
    refusal = request.app[_CALLERS_KEY].refusal(transport.get_extra_info("peercert") if transport else None)
    if refusal is not None:
        _UNAUTHENTICATED.inc()
        return web.json_response({"error": refusal}, status=403)
    if request.content_length is not None and request.content_length > MAX_BODY:
        _REJECTED.inc()
        return web.json_response({"error": f"body larger than {MAX_BODY} bytes"}, status=413)
    try:
        body = await request.read()
        review: Any = orjson.loads(body)
        decided = await _decide(review, request.app[_INDEX_KEY], request.app[_READ_THROUGH_KEY])
    except web.HTTPRequestEntityTooLarge:
        _REJECTED.inc()
        return web.json_response({"error": f"body larger than {MAX_BODY} bytes"}, status=413)
    except (ValueError, UnicodeDecodeError) as exc:  # json errors and BadReviewError are ValueErrors
        _REJECTED.inc()
        reason = str(exc) if isinstance(exc, BadReviewError) else "the body is not JSON"
        return web.json_response({"error": reason}, status=400)
    response = decided.review["response"]
    if decided.denial is None:
        (_PATCHED if "patch" in response else _ALLOWED).inc()
    else:
        _DENIED.inc()
        DENIALS.labels(decided.denial.value).inc()
    LATENCY.observe(time.perf_counter() - started)
    if logger.isEnabledFor(logging.DEBUG):  # -v: what was decided, never the object itself
        review_request = review.get("request") or {}
        logger.debug(
            "%s %s %s/%s: %s",
            review_request.get("operation"),
            (review_request.get("kind") or {}).get("kind"),
            review_request.get("namespace"),
            review_request.get("name") or (review_request.get("object") or {}).get("metadata", {}).get("generateName"),
            "patched" if "patch" in response else "allowed" if response["allowed"] else response["status"]["message"],
        )
    return web.Response(body=orjson.dumps(decided.review), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    if request.app[_READY_KEY]():
        return web.Response(text="ok")
    return web.Response(text="VolumeManager index not synced yet", status=503)


def _exposition() -> bytes:
    if os.environ.get(MULTIPROC_ENV):
        # Several workers: each keeps its metrics in files there, and every scrape (whichever
        # worker answers it) sums the counters and histograms of all of them. The process_*
        # and python_* collectors describe one process only, so they are left out.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=_exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(
    index: VolumeIndex,
    ready: Callable[[], bool] | None = None,
    callers: Callers = Callers(),
    read_through: ReadThrough | None = None,
) -> web.Application:
    """The application; ``ready`` (default: ``index`` has synced) answers /readyz, ``callers``
    says who /mutate answers, ``read_through`` looks again for refs the index lacks."""
    app = web.Application(client_max_size=MAX_BODY)
    app[_INDEX_KEY] = index
    app[_READ_THROUGH_KEY] = read_through
    app[_READY_KEY] = ready or index.synced.is_set
    app[_CALLERS_KEY] = callers
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


class ReloadingTLS:
    """An SSL context whose certificate follows its files (cert-manager, `kvc certs rotate`)."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        if client_ca_file is not None:
            # Optional at the handshake, so that the kubelet's probes and Prometheus (which
            # present none) still reach /healthz, /readyz and /metrics; a certificate that is
            # presented must be of this CA. /mutate requires one (Callers).
            self.context.verify_mode = ssl.CERT_OPTIONAL
            self.context.load_verify_locations(cafile=client_ca_file)
        self._stamp: tuple[float, float] = (0.0, 0.0)
        self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        stamp = (self.cert_file.stat().st_mtime, self.key_file.stat().st_mtime)
        if stamp == self._stamp:
            return False
        try:
            # Check the pair on a scratch context first: a failed load can leave a context
            # with the new certificate and the old key, which no client could talk to.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:  # a half-written or mismatched pair
            logger.warning("serving certificate not reloaded (%s); keeping the previous one", exc)
            return False
        self._stamp = stamp
        logger.info("serving certificate loaded from %s", self.cert_file)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CERT_CHECK_SECONDS)
            try:
                self.reload_if_changed()
            except OSError as exc:
                logger.warning("cannot read the serving certificate: %s", exc)


@dataclass(frozen=True)
class Settings:
    """What every serving process needs; picklable, so worker processes get it as it is."""

    host: str
    port: int
    cert_file: Path
    key_file: Path
    # Called in each process: API clients and their connection pools are not shared.
    api_client: Callable[[], Any]
    # Called first in each worker process (the CLI's logging options); None: leave logging as it is.
    setup_logging: Callable[[], None] | None = None
    # Wire node-local data as a hostPath, not through its claim: single-tenant clusters only.
    inject_host_path: bool = False
    # Answer /mutate only for a client certificate of this CA (the API server's), and of one
    # of these names when any are given.
    client_ca_file: Path | None = None
    client_names: tuple[str, ...] = ()

    def callers(self) -> Callers:
        return Callers(required=self.client_ca_file is not None, names=frozenset(self.client_names))


def _take_connections(
    channel: socket.socket, runner: web.AppRunner, context: ssl.SSLContext, stopping: asyncio.Event
) -> None:
    """Serve the connections the supervisor hands over on ``channel``, one descriptor per message."""
    loop = asyncio.get_running_loop()
    server = runner.server
    if server is None:
        raise RuntimeError("the runner is not set up")
    adopting: set[asyncio.Task[Any]] = set()
    channel.setblocking(False)

    async def adopt(connection: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(server, connection, ssl=context)
        except OSError as exc:  # the client left or failed the TLS handshake
            connection.close()
            logger.debug("connection dropped before its first request: %s", exc)

    def readable() -> None:
        while True:
            try:
                message, descriptors, _flags, _address = socket.recv_fds(channel, 1, 1)
            except BlockingIOError:
                return
            except OSError:
                message, descriptors = b"", []
            if not message and not descriptors:  # the supervisor is gone: so is the listening socket
                loop.remove_reader(channel.fileno())
                stopping.set()
                return
            for descriptor in descriptors:
                task = loop.create_task(adopt(socket.socket(fileno=descriptor)))
                adopting.add(task)
                task.add_done_callback(adopting.discard)

    loop.add_reader(channel.fileno(), readable)
    channel.send(b"up")  # the supervisor deals connections to this worker from now on


def serve(
    settings: Settings,
    *,
    handoff: socket.socket | None = None,
    ready: Callable[[], bool] | None = None,
    on_synced: Callable[[], None] | None = None,
) -> None:
    """Serve from this process until SIGTERM or SIGINT, then let in-flight requests finish.

    Without ``handoff`` this process listens on the port itself; with it, it serves the
    connections a supervisor accepted and passes over that Unix socket. ``ready``, when
    given, must also hold for /readyz to answer ok once this process's index has synced;
    ``on_synced`` is called once it has.
    """
    from kvc.sources.registry import load_registry  # noqa: PLC0415 - the source types' plugins, per process
    from webhook.index import follow  # noqa: PLC0415 - the watch needs a cluster; tests use make_app

    index = VolumeIndex(host_path=settings.inject_host_path, registry=load_registry())
    read_through = ReadThrough(namespace_lister(settings.api_client()), index)
    stop = threading.Event()
    threading.Thread(target=follow, args=(index, settings.api_client(), stop), name="index", daemon=True).start()
    tls = ReloadingTLS(settings.cert_file, settings.key_file, settings.client_ca_file)

    async def report_synced() -> None:
        while not index.synced.is_set():
            await asyncio.sleep(0.1)
        if on_synced is not None:
            on_synced()

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        app = make_app(
            index, (lambda: index.synced.is_set() and ready()) if ready else None, settings.callers(), read_through
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
        if handoff is None:
            await web.TCPSite(runner, settings.host, settings.port, ssl_context=tls.context).start()
        else:
            _take_connections(handoff, runner, tls.context, stopping)
        logger.info("webhook serving on https://%s:%d (pid %d)", settings.host, settings.port, os.getpid())
        tasks = [asyncio.create_task(tls.watch()), asyncio.create_task(report_synced())]
        try:
            await stopping.wait()
            logger.info("webhook stopping (pid %d)", os.getpid())
        finally:
            if handoff is not None:
                loop.remove_reader(handoff.fileno())  # no new connections while these finish
            for task in tasks:
                task.cancel()
            stop.set()
            await runner.cleanup()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())
