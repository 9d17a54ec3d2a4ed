"""An S3 server on loopback for e2e tests and the demo (moto's standalone server).

It runs as its own process so tests can stop and restart it mid-transfer.  Objects
live in that process's memory: a restart empties the server, so tests that restart it
re-seed what they need.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3

from e2e.cluster import ControlPlaneError, die_with_parent, free_port, tail

# moto accepts any credentials; these make the intent obvious in logs and Secrets.
ACCESS_KEY_ID = "kvc-test-access-key"
SECRET_ACCESS_KEY = "kvc-test-secret-key"
REGION = "us-east-1"


class S3Server:
    def __init__(
        self, log_path: Path, port: int | None = None, env: dict[str, str] | None = None, implementation: str = "moto"
    ) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.env = env or {}
        self.implementation = implementation
        self._popen: subprocess.Popen[bytes] | None = None

    def _command(self) -> tuple[list[str], str]:
        """The server's command line and a path that answers once it serves."""
        if self.implementation == "gofakes3":
            from e2e.benchtools import binary  # noqa: PLC0415 - builds a Go tool; only benchmarks need it

            server = str(binary("gofakes3"))
            return [server, "-backend", "memory", "-host", f"127.0.0.1:{self.port}", "-quiet"], "/"
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], "/moto-api/"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> S3Server:
        log = self.log_path.open("ab")
        env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true", **self.env}
        command, ready_path = self._command()
        self._popen = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._popen.poll() is not None:
                raise ControlPlaneError(f"S3 server exited with {self._popen.returncode}:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}{ready_path}", timeout=2):  # noqa: S310
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise ControlPlaneError(f"S3 server not answering on {self.endpoint_url} after {timeout:.0f}s")

    def stop(self) -> None:
        if self._popen and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGTERM)
            try:
                self._popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._popen.pid, signal.SIGKILL)
                self._popen.wait()
        self._popen = None

    def client(self, service: str = "s3", access_key: str = ACCESS_KEY_ID, secret_key: str = SECRET_ACCESS_KEY) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
        )


def credentials_secret(
    name: str, access_key: str = ACCESS_KEY_ID, secret_key: str = SECRET_ACCESS_KEY
) -> dict[str, Any]:
    """A Secret an S3 volume names in awsCredentialsSecretName, holding a key pair for this server."""
    return {"metadata": {"name": name}, "stringData": {"awsAccessKeyID": access_key, "awsSecretAccessKey": secret_key}}


def authenticating_server(log_path: Path) -> tuple[S3Server, str, str]:
    """An S3 server that checks credentials, and a valid key pair for it.

    moto checks signatures once its first few requests are spent: those create an IAM
    user allowed to use S3 and its access key.
    """
    server = S3Server(log_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}).start()
    iam = server.client("iam")
    iam.create_user(UserName="kvc-reader")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="kvc-reader", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="kvc-reader")["AccessKey"]
    return server, key["AccessKeyId"], key["SecretAccessKey"]
