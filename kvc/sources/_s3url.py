"""S3 addresses (``s3://bucket/key``): what the controller checks without the S3 client.

Kept apart from ``s3_fetch`` so that the controller and the webhook, which validate S3
volumes but never fetch, do not import boto3 (7 MB of every such process).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_url(url: str) -> S3Location:
    if not url.startswith("s3://"):
        raise ValueError(f"sourceURL must start with s3://, not {url!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"sourceURL {url!r} names no bucket")
    return S3Location(bucket, key)
