"""Several webhook processes behind one port (``kvc run webhook --workers N``).

One Python process decides admissions on one core at most. The supervisor listens on the
port, accepts connections and hands each to the next of N worker processes in turn (the
descriptor over a Unix socket); the worker does the TLS handshake and serves every request
of that keep-alive connection. Handing out in turn keeps the workers evenly loaded even
with few connections: with SO_REUSEPORT the kernel picks a listener by a hash of the
addresses, and 4 connections landed all on one of 2 workers one time in five, 3 to 1 half
of the time (measured on loopback), leaving a core idle while requests queued.

Each worker is otherwise a whole webhook: its own VolumeManager list+watch and index, its
own certificate reload, its own event loop. N watches cost the API server N streams of the
same (rare) VolumeManager events; in exchange no admission waits on another process.

- Readiness: a probe's connection reaches any one worker, so /readyz is ok only once every
  worker's index has synced (one shared flag per worker).
- Metrics: prometheus_client's multiprocess mode, in a directory made for this start. Each
  worker writes its counters and histograms there and any worker answering /metrics sums
  them all, so counters never jump between scrapes; the index gauge reports the smallest
  index among the workers.
- Lifecycle: SIGTERM or SIGINT closes the port and stops every worker (in-flight requests
  finish). A worker that exits on its own stops the others and the supervisor exits with an
  error, so the container restarts, as it would after a crash of a single-process webhook.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from webhook.server import MULTIPROC_ENV, SHUTDOWN_SECONDS, Settings, serve

logger = logging.getLogger(__name__)

# The most workers chosen by default, whatever the node has: admission is rarely busier,
# and each worker holds its own watch and index.
MAX_DEFAULT_WORKERS = 4
_PR_SET_PDEATHSIG = 1
_METRICS_PREFIX = "kvc-webhook-metrics-"
_SHM = "/dev/shm"  # noqa: S108 - a fresh private directory is made inside
_CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_cpus(v2_max: Path, v1_quota: Path, v1_period: Path) -> float | None:
    """The container's CPU limit (CFS quota / period), or None when it has none."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = v2_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int(v1_quota.read_text())
        return quota_us / int(v1_period.read_text()) if quota_us > 0 else None
    return None


def _available_cpus(
    v2_max: Path = _CGROUP_V2_MAX, v1_quota: Path = _CGROUP_V1_QUOTA, v1_period: Path = _CGROUP_V1_PERIOD
) -> int:
    """CPUs this process may use: its affinity, capped by the container's CPU limit (rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = _cgroup_cpus(v2_max, v1_quota, v1_period)
    return max(1, min(cpus, math.ceil(limit))) if limit else max(1, cpus)


def default_workers() -> int:
    """One worker per CPU the container may use, at most MAX_DEFAULT_WORKERS."""
    return min(_available_cpus(), MAX_DEFAULT_WORKERS)


def _die_with(supervisor: int) -> None:
    """Have the kernel stop this worker when the supervisor dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before prctl took effect
        raise SystemExit(1)


def _metrics_parent() -> str | None:
    """The shared-memory mount where it is writable: memory-backed, and writable in a
    container with a read-only root filesystem without a volume. Else the temporary directory."""
    return _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None


