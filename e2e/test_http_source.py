"""The HTTP source: the agent-side fetch against a real loopback HTTP server, and an HTTP
volume end to end on the local control plane."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from e2e.helpers import VolumeManagers
from e2e.kvc import KvcAgent, KvcController
from kvc.agent.files import ReplicaDir
from kvc.api.models import VolumeConfig
from kvc.sources.base import FetchRequest
from kvc.sources.http import HTTPSource
from kvc.sources.transfer import FetchError, Progress
from kvc.testing.fileserver import FileServer

MODEL = os.urandom(3 * 1024 * 1024 + 5)
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
VOCAB_SHA = hashlib.sha256(b"hello\nworld\n").hexdigest()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "models").mkdir(parents=True)
    (root / "models" / "bert.bin").write_bytes(MODEL)
    (root / "models" / "vocab.txt").write_bytes(b"hello\nworld\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in {"bundle/config.json": b"{}", "../../evil.txt": b"evil"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "models" / "bundle.tar.gz").write_bytes(buffer.getvalue())
    return root


@pytest.fixture
def server(files: Path) -> Iterator[FileServer]:
    with FileServer(files).running() as running:
        yield running


def fetch(options: dict[str, str], dest: Path, credentials: dict[str, str] | None = None) -> tuple[Any, ReplicaDir]:
    replica = ReplicaDir(dest)
    request = FetchRequest(
        options=options, credentials=credentials or {}, replica=replica, progress=Progress(), stop=threading.Event()
    )
    return HTTPSource().fetch(request), replica


def test_files_are_fetched_and_verified_against_sha256(server: FileServer, tmp_path: Path) -> None:
    manifest, replica = fetch(
        {
            "url": f"{server.url}/models/bert.bin, {server.url}/models/vocab.txt",
            "sha256": f"{MODEL_SHA},{VOCAB_SHA}",
        },
        tmp_path / "vol",
    )
    assert (replica.final / "bert.bin").read_bytes() == MODEL
    assert (replica.final / "vocab.txt").read_bytes() == b"hello\nworld\n"
    assert sorted(f.path for f in manifest.files) == ["bert.bin", "vocab.txt"]


def test_a_wrong_sha256_fails_and_publishes_nothing(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"bert\.bin failed verification: its SHA-256 differs from options\.sha256"):
        fetch({"url": f"{server.url}/models/bert.bin", "sha256": "0" * 64}, tmp_path / "vol")
    assert not ReplicaDir(tmp_path / "vol").complete


def test_a_missing_file_is_reported_with_its_status(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"/models/nope.bin answered HTTP 404"):
        fetch({"url": f"{server.url}/models/nope.bin"}, tmp_path / "vol")


def test_a_partial_download_resumes_with_a_range_request(server: FileServer, tmp_path: Path) -> None:
    replica = ReplicaDir(tmp_path / "vol")
    replica.prepare()
    (replica.staging / "bert.bin").write_bytes(MODEL[:1000])
    fetch({"url": f"{server.url}/models/bert.bin", "sha256": MODEL_SHA}, tmp_path / "vol")
    assert (replica.final / "bert.bin").read_bytes() == MODEL
    assert [r.get("Range") for r in server.requests] == ["bytes=1000-"]


def test_headers_come_from_the_secret_and_are_required_by_the_server(files: Path, tmp_path: Path) -> None:
    with FileServer(files, required_headers={"Authorization": "Bearer s3cr3t-token"}).running() as guarded:
        with pytest.raises(FetchError, match="answered HTTP 401"):
            fetch({"url": f"{guarded.url}/models/vocab.txt"}, tmp_path / "denied")
        _, replica = fetch(
            {"url": f"{guarded.url}/models/vocab.txt"}, tmp_path / "allowed", {"Authorization": "Bearer s3cr3t-token"}
        )
        assert (replica.final / "vocab.txt").read_bytes() == b"hello\nworld\n"


def test_a_tarball_is_unpacked_safely(server: FileServer, tmp_path: Path) -> None:
    manifest, replica = fetch({"url": f"{server.url}/models/bundle.tar.gz", "unpack": "tar.gz"}, tmp_path / "n" / "vol")
    assert (replica.final / "bundle/config.json").read_bytes() == b"{}"
    assert manifest.skipped == ["bundle.tar.gz:../../evil.txt"]
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "n" / "evil.txt").exists()


def test_plain_http_is_fine_when_every_file_is_pinned_and_nothing_secret_is_sent() -> None:
    config = VolumeConfig.model_validate(
        {"id": "m", "sourceType": "HTTP", "options": {"url": "http://models.example.com/m.bin", "sha256": "a" * 64}}
    )
    assert HTTPSource().validate(config) == []


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({}, "options.url is required for HTTP volumes"),
        ({"url": "ftp://host/file"}, "options.url must be an https:// URL, not 'ftp://host/file'"),
        ({"url": "http://models.example.com/m.bin"}, "options.url uses plaintext http"),
        (
            {"url": "http://models.example.com/m.bin", "sha256": "a" * 64, "headersSecretName": "token"},
            "options.url uses plaintext http",
        ),
        ({"url": "https://a/x/m.bin,https://b/y/m.bin"}, "two URLs whose files are both named m.bin"),
        ({"url": "https://a/m.bin", "sha256": "abc"}, "options.sha256 'abc' is not a hex SHA-256 digest"),
        ({"url": "https://a/m.bin,https://a/n.bin", "sha256": "a" * 64}, "one digest per URL: 1 for 2 URLs"),
        ({"url": "https://a/m.bin", "unpack": "rar"}, "options.unpack must be one of tar, tar.gz, zip, not 'rar'"),
    ],
)
def test_validation_names_the_option(options: dict[str, str], problem: str) -> None:
    config = VolumeConfig.model_validate({"id": "m", "sourceType": "HTTP", "options": options})
    assert any(problem in p for p in HTTPSource().validate(config)), HTTPSource().validate(config)


def test_http_volume_end_to_end(
    api: Any, namespace: str, controller: KvcController, agents: dict[str, KvcAgent], server: FileServer
) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "hub-token"}, "data": {"X-Token": base64.b64encode(b"t0ken").decode()}}
    )
    vms = VolumeManagers(api, namespace)
    vms.create(
        "models",
        [
            {
                "id": "bert",
                "sourceType": "HTTP",
                "replicas": 2,
                "options": {
                    "url": f"{server.url}/models/bert.bin",
                    "sha256": MODEL_SHA,
                    "headersSecretName": "hub-token",
                },
            }
        ],
    )
    volume = vms.wait_state("models", "Running", timeout=120)["status"]["volumes"][0]
    assert volume["replicas"] == {"desired": 2, "ready": 2}
    for node in volume["nodes"]:
        local = agents[node["name"]].local(volume["volumeSource"]["hostPath"]["path"])
        assert (local / "bert.bin").read_bytes() == MODEL
    assert all(r.get("X-Token") == "t0ken" for r in server.requests)
