"""Memory of an S3 fetch whose prefix lists a million keys: what the agent holds before it fails.

A loopback endpoint (its own process: its memory is not counted) makes ListObjectsV2 answers
on the fly, a thousand keys each, ``--keys`` in all; the agent's fetch (``s3_fetch.fetch``,
the direct listing path) lists them into a replica with ``--max-objects`` as the agent's
flag. Each run is a process of its own, so peak RSS is the fetch's:

    python -m e2e.bench_listing_memory [--keys 1000000] [--max-objects 200000]

prints the failure message, the peak RSS above the interpreter with KVC imported, and
tracemalloc's peak (Python objects alone).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAGE = 1000
ETAG = '"0123456789abcdef0123456789abcdef"'


def serve(keys: int) -> None:
    """The endpoint: ``keys`` keys under p/ such as p/train/shard-00012/img-000012345.jpg."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            start = int(query.get("continuation-token", ["0"])[0])
            end = min(start + PAGE, keys)
            contents = "".join(
                f"<Contents><Key>p/train/shard-{i // 10000:05d}/img-{i:09d}.jpg</Key>"
                f"<Size>{1000 + i % 9000}</Size><ETag>{ETAG}</ETag></Contents>"
                for i in range(start, end)
            )
            more = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{end}</NextContinuationToken>"
            body = f"<ListBucketResult>{more if end < keys else ''}{contents}</ListBucketResult>".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(port: int, max_objects: int, trace: bool) -> None:
    import boto3  # noqa: PLC0415

    from kvc.agent.files import Limits, ReplicaDir  # noqa: PLC0415
    from kvc.sources import s3_fetch  # noqa: PLC0415
    from kvc.sources.transfer import FetchError, Progress  # noqa: PLC0415

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="a",
        aws_secret_access_key="b",
    )
    before = _rss_mib()
    if trace:
        tracemalloc.start()
    started = time.monotonic()
    outcome = "fetched"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            s3_fetch.fetch(
                client,
                "s3://bucket/p/",
                ReplicaDir(Path(tmp) / "vol"),
                Progress(),
                limits=Limits(capacity=1 << 30, max_objects=max_objects),
            )
        except FetchError as exc:
            outcome = f"failed: {exc}"
    seconds, rss = time.monotonic() - started, _rss_mib() - before
    print(f"max objects {max_objects}: {outcome}")
    if trace:
        _, peak = tracemalloc.get_traced_memory()
        print(f"  tracemalloc: Python objects peak {peak / 2**20:.0f} MiB")
    else:
        print(f"  {seconds:.1f}s; peak RSS +{rss:.0f} MiB (above the interpreter with boto3 and KVC loaded)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--max-objects", type=int, action="append", help="repeatable; default: 200000")
    parser.add_argument("--tracemalloc", action="store_true", help="measure Python objects too (slower, more RSS)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.keys)
        return 0
    if args.port:
        measure(args.port, args.max_objects[0], args.tracemalloc)
        return 0
    server = subprocess.Popen(
        [sys.executable, "-m", "e2e.bench_listing_memory", "--serve", f"--keys={args.keys}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        print(f"listing {args.keys} keys, {PAGE} per answer")
        for max_objects in args.max_objects or [200_000]:
            for trace in ([], ["--tracemalloc"]) if args.tracemalloc else ([],):
                command = ["-m", "e2e.bench_listing_memory", f"--port={port}", f"--max-objects={max_objects}", *trace]
                subprocess.run([sys.executable, *command], check=True)
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    threading.excepthook = lambda args: None
    sys.exit(main())
