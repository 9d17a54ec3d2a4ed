"""Where an agent may connect when it fetches from URLs that users chose.

Users name the hosts an agent reads from (``options.url``, ``options.endpointURL``), and
agents run on every node, where link-local addresses reach the cloud's instance metadata
service (the node's credentials) and similar services. ``EgressPolicy`` names the
networks no fetch may reach (the agent's ``--blocked-network``). ``EgressPolicy.connect``
resolves a host, checks every address, and connects to an address it checked, never to
the name: a name that resolves elsewhere between check and connect (DNS rebinding)
gains nothing. ``opener`` makes the urllib opener of the HTTP source: its connections
are checked, and it follows a redirect only after the checks of the first URL, never
from https to http, and without the request's credentials once the origin changes.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from kvc.sources.transfer import FetchError

FLAG = "--blocked-network"
# Link-local (169.254.169.254 serves instance metadata on AWS, GCP, Azure and others, and
# fe80::/10 its IPv6 kin) and the IPv6 address of AWS's metadata service.
DEFAULT_BLOCKED = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
MAX_REDIRECTS = 5
# The only request header that follows a redirect to another origin: every other one may
# come from the user's header Secret (Authorization, Cookie, API keys).
_CROSS_ORIGIN_HEADERS = frozenset({"range"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


class EgressError(FetchError):
    """A connection the policy refuses; the message names the address, the network and the flag."""


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """The networks that ``--blocked-network`` values name.

    Each value is a network in CIDR notation or one address; ``default`` stands for
    DEFAULT_BLOCKED and ``none`` (alone) for no network at all. Raises ValueError naming
    the value to fix.
    """
    given = [value.strip() for value in values]
    if "none" in given:
        if len(given) > 1:
            raise ValueError(f"{FLAG} none blocks nothing and cannot be combined with networks: {', '.join(given)}")
        return ()
    networks: list[Network] = []
    for value in given:
        if value == "default":
            networks += [ipaddress.ip_network(network) for network in DEFAULT_BLOCKED]
            continue
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(
                f"{FLAG} {value!r} is not a network: give one in CIDR notation such as 169.254.0.0/16 or "
                "fd00:ec2::254/128, an address, 'default' or 'none'"
            ) from None
    return tuple(dict.fromkeys(networks))


@dataclass(frozen=True)
class EgressPolicy:
    """The networks agents never connect to for a fetch."""

    blocked: tuple[Network, ...] = parse_networks(DEFAULT_BLOCKED)

    @classmethod
    def from_flags(cls, values: Iterable[str]) -> EgressPolicy:
        """The policy of ``--blocked-network`` values (see parse_networks); ValueError if one is wrong."""
        return cls(parse_networks(values))

    def blocking(self, address: str) -> Network | None:
        """The blocked network ``address`` falls in, or None.

        An IPv4 address is also its IPv4-mapped IPv6 form (``::ffff:169.254.169.254``
        reaches 169.254.169.254 from a dual-stack socket), and the other way round.
        """
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            forms.append(ip.ipv4_mapped)
        elif isinstance(ip, ipaddress.IPv4Address):
            forms.append(ipaddress.IPv6Address(f"::ffff:{ip}"))
        for network in self.blocked:
            if any(form.version == network.version and form in network for form in forms):
                return network
        return None

    def resolve(self, host: str, port: int) -> list[_AddrInfo]:
        """Every address of ``host``: raises EgressError when any of them is in a blocked network.

        A name with one blocked address is refused as a whole, whatever its others are.
        Resolution failures raise OSError (``socket.gaierror``) as they would on connecting.
        """
        infos: list[_AddrInfo] = list(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        for *_, sockaddr in infos:
            address = str(sockaddr[0])
            network = self.blocking(address)
            if network is not None:
                what = address if _same_address(host, address) else f"{host} resolves to {address}, which"
                raise EgressError(
                    f"{what} is in the blocked network {network}: agents connect there only if an admin "
                    f"changes their {FLAG} setting"
                )
        return infos

    def check_url(self, url: str) -> None:
        """Raise EgressError if the host of ``url`` resolves into a blocked network (see resolve)."""
        parts = urlsplit(url)
        self.resolve(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))

    def connect(
        self, host: str, port: int, timeout: object = None, source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        """A connected socket to ``host``, made to one of the addresses resolve checked.

        ``timeout``: seconds, None (blocking) or anything else for the default timeout,
        as ``socket.create_connection`` takes it.
        """
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in self.resolve(host, port):
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is None or isinstance(timeout, int | float):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            return sock
        raise error or OSError(f"{host} has no address")


def _same_address(host: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) == ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False


class CheckedHTTPConnection(http.client.HTTPConnection):
    """An http.client connection made by ``EgressPolicy.connect`` (to a proxy, if it goes through one)."""

    def __init__(self, *args: Any, policy: EgressPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # http.client connects through this attribute (HTTPSConnection too, before its TLS handshake).
        self._create_connection = _checked_connect(policy or EgressPolicy())


class CheckedHTTPSConnection(http.client.HTTPSConnection):
    """An https connection made by ``EgressPolicy.connect``; the certificate is checked against the host name."""

    def __init__(self, *args: Any, policy: EgressPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _checked_connect(policy or EgressPolicy())


def _checked_connect(policy: EgressPolicy) -> Callable[..., socket.socket]:
    def create_connection(
        address: tuple[str, int], timeout: object = None, source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        return policy.connect(address[0], address[1], timeout, source_address)

    return create_connection


def redact(url: str) -> str:
    """The URL without user:password or query string, which may carry credentials."""
    parsed = urlsplit(url)
    host = parsed.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parsed.port}" if parsed.port else ""
    except ValueError:
        port = ""
    return f"{parsed.scheme}://{host}{port}{parsed.path}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port or {"http": 80, "https": 443}.get(parts.scheme)


class _Request(urllib.request.Request):
    """A request made by following ``hops`` redirects."""

    hops = 0


class _TargetChecked:
    """Through a proxy, the connection's address is the proxy's: the URL's host is checked before."""

    policy: EgressPolicy

    def check_target(self, req: urllib.request.Request) -> None:
        target = urlsplit(req.full_url)
        if target.netloc != req.host:  # the proxy resolves the name itself: this check is the best there is
            self.policy.check_url(req.full_url)


