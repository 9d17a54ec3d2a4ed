"""HTTP: one or more files (models, tarballs) from https URLs onto ``replicas`` nodes.

Options: ``url`` (one or more, separated by commas or spaces), ``sha256`` (one digest per
URL, in the same order), ``unpack`` (tar, tar.gz, zip), ``headersSecretName`` (a Secret
whose keys are HTTP header names, e.g. Authorization; values are never logged).
Downloads resume with Range requests when the server supports them. Redirects are followed
only to URLs the same rules accept, and without the Secret's headers once the origin
changes; no connection reaches the agent's blocked networks (kvc.sources._egress).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from urllib.parse import unquote, urlparse

from kvc.agent.files import (
    DOWNLOADS,
    Budget,
    Manifest,
    ManifestFile,
    ReplicaDir,
    TreePath,
    UnsafePathError,
    remove_unexpected,
    safe_relative,
)
from kvc.api import names
from kvc.api.models import VolumeConfig
from kvc.api.units import parse_duration
from kvc.sources import _egress, _nodelocal
from kvc.sources.base import FetchRequest, required_options, url_problem
from kvc.sources.transfer import CHUNK, RETRIES, FetchError, Progress, finish_unpack, retry_delay, run_parallel

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def split_list(value: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", value.strip()) if item]


def file_name(url: str) -> str:
    """The name a URL's file gets in the volume: the last segment of its path."""
    name = unquote(urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])
    return str(safe_relative(name or "download"))


def source_digest(config: VolumeConfig) -> str:
    options = config.options
    return names.short_hash(
        *split_list(options.get("url", "")), options.get("sha256", "").strip(), options.get("unpack", "").strip()
    )


def _download(
    url: str,
    target: TreePath,
    *,
    headers: Mapping[str, str],
    progress: Progress,
    deadline: float,
    should_stop: Callable[[], bool],
    opener: urllib.request.OpenerDirector,
) -> None:
    attempt = 0
    while True:
        have = target.size() or 0
        request = urllib.request.Request(url, headers=dict(headers))  # noqa: S310 - scheme checked by validate
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with opener.open(request, timeout=30) as response:
                if have and response.status != 206:  # the server ignored the range: start over
                    progress.add(-have)
                    have = 0
                with target.open(append=bool(have)) as out:
                    _check_length(url, response.headers.get("Content-Length"), target.tree.budget)
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        progress.add(len(chunk))
                        if should_stop():
                            raise FetchError("stopped")
            progress.file_done()
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to fetch: the file is complete
                progress.file_done()
                return
            if exc.code < 500:
                raise FetchError(f"{_redact(url)} answered HTTP {exc.code} {exc.reason}") from None
            error: Exception = exc
        except (urllib.error.URLError, OSError) as exc:
            error = exc
        attempt += 1
        if attempt > RETRIES or time.monotonic() > deadline:
            raise FetchError(f"giving up on {_redact(url)}: {type(error).__name__}: {error}") from None
        delay = retry_delay(attempt)
        logger.warning("retrying %s in %.1fs (%s)", _redact(url), delay, type(error).__name__)
        time.sleep(delay)


_redact = _egress.redact


def _url_refusal(url: str, pinned: bool) -> str | None:
    """Why the agent does not fetch ``url``, first or redirected to: the rules options.url is validated by.

    ``pinned``: the file has a SHA-256 in options.sha256 and no header Secret is sent.
    """
    problem = url_problem("url", url)
    if problem is None:
        return None
    if "plaintext" not in problem:
        return "only https:// URLs are fetched (and http:// to this machine's loopback)"
    if pinned:
        return None
    return "plaintext http is refused for a file without options.sha256 or with headers from headersSecretName"


def _check_length(url: str, announced: str | None, budget: Budget) -> None:
    """Fail before a byte is written when the answer says it is longer than the capacity leaves room for.

    An answer without a length is stopped as it is written (``Budget.charge``).
    """
    remaining = budget.remaining
    if remaining is not None and announced and announced.isdigit() and int(announced) > remaining:
        raise budget.over_capacity(f"{_redact(url)}: its {announced} bytes")