def _remove_stale_metrics(parent: Path) -> None:
    """Remove the metrics directories of supervisors that were killed (SIGKILL leaves them)."""
    for directory in parent.glob(f"{_METRICS_PREFIX}*-*"):
        owner = directory.name[len(_METRICS_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or Path(f"/proc/{owner}").exists() or not Path("/proc/self").exists():
            continue
        shutil.rmtree(directory, ignore_errors=True)


def _work(settings: Settings, number: int, synced: Any, supervisor: int, handoff: socket.socket) -> None:
    """A worker process: one complete webhook, serving the connections it is handed."""
    _die_with(supervisor)
    if settings.setup_logging is not None:
        settings.setup_logging()

    def mark_synced() -> None:
        synced[number] = 1

    serve(settings, handoff=handoff, ready=lambda: all(synced), on_synced=mark_synced)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=1024)
    listener.setblocking(False)
    return listener


class _Dealer:
    """Hands accepted connections in turn to the workers that are serving, skipping any that
    cannot take one. Until a worker says it serves, connections wait in the listen backlog."""

    def __init__(self) -> None:
        self.channels: list[socket.socket] = []
        self._next = 0

    def serving(self, channel: socket.socket) -> None:
        with contextlib.suppress(OSError):
            channel.recv(16)  # "up", once: the worker listens on its channel
        if channel not in self.channels:
            self.channels.append(channel)

    def deal(self, listener: socket.socket) -> None:
        while True:
            try:
                connection, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: the client retries
                logger.warning("cannot accept a connection: %s", exc)
                return
            with connection:
                for _ in self.channels:
                    channel = self.channels[self._next % len(self.channels)]
                    self._next += 1
                    try:
                        socket.send_fds(channel, [b"c"], [connection.fileno()])
                        break
                    except OSError:  # full (a stuck worker) or gone (noticed by its sentinel)
                        continue


def _deal_until_stopped(
    listener: socket.socket,
    processes: Sequence[BaseProcess],
    channels: Sequence[socket.socket],
    stopped: Callable[[], bool],
) -> BaseProcess | None:
    """Deal connections until ``stopped()`` or until a worker exits; returns that worker."""
    dealer = _Dealer()
    with selectors.DefaultSelector() as selector:
        for process, channel in zip(processes, channels, strict=True):
            selector.register(process.sentinel, selectors.EVENT_READ, process)
            selector.register(channel, selectors.EVENT_READ, channel)
        while not stopped():
            for key, _events in selector.select(timeout=0.5):
                if key.data is listener:
                    dealer.deal(listener)
                elif isinstance(key.data, socket.socket):
                    selector.unregister(key.data)
                    if not dealer.channels:  # the first worker serves: accept from now on
                        selector.register(listener, selectors.EVENT_READ, listener)
                    dealer.serving(key.data)
                else:
                    exited: BaseProcess = key.data
                    return exited
    return None


def _stop(processes: Sequence[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: the worker lets in-flight requests finish
    deadline = SHUTDOWN_SECONDS + 5
    for process in processes:
        process.join(deadline)
        if process.is_alive():
            logger.warning("webhook worker %s did not stop in time; killing it", process.name)
            process.kill()
            process.join()


def supervise(settings: Settings, workers: int) -> None:
    """Run ``workers`` worker processes until SIGTERM or SIGINT, or until one exits."""
    # Spawned, not forked: each worker imports prometheus_client afresh, after the
    # multiprocess directory is set, and starts without this process's threads.
    context = multiprocessing.get_context("spawn")
    synced = context.RawArray("b", workers)
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    outer_metrics_dir = os.environ.get(MULTIPROC_ENV)
    listener = _listen(settings.host, settings.port)
    # Message boundaries: one message, one descriptor.
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(workers)]
    parent = _metrics_parent()
    _remove_stale_metrics(Path(parent or tempfile.gettempdir()))
    prefix = f"{_METRICS_PREFIX}{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as metrics_dir, listener:
        # The workers inherit it. Always a new directory: files left by an earlier run (or
        # by anything else) must not be added to this one's counters.
        os.environ[MULTIPROC_ENV] = metrics_dir
        previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        processes = [
            context.Process(
                target=_work,
                args=(settings, number, synced, os.getpid(), theirs),
                name=f"kvc-webhook-worker-{number}",
            )
            for number, (_ours, theirs) in enumerate(pairs)
        ]
        failed: BaseProcess | None = None
        try:
            for process, (ours, theirs) in zip(processes, pairs, strict=True):
                process.start()
                theirs.close()
                ours.setblocking(False)
            logger.info("webhook started %d workers on port %d", workers, settings.port)
            failed = _deal_until_stopped(listener, processes, [ours for ours, _theirs in pairs], lambda: stopping)
        finally:
            listener.close()  # no new connections while the workers finish theirs
            _stop(processes)
            for ours, theirs in pairs:
                ours.close()
                theirs.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if outer_metrics_dir is None:
                del os.environ[MULTIPROC_ENV]
            else:
                os.environ[MULTIPROC_ENV] = outer_metrics_dir
    if failed is not None and not stopping:
        logger.error(
            "webhook worker %s exited with code %s; stopped the others so that the container restarts",
            failed.name,
            failed.exitcode,
        )
        raise SystemExit(1)


def run(settings: Settings, workers: int = 1) -> None:
    """Serve until SIGTERM or SIGINT (``kvc run webhook``): from this process, or from
    ``workers`` worker processes that this one hands the connections to."""
    if workers <= 1:
        serve(settings)
        return
    supervise(settings, workers)
