"""Redirects and SSRF: the HTTP source's redirects, and the networks no fetch may reach
(issue #18, point 1). Every attack is planted against loopback servers."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from certs import pki
from kvc.agent.files import ReplicaDir
from kvc.cli import cli
from kvc.sources import _egress
from kvc.sources._egress import EgressError, EgressPolicy, parse_networks
from kvc.sources._s3http import ObjectGetter
from kvc.sources.base import FetchRequest
from kvc.sources.http import HTTPSource
from kvc.sources.s3 import S3Source
from kvc.sources.transfer import FetchError, Progress
from kvc.testing.fileserver import FileServer
from tests.kvc.sources.loopback import RawServer, loopback_client

DATA = b"model weights\n" * 100
DATA_SHA = hashlib.sha256(DATA).hexdigest()
SECRET = {"Authorization": "Bearer s3cret", "X-Api-Key": "k3y"}
LOOPBACK_BLOCKED = EgressPolicy.from_flags(["127.0.0.0/8"])


class Listener(RawServer):
    """A loopback TCP port that counts the connections made to it and closes them."""

    def __init__(self) -> None:
        self.accepted = 0
        super().__init__()

    def answer(self, connection: socket.socket) -> None:
        self.accepted += 1


@pytest.fixture
def listener() -> Iterator[Listener]:
    running = Listener()
    yield running
    running.close()


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "file.bin").write_bytes(DATA)
    return root


@pytest.fixture
def target(www: Path) -> Iterator[FileServer]:
    """Where redirects lead: another origin (another port) serving the same file."""
    with FileServer(www).running() as running:
        yield running


class EndlessRedirect(RawServer):
    """A loopback server that answers every request with a 302 to ``location`` and a chunked
    body that goes on for ``limit`` bytes (for ever, as far as a client can tell), counting
    the bytes it managed to send before the client hung up."""

    def __init__(self, location: str, limit: int = 64 << 20) -> None:
        self.location, self.limit, self.sent = location, limit, 0
        super().__init__()

    def answer(self, connection: socket.socket) -> None:
        block = 64 << 10
        chunk = b"%x\r\n%s\r\n" % (block, b"x" * block)
        connection.recv(1 << 16)  # the request
        head = f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\nTransfer-Encoding: chunked\r\n\r\n"
        try:
            connection.sendall(head.encode())
            while self.sent < self.limit:
                connection.sendall(chunk)
                self.sent += block
            connection.sendall(b"0\r\n\r\n")
        except OSError:  # the client closed the connection
            pass


class ProxyStandIn:
    """A loopback HTTP proxy that answers every request itself (DATA, with S3's headers) and
    records (method, URL) of each: it resolves nothing, as a proxy of a network without DNS
    for its clients would."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                proxy.requests.append((self.command, self.path))
                self.send_response(200)
                self.send_header("Content-Length", str(len(DATA)))
                self.send_header("ETag", f'"{hashlib.md5(DATA).hexdigest()}"')  # noqa: S324 - S3's ETag
                self.end_headers()

            def do_GET(self) -> None:
                self.do_HEAD()
                self.wfile.write(DATA)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyStandIn]:
    """The stand-in as the environment's proxy for http URLs (urllib's and boto3's)."""
    running = ProxyStandIn()
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", running.url)
    yield running
    running.close()


def fetch(
    options: dict[str, str],
    dest: Path,
    credentials: dict[str, str] | None = None,
    egress: EgressPolicy | None = None,
) -> ReplicaDir:
    replica = ReplicaDir(dest)
    request = FetchRequest(
        options=options,
        credentials=credentials or {},
        replica=replica,
        progress=Progress(),
        stop=threading.Event(),
        egress=egress or EgressPolicy(),
    )
    HTTPSource().fetch(request)
    return replica


# ---------------------------------------------------------------------------- the policy