class _HTTPHandler(_TargetChecked, urllib.request.HTTPHandler):
    def __init__(self, policy: EgressPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        self.check_target(req)
        return self.do_open(CheckedHTTPConnection, req, policy=self.policy)


class _HTTPSHandler(_TargetChecked, urllib.request.HTTPSHandler):
    def __init__(self, policy: EgressPolicy) -> None:
        super().__init__()
        self.policy = policy

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        self.check_target(req)
        return self.do_open(CheckedHTTPSConnection, req, policy=self.policy)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    # Ours refuse first, with a message: more hops than MAX_REDIRECTS.
    max_repeats = max_redirections = MAX_REDIRECTS + 1

    def __init__(self, policy: EgressPolicy, refusal: Callable[[str], str | None]) -> None:
        self._policy, self._refusal = policy, refusal

    def _refuse(self, req: urllib.request.Request, fp: IO[bytes], newurl: str, why: str) -> FetchError:
        fp.close()
        return FetchError(f"{redact(req.full_url)} redirected to {redact(newurl)}: {why}")

    def http_error_302(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: http.client.HTTPMessage
    ) -> Any:
        # urllib refuses schemes other than http, https and ftp with an HTTPError naming the whole URL.
        location = headers.get("location") or headers.get("uri") or ""
        if urlsplit(location).scheme not in ("http", "https", ""):
            raise self._refuse(req, fp, location, "only http and https URLs are followed")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        hops = (req.hops if isinstance(req, _Request) else 0) + 1
        if hops > MAX_REDIRECTS:
            raise self._refuse(req, fp, newurl, f"more than {MAX_REDIRECTS} redirects in a row are refused")
        try:
            _origin(newurl)
        except ValueError:  # a port that is not a number
            raise self._refuse(req, fp, newurl, "not a valid URL") from None
        old_scheme, new_scheme = urlsplit(req.full_url).scheme, urlsplit(newurl).scheme
        if old_scheme == "https" and new_scheme == "http":
            raise self._refuse(req, fp, newurl, "plaintext redirects are refused (https must stay https)")
        why = self._refusal(newurl)
        if why is not None:
            raise self._refuse(req, fp, newurl, why)
        try:
            self._policy.check_url(newurl)
        except EgressError as exc:
            raise self._refuse(req, fp, newurl, str(exc)) from None
        same_origin = _origin(newurl) == _origin(req.full_url)
        kept = {
            name: value for name, value in req.headers.items() if same_origin or name.lower() in _CROSS_ORIGIN_HEADERS
        }
        new = _Request(newurl, headers=kept, origin_req_host=req.origin_req_host, unverifiable=True)
        new.hops = hops
        return new


def opener(policy: EgressPolicy, refusal: Callable[[str], str | None]) -> urllib.request.OpenerDirector:
    """A urllib opener for URLs users gave: http and https only (no file:, ftp: or data:), every
    connection checked by ``policy``, environment proxies as urllib honours them.

    A redirect is followed only to a URL for which ``refusal`` (the rules the first URL
    passed; it returns why a URL is refused, or None) and ``policy`` find nothing wrong,
    never from https to http, at most MAX_REDIRECTS in a row; when the origin (scheme,
    host, port) changes, the request's headers other than Range stay behind. A refused
    redirect raises FetchError saying where it led and why.
    """
    director = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _HTTPHandler(policy),
        _HTTPSHandler(policy),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(policy, refusal),
        urllib.request.HTTPErrorProcessor(),
    ):
        director.add_handler(handler)
    return director
