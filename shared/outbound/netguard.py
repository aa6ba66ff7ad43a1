"""The SSRF guard for every URL a user gives us (images, webhooks): which URLs and addresses may be reached.

Two layers. `check_url` is the cheap check at submit time (the URL's shape, the host lists, one DNS lookup).
`guarded_client` is an httpx client whose every connection, every redirect hop included, goes through
`GuardedBackend`: an httpcore network backend that resolves the host once, refuses the connection unless every
address is allowed, and connects to the very address it checked, so that a DNS answer that changes between the
check and the connection (DNS rebinding) cannot reach an internal address. TLS is started by httpcore on that
socket with the URL's host name, so the certificate is still verified against the name (SNI). We use httpx for
what it does well (HTTP/1.1, TLS, redirects, streaming, timeouts) and add only the address policy.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Iterable

import certifi
import httpcore
import httpx

from shared.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

# NAT64 (RFC 6052) embeds an IPv4 address in its last 32 bits; what it reaches is that IPv4 address.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# A host name whose last label is a number is an IPv4 address to URL parsers (WHATWG), whatever it looks like.
NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CANONICAL_IPV4 = re.compile(rf"^{OCTET}(\.{OCTET}){{3}}$")


class UrlRefused(Exception):
    """The URL itself is unacceptable: its scheme, its form, or its host by the host lists."""


class ForbiddenAddress(UrlRefused):
    """The URL's host is, or resolves to, an address that may not be reached (loopback, private, ...)."""


class HostNotFound(UrlRefused):
    """The URL's host name does not resolve."""


def check_url(url: str, settings: Settings, resolve: Resolver | None = None) -> None:
    """Refuse a URL that the guarded client would refuse: its shape and host lists, then its addresses (one
    DNS lookup). Raises UrlRefused, ForbiddenAddress or HostNotFound."""
    parsed = parse_url(url, settings)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    check_addresses(parsed.host, (resolve or resolve_host)(parsed.host, port), settings)


