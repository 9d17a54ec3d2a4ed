"""What every fetcher shares: progress, errors users can act on, parallel transfers, unpacking."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import PurePosixPath

from kvc.agent import unpack as unpack_archive
from kvc.agent.files import DOWNLOADS, DiskLimitError, Manifest, Tree, UnsafePathError, files_under

CHUNK = 1 << 20
# Attempts per file before a transient error (a dropped connection, a 5xx) fails the replica.
RETRIES = 8


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (from 1): doubling from 1 s, 15 s at most."""
    return min(0.5 * 2.0**attempt, 15.0)


class FetchError(RuntimeError):
    """A failure the user can act on; the message is shown in the volume's status."""


# Failures whose message is for the user as it is: a symlink met, a capacity or disk floor reached.
USER_ERRORS = (FetchError, UnsafePathError, DiskLimitError)


class Progress:
    """Bytes and files done so far, shared by the download threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.files = 0
        self.total_bytes = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.bytes += count

    def file_done(self) -> None:
        with self._lock:
            self.files += 1


def run_parallel(jobs: Sequence[Callable[[], None]], workers: int, abort: threading.Event, name: str) -> None:
    """Run every job on ``workers`` threads; on the first failure set ``abort`` and raise it.

    Jobs watch ``abort`` to stop early. The error is re-raised as a FetchError with a
    message for the user.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        futures = [pool.submit(job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            abort.set()
            wait(futures)
            error = failed[0].exception()
            if isinstance(error, USER_ERRORS):
                raise error
            raise FetchError(f"download failed: {type(error).__name__}: {error}") from error


def finish_unpack(tree: Tree, kind: str, manifest: Manifest, archives: Sequence[str], max_members: int) -> None:
    """Extract every downloaded archive (paths under DOWNLOADS) into the tree, the staging directory,
    then drop the archives. What was extracted by an earlier attempt was removed when it started."""
    for relative in sorted(archives):
        name = PurePosixPath(relative).name
        with tree.read(f"{DOWNLOADS}/{relative}") as archive:
            skipped = unpack_archive.extract(archive, name, tree, kind, max_members=max_members)
        manifest.skipped += [f"{name}:{member}" for member in skipped]
    shutil.rmtree(tree.root / DOWNLOADS)
    manifest.files = files_under(tree.root)
    if not manifest.files:
        raise FetchError("the archives held no files that could be extracted safely")
