"""Fetch benchmark: KVC's S3 fetcher against `aws s3 sync` and a floor, in one run.

Two data shapes on a loopback S3 server: many small files and a few large ones. The
floor is raw parallel GETs that discard the bytes (what the server can give); every
tool's median over the runs is compared with it and with awscli.

    python -m e2e.bench_fetch [--aws PATH] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from e2e.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, S3Server
from kvc.agent.files import ReplicaDir
from kvc.sources.s3_fetch import fetch, make_client
from kvc.sources.transfer import Progress

WORKERS = 16
SEED = 8


def seed_bucket(server: S3Server, bucket: str, small: int, large_mib: int) -> dict[str, int]:
    rng = random.Random(SEED)
    s3 = server.client()
    s3.create_bucket(Bucket=bucket)
    small_objects = [
        (f"small/d{i % 16}/f{i:05d}.bin", rng.randbytes(rng.randrange(8_000, 56_000))) for i in range(small)
    ]
    large_objects = [(f"large/part-{i}.bin", rng.randbytes(64 << 20)) for i in range(max(1, large_mib // 64))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=item[0], Body=item[1]), small_objects))
    for key, body in large_objects:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return {"small": sum(len(b) for _, b in small_objects), "large": sum(len(b) for _, b in large_objects)}


def floor(server: S3Server, bucket: str, prefix: str, target: Path) -> None:
    client = make_client(server.endpoint_url, REGION, ACCESS_KEY_ID, SECRET_ACCESS_KEY, WORKERS)
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    ]

    def get(key: str) -> None:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        for _ in body.iter_chunks(1 << 20):
            pass

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(get, keys))


def kvc(server: S3Server, bucket: str, prefix: str, target: Path) -> None:
    client = make_client(server.endpoint_url, REGION, ACCESS_KEY_ID, SECRET_ACCESS_KEY, WORKERS)
    fetch(client, f"s3://{bucket}/{prefix}", ReplicaDir(target), Progress(), workers=WORKERS, stop=threading.Event())


def awscli(aws: str) -> Callable[[S3Server, str, str, Path], None]:
    def run(server: S3Server, bucket: str, prefix: str, target: Path) -> None:
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        subprocess.run(
            [
                aws,
                "s3",
                "sync",
                f"s3://{bucket}/{prefix}",
                str(target),
                "--endpoint-url",
                server.endpoint_url,
                "--only-show-errors",
            ],
            check=True,
            env=env,
        )

    return run


def measure(
    tool: Callable[[S3Server, str, str, Path], None], server: S3Server, bucket: str, prefix: str, runs: int
) -> float:
    times = []
    for _ in range(runs):
        target = Path(tempfile.mkdtemp(prefix="kvc-bench-"))
        shutil.rmtree(target)
        started = time.perf_counter()
        tool(server, bucket, prefix, target)
        times.append(time.perf_counter() - started)
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(target.with_name(target.name + ".partial"), ignore_errors=True)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aws", default=shutil.which("aws"), help="the aws command (awscli)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000, help="number of small files")
    parser.add_argument("--large-mib", type=int, default=256, help="MiB of large files")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvc-bench-s3-") as scratch:
        server = S3Server(Path(scratch) / "s3.log").start()
        try:
            sizes = seed_bucket(server, "bench", args.small, args.large_mib)
            tools: dict[str, Any] = {"floor (parallel GETs, bytes discarded)": floor, "kvc fetch": kvc}
            if args.aws:
                tools["aws s3 sync"] = awscli(args.aws)
            rows = []
            for shape, prefix in (("small", "small/"), ("large", "large/")):
                results = {name: measure(tool, server, "bench", prefix, args.runs) for name, tool in tools.items()}
                rows.append((shape, sizes[shape], results))
        finally:
            server.stop()
    print(f"\nS3 fetch, median of {args.runs} runs, {WORKERS} parallel transfers, loopback moto server")
    print(f"{'data set':<26} {'tool':<40} {'seconds':>8} {'MB/s':>8} {'vs floor':>9} {'vs awscli':>10}")
    for shape, size, results in rows:
        label = f"{shape} ({size / 1e6:.0f} MB)"
        base, aws = results["floor (parallel GETs, bytes discarded)"], results.get("aws s3 sync")
        for name, seconds in results.items():
            versus_aws = f"{aws / seconds:.2f}x" if aws else "n/a"
            rate = size / seconds / 1e6
            print(f"{label:<26} {name:<40} {seconds:>8.2f} {rate:>8.1f} {base / seconds:>8.2f}x {versus_aws:>10}")
    if not args.aws:
        print("(awscli not found: `make bench` installs it in .venv-bench)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