def parse_url(url: str, settings: Settings) -> httpx.URL:
    """The URL parsed and checked for scheme, credentials, odd IPv4 spellings and the host lists (no DNS)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UrlRefused("the URL cannot be parsed") from exc
    check_parsed(parsed, settings)
    return parsed


def check_parsed(url: httpx.URL, settings: Settings) -> None:
    """The checks of parse_url on a parsed URL (also run on every redirect hop)."""
    allowed = {"https", "http"} if settings.allow_http else {"https"}
    if url.scheme not in allowed:
        raise UrlRefused(f"URL scheme must be {' or '.join(sorted(allowed))}, not {url.scheme or 'none'!r}")
    if not url.host:
        raise UrlRefused("the URL has no host")
    if url.userinfo:
        raise UrlRefused("credentials in URLs are not accepted")
    host = url.host.lower().rstrip(".")
    check_ip_spelling(host)
    if settings.url_allow_hosts and not _listed(host, settings.url_allow_hosts):
        raise UrlRefused(f"host {host} is not in the allowed hosts")
    if _listed(host, settings.url_deny_hosts):
        raise UrlRefused(f"host {host} is denied")


def check_ip_spelling(host: str) -> None:
    """Refuse IPv4 addresses written other than as four plain decimals (2130706433, 0x7f.1, 0177.0.0.1, 127.1):
    resolvers read them as addresses, and lists of names or addresses would not recognise them."""
    if ":" in host:  # IPv6 literal, already parsed by httpx
        return
    last = host.rsplit(".", 1)[-1]
    if NUMERIC_LABEL.match(last) and not CANONICAL_IPV4.match(host):
        raise UrlRefused(f"host {host} is an IPv4 address in an unusual spelling; write it as a.b.c.d")


def _listed(host: str, entries: Iterable[str]) -> bool:
    """Whether the host is one of the entries or a subdomain of one."""
    return any(host == entry or host.endswith("." + entry) for entry in entries)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address the host name resolves to (an address literal resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostNotFound(f"host {host} does not resolve") from exc
    return list(dict.fromkeys(info[4][0] for info in infos))


def check_addresses(host: str, addresses: list[str], settings: Settings) -> list[IPAddress]:
    """The addresses, parsed, if every one may be reached; else ForbiddenAddress. One bad address refuses the
    host: a name that also points inside must not be reachable by chance of which address is tried."""
    if not addresses:
        raise HostNotFound(f"host {host} has no address")
    parsed = [ipaddress.ip_address(address.split("%", 1)[0]) for address in addresses]
    for address in parsed:
        reason = refusal_reason(address, settings)
        if reason:
            raise ForbiddenAddress(f"host {host} resolves to {reason} address {address}")
    return parsed


def refusal_reason(address: IPAddress, settings: Settings) -> str | None:
    """Why the address may not be reached ("loopback", "private", ...), or None when it may."""
    if any(address in ipaddress.ip_network(cidr, strict=False) for cidr in settings.url_allowed_networks):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6"
        embedded = address.sixtofour or (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64
                                         else None)
        if embedded is not None:
            inner = refusal_reason(embedded, settings)
            return f"an IPv6 address embedding a {inner}" if inner else None
    return _address_class(address)


def _address_class(address: IPAddress) -> str | None:
    checks = (("a loopback", address.is_loopback), ("an unspecified", address.is_unspecified),
              ("a link-local", address.is_link_local), ("a multicast", address.is_multicast),
              ("a private", address.is_private), ("a reserved", address.is_reserved),
              ("a non-global", not address.is_global))
    return next((name for name, hit in checks if hit), None)


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, with the address policy between the DNS lookup and the connection."""

    def __init__(self, settings: Settings, resolve: Resolver | None = None):
        self.settings = settings
        self.resolve = resolve or resolve_host

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable | None = None) -> httpcore.NetworkStream:
        addresses = check_addresses(host, self.resolve(host, port), self.settings)
        last_error: Exception | None = None
        for address in addresses:  # all were checked; try them in the resolver's order
            try:
                return super().connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        raise last_error  # type: ignore[misc]  # addresses is never empty

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Iterable | None = None):
        raise UrlRefused("unix sockets are not reachable through the guarded client")


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport on a connection pool that opens its connections through GuardedBackend."""

    def __init__(self, settings: Settings, resolve: Resolver | None = None, ssl_context: ssl.SSLContext | None = None,
                 max_connections: int = 32):
        super().__init__(trust_env=False)
        # httpx has no public way to give its pool a network backend, so the pool is replaced (httpx is pinned
        # below 0.29; tests/unit/test_netguard.py fails if a request stops going through the guard).
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context or ssl.create_default_context(cafile=certifi.where()),
            max_connections=max_connections,
            max_keepalive_connections=max_connections // 2,
            network_backend=GuardedBackend(settings, resolve),
        )


def guarded_client(settings: Settings, resolve: Resolver | None = None,
                   ssl_context: ssl.SSLContext | None = None) -> httpx.Client:
    """An httpx client that reaches only allowed hosts and addresses, checked again on every redirect hop and
    every new connection. Thread-safe; one per process is enough. Follows at most settings.url_max_redirects
    redirects (pass follow_redirects=False to a request to follow none). `resolve` replaces DNS in tests;
    `ssl_context` replaces the certifi CA bundle (a private CA, tests)."""
    timeout = httpx.Timeout(settings.url_read_timeout_s, connect=settings.url_connect_timeout_s)
    return httpx.Client(
        transport=GuardedTransport(settings, resolve, ssl_context),
        timeout=timeout,
        follow_redirects=True,
        max_redirects=settings.url_max_redirects,
        trust_env=False,  # a proxy from the environment would do the DNS lookup and connection for us, unchecked
        event_hooks={"request": [lambda request: check_parsed(request.url, settings)]},
    )