def test_the_default_policy_blocks_link_local_and_metadata_addresses_in_every_form() -> None:
    policy = EgressPolicy()
    assert [str(n) for n in policy.blocked] == ["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"]
    for address in ("169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254", "fe80::1%2", "fe80::1"):
        assert policy.blocking(address) is not None, address
    for address in ("127.0.0.1", "::1", "10.0.0.1", "fd00:ec2::253", "::ffff:10.0.0.1"):
        assert policy.blocking(address) is None, address
    # A network given in its IPv4-mapped IPv6 form also catches the plain IPv4 address.
    assert EgressPolicy.from_flags(["::ffff:10.0.0.0/104"]).blocking("10.1.2.3") is not None


def test_blocked_networks_are_parsed_from_the_flag_values() -> None:
    assert parse_networks(["none"]) == ()
    assert [str(n) for n in parse_networks(["default", "10.0.0.0/8", "10.0.0.0/8", "192.168.1.1"])] == [
        "169.254.0.0/16",
        "fe80::/10",
        "fd00:ec2::254/128",
        "10.0.0.0/8",
        "192.168.1.1/32",
    ]
    assert [str(n) for n in parse_networks(["169.254.1.1/16"])] == ["169.254.0.0/16"]
    with pytest.raises(ValueError, match=r"--blocked-network '10\.0\.0\.0/33' is not a network: give one in CIDR"):
        parse_networks(["10.0.0.0/33"])
    with pytest.raises(ValueError, match=r"--blocked-network 'metadata' is not a network"):
        parse_networks(["metadata"])
    with pytest.raises(ValueError, match=r"--blocked-network none blocks nothing and cannot be combined"):
        parse_networks(["none", "10.0.0.0/8"])


def test_the_agent_refuses_to_start_with_a_bad_blocked_network() -> None:
    result = CliRunner().invoke(cli, ["run", "agent", "--node", "n", "--blocked-network", "10.0.0.0/33"])
    assert result.exit_code == 2
    assert "--blocked-network '10.0.0.0/33' is not a network" in result.output


# ---------------------------------------------------------------------------- HTTP redirects


def test_credentials_follow_a_redirect_only_within_the_same_origin(
    www: Path, target: FileServer, tmp_path: Path
) -> None:
    redirects = {
        "/same": (302, "/file.bin"),
        "/away": (307, f"{target.url}/file.bin"),  # another port on 127.0.0.1: another origin
    }
    with FileServer(
        www, required_headers={"Authorization": SECRET["Authorization"]}, redirects=redirects
    ).running() as origin:
        # Same origin: the Secret's headers go along (the file is refused without them).
        replica = fetch({"url": f"{origin.url}/same"}, tmp_path / "same", SECRET)
        assert (replica.final / "same").read_bytes() == DATA
        assert origin.requests[-1]["Authorization"] == SECRET["Authorization"]
        assert origin.requests[-1]["X-Api-Key"] == SECRET["X-Api-Key"]

        replica = fetch({"url": f"{origin.url}/away"}, tmp_path / "away", SECRET)
    assert (replica.final / "away").read_bytes() == DATA
    [seen] = target.requests
    assert seen["path"] == "/file.bin"
    assert "Authorization" not in seen
    assert "X-Api-Key" not in seen


def test_a_resumed_download_keeps_its_range_across_origins(www: Path, target: FileServer) -> None:
    with FileServer(www, redirects={"/away": (302, f"{target.url}/file.bin")}).running() as origin:
        headers = {"Cookie": "session=1", "Range": "bytes=100-"}
        request = urllib.request.Request(f"{origin.url}/away", headers=headers)  # noqa: S310 - http
        with _egress.opener(EgressPolicy(), lambda _: None).open(request, timeout=5) as response:
            assert response.status == 206
            assert response.read() == DATA[100:]
    [seen] = target.requests
    assert seen["Range"] == "bytes=100-"
    assert "Cookie" not in seen