def _sha256_of(target: TreePath) -> str:
    digest = hashlib.sha256()
    with target.read() as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HTTPSource(_nodelocal.NodeLocalSource):
    source_type = "HTTP"
    agent_options = ("url", "sha256", "unpack", "timeoutForDataDownload")
    known_options = ("url", "sha256", "unpack", "headersSecretName", "timeoutForDataDownload")
    credentials_option = "headersSecretName"

    def validate_options(self, config: VolumeConfig) -> list[str]:
        options = config.options
        problems = required_options(config, {"url": "one or more https:// URLs, separated by commas"})
        urls = split_list(options.get("url", ""))
        names_seen: set[str] = set()
        digests = split_list(options.get("sha256", ""))
        # Plain http is accepted only where it cannot leak or corrupt anything: every file is
        # pinned by a SHA-256 and no header Secret is sent.
        pinned = bool(digests) and len(digests) == len(urls) and not options.get("headersSecretName", "").strip()
        for url in urls:
            problem = url_problem("url", url)
            if problem and _url_refusal(url, pinned):  # the agent's rule, in the words of validation
                problems.append(problem)
                continue
            try:
                name = file_name(url)
            except UnsafePathError:
                problems.append(f"options.url {_redact(url)} does not end in a usable file name")
                continue
            if name in names_seen:
                problems.append(f"options.url lists two URLs whose files are both named {name}")
            names_seen.add(name)
        if digests and len(digests) != len(urls):
            problems.append(f"options.sha256 must give one digest per URL: {len(digests)} for {len(urls)} URLs")
        problems += [f"options.sha256 {d!r} is not a hex SHA-256 digest" for d in digests if not _SHA256.match(d)]
        return problems + super().validate_options(config)

    def digest(self, config: VolumeConfig) -> str:
        return source_digest(config)

    def fetch(self, request: FetchRequest) -> Manifest:
        options = request.options
        urls = split_list(options.get("url", ""))
        digests = split_list(options.get("sha256", "")) or [""] * len(urls)
        unpack = options.get("unpack") or None
        timeout = options.get("timeoutForDataDownload")
        deadline = time.monotonic() + parse_duration(timeout) if timeout else float("inf")
        replica: ReplicaDir = request.replica
        # Paths in the staging directory; archives go to DOWNLOADS, to be extracted from there.
        prefix = f"{DOWNLOADS}/" if unpack else ""
        planned = [(url, prefix + file_name(url), digest) for url, digest in zip(urls, digests, strict=True)]
        abort = threading.Event()

        def should_stop() -> bool:
            return abort.is_set() or request.stop.is_set()

        def job(url: str, target: TreePath, digest: str) -> None:
            refusal = functools.partial(_url_refusal, pinned=bool(digest) and not request.credentials)
            if why := refusal(url):
                raise FetchError(f"{_redact(url)}: {why}")
            try:
                _download(
                    url,
                    target,
                    headers=request.credentials,
                    progress=request.progress,
                    deadline=deadline,
                    should_stop=should_stop,
                    opener=_egress.opener(request.egress, refusal),
                )
            except _egress.EgressError as exc:  # the URL's host (or a proxy's) is in a blocked network
                raise FetchError(f"{_redact(url)}: {exc}") from None
            if digest and _sha256_of(target) != digest:
                target.unlink()
                raise FetchError(f"{_redact(url)} failed verification: its SHA-256 differs from options.sha256")

        budget = request.limits.budget(replica.staging)
        with replica.tree(budget) as tree:
            # Whatever else is staged goes: files no longer listed, what an earlier attempt extracted.
            on_disk = remove_unexpected(replica.staging, [relative for _, relative, _ in planned])
            budget.used = sum(on_disk.values())
            if unpack:
                tree.directory(DOWNLOADS)
            targets = [(url, tree.file(relative), digest) for url, relative, digest in planned]
            run_parallel(
                [functools.partial(job, url, target, digest) for url, target, digest in targets], 4, abort, "http-fetch"
            )
            manifest = Manifest(source=", ".join(_redact(u) for u in urls))
            if unpack:
                archives = [relative.removeprefix(prefix) for _, relative, _ in planned]
                finish_unpack(tree, unpack, manifest, archives, request.limits.max_objects)
            else:
                manifest.files = [ManifestFile(target.relative, target.size() or 0) for _, target, _ in targets]
        replica.publish(manifest)
        return manifest
