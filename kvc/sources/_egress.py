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
Through a proxy, the agent connects to the proxy (checked as any address); the URL's
host is checked beforehand where this machine can resolve it, the proxy resolves it.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import string
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

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

    def check_url(self, url: str, *, proxied: bool | None = None) -> None:
        """Raise EgressError if the host of ``url`` resolves into a blocked network (see resolve).

        When the request goes through a proxy (``proxied``; None: as the environment's
        proxy settings say, see through_proxy), a name this machine cannot resolve passes:
        the proxy resolves it, and the connection made is to the proxy, whose address is
        checked then. A literal address, or a name that does resolve here, is still checked.
        """
        parts = urlsplit(url)
        try:
            self.resolve(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        except socket.gaierror:
            if not (through_proxy(url) if proxied is None else proxied):
                raise

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


def through_proxy(url: str) -> bool:
    """Whether urllib (and botocore, which reads the same settings) sends a request for ``url``
    through a proxy of the environment (``http_proxy``, ``https_proxy``, ``no_proxy``...)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # as urllib.request.Request.host, without credentials
    return parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)


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
    """Through a proxy, the connection's address is the proxy's: the URL's host is checked before
    (a name only the proxy can resolve passes; see EgressPolicy.check_url)."""

    policy: EgressPolicy

    def check_target(self, req: urllib.request.Request) -> None:
        target = urlsplit(req.full_url)
        if target.netloc != req.host:  # the proxy resolves the name itself: this check is the best there is
            self.policy.check_url(req.full_url, proxied=True)


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
    def __init__(self, policy: EgressPolicy, refusal: Callable[[str], str | None]) -> None:
        self._policy, self._refusal = policy, refusal

    def _refuse(self, req: urllib.request.Request, fp: IO[bytes], newurl: str, why: str) -> FetchError:
        fp.close()
        return FetchError(f"{redact(req.full_url)} redirected to {redact(newurl)}: {why}")

    def http_error_302(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: http.client.HTTPMessage
    ) -> Any:
        # urllib's own reads the redirect's whole body before following it, however long (or
        # endless) the server makes it: this one closes it unread. Its loop detection is
        # redirect_request's count of hops.
        if "location" not in headers and "uri" not in headers:
            return None  # not a redirect after all: the answer stands (an HTTPError)
        location = headers.get("location") or headers.get("uri") or ""
        # urllib refuses schemes other than http, https and ftp with an HTTPError naming the whole URL.
        if urlsplit(location).scheme not in ("http", "https", ""):
            raise self._refuse(req, fp, location, "only http and https URLs are followed")
        parts = urlsplit(location)
        if not parts.path and parts.netloc:
            parts = parts._replace(path="/")
        # As urllib: header bytes came decoded as ISO-8859-1; non-ASCII and spaces are percent-encoded.
        newurl = urljoin(req.full_url, quote(urlunsplit(parts), encoding="iso-8859-1", safe=string.punctuation))
        new = self.redirect_request(req, fp, code, msg, headers, newurl)
        fp.close()
        return self.parent.open(new, timeout=req.timeout)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request:
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
