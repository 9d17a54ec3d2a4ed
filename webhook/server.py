"""The webhook's HTTPS server (aiohttp): admission endpoints, health, readiness, metrics.

- ``POST /mutate``: AdmissionReview v1 for pods, tfjobs and pytorchjobs. A body that is
  not JSON, or not an AdmissionReview, gets HTTP 400; bodies over ``MAX_BODY`` get 413.
- ``/healthz`` (alive), ``/readyz`` (the VolumeManager index has synced), ``/metrics``.
- The serving certificate is re-read when its files change: new connections get the new
  certificate, open ones finish undisturbed, and no request is refused meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from webhook.admission import BadReviewError, admit
from webhook.index import VolumeIndex

logger = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024  # the API server sends at most ~3 MiB objects
CERT_CHECK_SECONDS = 5.0

ADMISSIONS = Counter("kvc_webhook_admissions_total", "Admission requests by result", ["result"])
DENIALS = Counter("kvc_webhook_denials_total", "Denied admissions by reason", ["reason"])
LATENCY = Histogram(
    "kvc_webhook_admission_seconds",
    "Time to decide an admission request",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
_INDEX_KEY = web.AppKey("index", VolumeIndex)


def _denial_reason(message: str) -> str:
    for marker, reason in (
        ("not found in namespace", "unknown"),
        ("several VolumeManagers", "ambiguous"),
        ("is Failed", "failed"),
        ("spec.nodeName", "node-name"),
        ("already", "conflict"),
    ):
        if marker in message:
            return reason
    return "invalid"


async def mutate(request: web.Request) -> web.Response:
    started = time.perf_counter()
    if request.content_length is not None and request.content_length > MAX_BODY:
        ADMISSIONS.labels("rejected").inc()
        return web.json_response({"error": f"body larger than {MAX_BODY} bytes"}, status=413)
    try:
        body = await request.read()
        review: Any = orjson.loads(body)
        decision = admit(review, request.app[_INDEX_KEY].catalog)
    except web.HTTPRequestEntityTooLarge:
        ADMISSIONS.labels("rejected").inc()
        return web.json_response({"error": f"body larger than {MAX_BODY} bytes"}, status=413)
    except (ValueError, UnicodeDecodeError) as exc:  # json errors and BadReviewError are ValueErrors
        ADMISSIONS.labels("rejected").inc()
        reason = str(exc) if isinstance(exc, BadReviewError) else "the body is not JSON"
        return web.json_response({"error": reason}, status=400)
    response = decision["response"]
    if response["allowed"]:
        ADMISSIONS.labels("patched" if "patch" in response else "allowed").inc()
    else:
        ADMISSIONS.labels("denied").inc()
        DENIALS.labels(_denial_reason(response["status"]["message"])).inc()
    LATENCY.observe(time.perf_counter() - started)
    return web.Response(body=orjson.dumps(decision), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    if request.app[_INDEX_KEY].synced.is_set():
        return web.Response(text="ok")
    return web.Response(text="VolumeManager index not synced yet", status=503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(index: VolumeIndex) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[_INDEX_KEY] = index
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


class ReloadingTLS:
    """An SSL context whose certificate follows its files (cert-manager, `kvc certs rotate`)."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
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


def run(host: str, port: int, cert_file: Path, key_file: Path, api_client: Any) -> None:
    """Serve until interrupted (``kvc run webhook``)."""
    from webhook.index import follow  # noqa: PLC0415 - the watch needs a cluster; tests use make_app

    index = VolumeIndex()
    stop = threading.Event()
    threading.Thread(target=follow, args=(index, api_client, stop), name="index", daemon=True).start()
    tls = ReloadingTLS(cert_file, key_file)

    async def main() -> None:
        runner = web.AppRunner(make_app(index), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls.context)
        await site.start()
        logger.info("webhook serving on https://%s:%d", host, port)
        try:
            await tls.watch()
        finally:
            stop.set()
            await runner.cleanup()

    asyncio.run(main())