def _tls_server(www: Path, tmp_path: Path, redirects: dict[str, tuple[int, str]]) -> FileServer:
    ca = pki.new_ca()
    leaf = pki.new_serving_cert(ca, [], ["127.0.0.1"])
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "tls.pem").write_bytes(leaf.cert_pem + leaf.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.pem")
    return FileServer(www, redirects=redirects, tls=context)


def test_an_https_url_never_redirects_to_plaintext(
    www: Path, target: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pinned and without headers, plain http would be accepted as a first URL: not after https.
    server = _tls_server(www, tmp_path, {"/x.bin": (301, f"{target.url}/file.bin")})
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    with server.running() as origin:
        fetch({"url": f"{origin.url}/file.bin", "sha256": DATA_SHA}, tmp_path / "ok")  # TLS works
        with pytest.raises(
            FetchError,
            match=rf"^https://127\.0\.0\.1:{origin.port}/x\.bin redirected to http://127\.0\.0\.1:{target.port}"
            r"/file\.bin: plaintext redirects are refused",
        ):
            fetch({"url": f"{origin.url}/x.bin", "sha256": DATA_SHA}, tmp_path / "vol")
    assert target.requests == []


@pytest.mark.parametrize(
    ("location", "pinned", "message"),
    [
        # Not pinned (headers are sent): plaintext off this machine is refused, as a first URL would be.
        ("http://kvc-egress-test.invalid/file.bin", False, r"plaintext http is refused for a file without"),
        # urllib's default opener follows ftp: redirects.
        ("ftp://127.0.0.1:{port}/file.bin", True, r"only http and https URLs are followed"),
        ("file:///etc/passwd", True, r"only http and https URLs are followed"),
        ("http://169.254.169.254/latest/meta-data/?token=t0ken", True, r"169\.254\.169\.254 is in the blocked network"),
        ("http://[::ffff:169.254.169.254]/latest/meta-data/", True, r"::ffff:169\.254\.169\.254 is in the blocked"),
        ("http://[fd00:ec2::254]/latest/meta-data/", True, r"fd00:ec2::254 is in the blocked network fd00:ec2::254"),
    ],
    ids=["plaintext-unpinned", "ftp", "file", "metadata", "metadata-v4-mapped", "metadata-v6"],
)
def test_a_redirect_is_refused_before_any_connection_where_the_first_url_would_be(
    www: Path, tmp_path: Path, listener: Listener, location: str, pinned: bool, message: str
) -> None:
    location = location.format(port=listener.port)
    with FileServer(www, redirects={"/x.bin": (302, location)}).running() as origin:
        options = {"url": f"{origin.url}/x.bin"} | ({"sha256": DATA_SHA} if pinned else {})
        started = time.monotonic()
        with pytest.raises(FetchError, match=rf"^{origin.url}/x\.bin redirected to .*: {message}") as raised:
            fetch(options, tmp_path / "vol", None if pinned else SECRET)
    assert time.monotonic() - started < 3  # refused, not tried and retried
    assert "t0ken" not in str(raised.value)
    assert listener.accepted == 0
    assert not ReplicaDir(tmp_path / "vol").complete


def test_a_blocked_address_names_the_flag_that_sets_it(www: Path, tmp_path: Path) -> None:
    metadata = {"/x.bin": (302, "http://169.254.169.254/latest/meta-data/")}
    with FileServer(www, redirects=metadata).running() as origin, pytest.raises(FetchError) as raised:
        fetch({"url": f"{origin.url}/x.bin", "sha256": DATA_SHA}, tmp_path / "vol")
    assert str(raised.value) == (
        f"{origin.url}/x.bin redirected to http://169.254.169.254/latest/meta-data/: 169.254.169.254 is in the "
        "blocked network 169.254.0.0/16: agents connect there only if an admin changes their --blocked-network "
        "setting"
    )


def test_a_first_url_in_a_blocked_network_is_never_contacted(listener: Listener, tmp_path: Path) -> None:
    with pytest.raises(
        FetchError,
        match=rf"^http://127\.0\.0\.1:{listener.port}/file\.bin: 127\.0\.0\.1 is in the blocked network 127\.0\.0\.0/8"
        r": agents connect there only if an admin changes their --blocked-network setting$",
    ):
        fetch({"url": f"http://127.0.0.1:{listener.port}/file.bin"}, tmp_path / "vol", egress=LOOPBACK_BLOCKED)
    assert listener.accepted == 0


def test_through_a_proxy_the_url_s_own_host_is_checked(
    listener: Listener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{listener.port}")
    with pytest.raises(FetchError, match=r"^http://169\.254\.169\.254/latest/meta-data/x: 169\.254\.169\.254 is in"):
        fetch({"url": "http://169.254.169.254/latest/meta-data/x", "sha256": DATA_SHA}, tmp_path / "vol")
    assert listener.accepted == 0  # the proxy was never asked


def test_through_a_proxy_a_name_only_the_proxy_resolves_is_fetched(proxy: ProxyStandIn, tmp_path: Path) -> None:
    # Where only the proxy resolves names, the URL's host not resolving here is no reason to refuse.
    options = {"url": "http://nonexistent.invalid/file.bin", "sha256": DATA_SHA, "timeoutForDataDownload": "1s"}
    replica = fetch(options, tmp_path / "vol")
    assert (replica.final / "file.bin").read_bytes() == DATA
    assert proxy.requests == [("GET", "http://nonexistent.invalid/file.bin")]


def test_a_name_resolving_into_a_blocked_network_is_refused(listener: Listener) -> None:
    with pytest.raises(EgressError, match=r"^localhost resolves to (127\.0\.0\.1|::1), which is in the blocked"):
        EgressPolicy.from_flags(["127.0.0.0/8", "::1"]).connect("localhost", listener.port, 1)
    assert listener.accepted == 0


def _chain(hops: int, target: FileServer) -> dict[str, tuple[int, str]]:
    """/r0 -> /r1 -> ... -> the target's file: ``hops`` redirects in all."""
    redirects = {f"/r{i}": (302 if i % 2 else 308, f"/r{i + 1}") for i in range(hops - 1)}
    redirects[f"/r{hops - 1}"] = (303, f"{target.url}/file.bin")
    return redirects


def test_at_most_five_redirects_are_followed(www: Path, target: FileServer, tmp_path: Path) -> None:
    with FileServer(www, redirects=_chain(5, target)).running() as origin:
        replica = fetch({"url": f"{origin.url}/r0"}, tmp_path / "five")
        assert (replica.final / "r0").read_bytes() == DATA
    with (
        FileServer(www, redirects=_chain(6, target)).running() as origin,
        pytest.raises(
            FetchError, match=rf"^{origin.url}/r5 redirected to {target.url}/file\.bin: more than 5 redirects in a row"
        ),
    ):
        fetch({"url": f"{origin.url}/r0"}, tmp_path / "six")
    assert len(target.requests) == 1  # the five-hop fetch's


def test_a_redirect_s_body_is_never_read(target: FileServer, tmp_path: Path) -> None:
    # urllib reads a redirect's whole body before following it: an endless one until memory runs out.
    origin = EndlessRedirect(f"{target.url}/file.bin")
    try:
        replica = fetch({"url": f"{origin.url}/x.bin"}, tmp_path / "vol")
    finally:
        origin.close()
    assert (replica.final / "x.bin").read_bytes() == DATA
    # What loopback's socket buffers took before the client hung up, not the 64 MiB on offer.
    assert origin.sent < 16 << 20


# ---------------------------------------------------------------------------- S3 endpoints


def test_an_s3_endpoint_in_a_blocked_network_fails_naming_the_flag(listener: Listener, tmp_path: Path) -> None:
    request = FetchRequest(
        options={"sourceURL": "s3://bucket/data/", "endpointURL": f"http://127.0.0.1:{listener.port}"},
        credentials={"awsAccessKeyID": "a", "awsSecretAccessKey": "b"},
        replica=ReplicaDir(tmp_path / "vol"),
        progress=Progress(),
        stop=threading.Event(),
        egress=LOOPBACK_BLOCKED,
    )
    with pytest.raises(
        FetchError,
        match=rf"^the S3 endpoint http://127\.0\.0\.1:{listener.port}: 127\.0\.0\.1 is in the blocked network "
        r"127\.0\.0\.0/8: agents connect there only if an admin changes their --blocked-network setting$",
    ):
        S3Source().fetch(request)
    assert listener.accepted == 0


def test_the_direct_s3_path_connects_only_to_checked_addresses(listener: Listener) -> None:
    client = loopback_client(f"http://127.0.0.1:{listener.port}")
    getter = ObjectGetter(client, "bucket", egress=LOOPBACK_BLOCKED)

    async def get() -> None:
        async for _ in getter.get("k"):
            pass

    with pytest.raises(EgressError, match=r"127\.0\.0\.1 is in the blocked network 127\.0\.0\.0/8"):
        asyncio.run(get())
    with pytest.raises(EgressError, match=r"127\.0\.0\.1 is in the blocked network"):
        getter.list("p/", lambda *item: item, 10)
    with pytest.raises(EgressError, match=r"127\.0\.0\.1 is in the blocked network"):
        getter.copy_into("k", 0, lambda _: None)
    assert listener.accepted == 0


def _s3_fetch(options: dict[str, str], dest: Path, egress: EgressPolicy | None = None) -> ReplicaDir:
    replica = ReplicaDir(dest)
    request = FetchRequest(
        options=options,
        credentials={"awsAccessKeyID": "a", "awsSecretAccessKey": "b"},
        replica=replica,
        progress=Progress(),
        stop=threading.Event(),
        egress=egress or EgressPolicy(),
    )
    S3Source().fetch(request)
    return replica


def test_through_a_proxy_an_s3_endpoint_only_the_proxy_resolves_is_fetched(proxy: ProxyStandIn, tmp_path: Path) -> None:
    options = {"sourceURL": "s3://bucket/data/file.bin", "endpointURL": "http://s3.nonexistent.invalid"}
    replica = _s3_fetch(options, tmp_path / "vol")
    assert (replica.final / "file.bin").read_bytes() == DATA
    assert [method for method, _ in proxy.requests] == ["HEAD", "GET"]
    assert all((urlsplit(url).hostname or "").endswith("s3.nonexistent.invalid") for _, url in proxy.requests)
    # A literal address is still checked, proxy or not.
    with pytest.raises(FetchError, match=r"^the S3 endpoint http://169\.254\.169\.254: 169\.254\.169\.254 is in"):
        _s3_fetch(options | {"endpointURL": "http://169.254.169.254"}, tmp_path / "metadata")
    assert len(proxy.requests) == 2


def test_the_head_of_one_s3_object_connects_only_to_a_checked_address(
    listener: Listener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DNS rebinding: the endpoint's name resolves to an allowed address when S3Source checks
    # it, and to the blocked 127.0.0.1 (where the listener is) ever after.
    real = socket.getaddrinfo
    answers = iter(["127.0.0.2"])

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith("rebind.kvc-test"):
            address = next(answers, "127.0.0.1")
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    options = {"sourceURL": "s3://bucket/file.bin", "endpointURL": f"http://rebind.kvc-test:{listener.port}"}
    with pytest.raises(EgressError, match=r"rebind\.kvc-test resolves to 127\.0\.0\.1, which is in the blocked"):
        _s3_fetch(options, tmp_path / "vol", EgressPolicy.from_flags(["127.0.0.1/32"]))
    assert listener.accepted == 0
