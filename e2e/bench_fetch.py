"""Fetch benchmark: KVC's S3 fetcher against `aws s3 sync` and a floor, in one run.

Two data shapes on a loopback S3 server: many small files and a few large ones. The
floor is raw parallel GETs that discard the bytes (what the server can give); every
tool's median over the runs is compared with it and with awscli.

    python -m e2e.bench_fetch [--aws PATH] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
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

from e2e.benchtools import binary
from e2e.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, S3Server
from kvc.agent.files import MANIFEST, ReplicaDir
from kvc.sources._s3http import ObjectGetter
from kvc.sources.s3_fetch import fetch, make_client
from kvc.sources.transfer import Progress

WORKERS = 16
SEED = 8


def seed_bucket(server: S3Server, bucket: str, small: int, large_mib: int) -> dict[str, tuple[int, int]]:
    """Upload both data sets; their (file count, bytes) by shape."""
    rng = random.Random(SEED)
    # Uploaded as current SDKs and CLIs do: with a CRC32 checksum S3 keeps with the object.
    s3 = make_client(server.endpoint_url, REGION, ACCESS_KEY_ID, SECRET_ACCESS_KEY, 8)
    s3.create_bucket(Bucket=bucket)
    small_objects = [
        (f"small/d{i % 16}/f{i:05d}.bin", rng.randbytes(rng.randrange(8_000, 56_000))) for i in range(small)
    ]
    large_objects = [(f"large/part-{i}.bin", rng.randbytes(64 << 20)) for i in range(max(1, large_mib // 64))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=item[0], Body=item[1]), small_objects))
    for key, body in large_objects:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return {
        "small": (len(small_objects), sum(len(b) for _, b in small_objects)),
        "large": (len(large_objects), sum(len(b) for _, b in large_objects)),
    }


def floor(server: S3Server, bucket: str, prefix: str, target: Path) -> None:
    """Every object GET on WORKERS connections, bytes read and dropped: no files, no checks.

    Small objects on the event loop, large ones read into one buffer per thread: the
    fastest way each shape can be read in Python.
    """
    client = make_client(server.endpoint_url, REGION, ACCESS_KEY_ID, SECRET_ACCESS_KEY, WORKERS)
    objects = [
        (item["Key"], item["Size"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    ]

    async def get_all() -> None:
        getter = ObjectGetter(client, bucket, connections=WORKERS)
        pending = iter(objects)

        async def transfer() -> None:
            for key, size in pending:
                if size >= 8 << 20:
                    await asyncio.to_thread(getter.copy_into, key, 0, lambda block: None)
                else:
                    async for _ in getter.get(key):
                        pass

        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(WORKERS))
        await asyncio.gather(*(transfer() for _ in range(WORKERS)))
        getter.close()

    asyncio.run(get_all())


def kvc(server: S3Server, bucket: str, prefix: str, target: Path) -> None:
    client = make_client(server.endpoint_url, REGION, ACCESS_KEY_ID, SECRET_ACCESS_KEY, WORKERS)
    fetch(client, f"s3://{bucket}/{prefix}", ReplicaDir(target), Progress(), workers=WORKERS, stop=threading.Event())


def _aws_env() -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        # gofakes3 sends the whole object's CRC with every ranged GET; awscli's multipart
        # download would check each part against it and fail.
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def s5cmd(server: S3Server, bucket: str, prefix: str, target: Path) -> None:
    # Its defaults (256 workers, 50 MiB parts, 5 parts at a time per file), as users run it.
    subprocess.run(
        [str(binary("s5cmd")), "--endpoint-url", server.endpoint_url, "cp", f"s3://{bucket}/{prefix}*", f"{target}/"],
        check=True,
        env=_aws_env(),
        stdout=subprocess.DEVNULL,
    )


def awscli(aws: str) -> Callable[[S3Server, str, str, Path], None]:
    def run(server: S3Server, bucket: str, prefix: str, target: Path) -> None:
        env = _aws_env()
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


FLOOR, KVC, S5CMD, AWSCLI = "floor (parallel GETs, bytes discarded)", "kvc fetch", "s5cmd cp", "aws s3 sync"


def _copied(target: Path) -> tuple[int, int]:
    # KVC's manifest is its bookkeeping, not data.
    files = [path for path in target.rglob("*") if path.is_file() and path.name != MANIFEST]
    return len(files), sum(path.stat().st_size for path in files)


def measure(
    tool: Callable[[S3Server, str, str, Path], None],
    server: S3Server,
    bucket: str,
    prefix: str,
    expected: tuple[int, int] | None,
) -> float:
    """Seconds of one run; the copy is checked for its file count and bytes before it counts."""
    target = Path(tempfile.mkdtemp(prefix="kvc-bench-"))
    shutil.rmtree(target)
    started = time.perf_counter()
    tool(server, bucket, prefix, target)
    elapsed = time.perf_counter() - started
    if expected is not None and _copied(target) != expected:
        raise SystemExit(f"{tool} copied {_copied(target)} (files, bytes) of {prefix}, expected {expected}")
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(target.with_name(target.name + ".partial"), ignore_errors=True)
    return elapsed


def _ratio(numerator: float | None, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if numerator else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aws", default=shutil.which("aws"), help="the aws command (awscli)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", type=int, default=5000, help="number of small files (8-56 kB)")
    parser.add_argument("--large-mib", type=int, default=1024, help="MiB of large files (64 MiB each)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvc-bench-s3-") as scratch:
        server = S3Server(Path(scratch) / "s3.log", implementation="gofakes3").start()
        try:
            shapes = seed_bucket(server, "bench", args.small, args.large_mib)
            tools: dict[str, Any] = {FLOOR: floor, KVC: kvc, S5CMD: s5cmd}
            if args.aws:
                tools[AWSCLI] = awscli(args.aws)
            for shape, prefix in (("small", "small/"), ("large", "large/")):
                # Round robin, so that what one tool leaves behind (page cache to reclaim,
                # dirty pages to flush) weighs on every tool alike.
                times: dict[str, list[float]] = {name: [] for name in tools}
                for _ in range(args.runs):
                    for name, tool in tools.items():
                        expected = None if name == FLOOR else shapes[shape]
                        times[name].append(measure(tool, server, "bench", prefix, expected))
                rows.append((shape, shapes[shape], {name: statistics.median(t) for name, t in times.items()}))
        finally:
            server.stop()
    print(f"\nS3 fetch, median of {args.runs} runs, loopback gofakes3 server (in memory), same machine")
    print(f"KVC and the floor: {WORKERS} parallel transfers; s5cmd and awscli: their defaults\n")
    print(
        f"| {'data set':<28} | {'tool':<40} | {'seconds':>8} | {'MB/s':>8} | {'vs floor':>8} "
        f"| {'vs s5cmd':>8} | {'vs awscli':>9} |"
    )
    print(f"|{'-' * 30}|{'-' * 42}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 10}:|")
    verdicts = []
    for shape, (files, size), results in rows:
        label = f"{shape}: {files:,} files, {size / 1e6:,.0f} MB"
        for name, seconds in results.items():
            print(
                f"| {label:<28} | {name:<40} | {seconds:>8.2f} | {size / seconds / 1e6:>8.1f} "
                f"| {_ratio(results[FLOOR], seconds):>8} | {_ratio(results.get(S5CMD), seconds):>8} "
                f"| {_ratio(results.get(AWSCLI), seconds):>9} |"
            )
        kvc_seconds = results[KVC]
        verdicts.append((f"{shape}: kvc >= 1.0x s5cmd", results[S5CMD] / kvc_seconds, 1.0))
        if AWSCLI in results:
            verdicts.append((f"{shape}: kvc >= 2.0x awscli", results[AWSCLI] / kvc_seconds, 2.0))
    print("\n| target | measured | |\n|---|---:|---|")
    for what, measured, wanted in verdicts:
        print(f"| {what} | {measured:.2f}x | {'met' if measured >= wanted else 'NOT met'} |")
    if not args.aws:
        print("(awscli not found: `make bench` installs it in .venv-bench)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
