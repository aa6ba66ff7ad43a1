"""The SSRF guard: refused address classes and spellings, host lists, and the guarded client against a real local
HTTP server (every connection and redirect hop checked, the checked address is the one connected to)."""

from __future__ import annotations

import httpx
import pytest

from shared.config import Settings
from shared.outbound.netguard import ForbiddenAddress, HostNotFound, UrlRefused, check_url, guarded_client
from tests.http_server import NETWORK, LocalHttpServer, Route
from tests.tls import make_tls

DEFAULT = Settings()
HTTP = Settings(allow_http=True)  # http allowed, so that only the address rule refuses the local server
SERVER_OK = Settings(allow_http=True, url_allowed_networks=[NETWORK])  # the test server's own address only


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.255.0.9",  # loopback
    "10.0.0.1", "172.16.5.4", "192.168.1.1",  # private
    "169.254.169.254", "169.254.0.1",  # link-local, cloud metadata
    "100.64.0.1", "100.127.255.254",  # CGNAT
    "224.0.0.1", "239.255.255.250",  # multicast
    "240.0.0.1", "255.255.255.255", "0.0.0.0", "198.18.0.1", "192.0.2.1",  # reserved, broadcast, unspecified, ...
    "[::1]", "[::]",  # IPv6 loopback, unspecified
    "[fd00::1]", "[fc00::5]",  # IPv6 unique-local
    "[fe80::1]",  # IPv6 link-local
    "[ff02::1]",  # IPv6 multicast
    "[::ffff:127.0.0.1]", "[::ffff:8.8.8.8]",  # IPv4-mapped IPv6: always refused
    "[2002:7f00:1::]",  # 6to4 around 127.0.0.1
    "[64:ff9b::a00:1]",  # NAT64 around 10.0.0.1
])
def test_non_global_addresses_are_forbidden(host):
    with pytest.raises(ForbiddenAddress, match="resolves to"):
        check_url(f"https://{host}/a.png", DEFAULT)


@pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "[2606:4700:4700::1111]", "[64:ff9b::808:808]"])
def test_global_addresses_pass(host):
    check_url(f"https://{host}/a.png", DEFAULT)


@pytest.mark.parametrize("host", [
    "2130706433",  # 127.0.0.1 as one decimal number
    "0x7f000001", "0x7f.1",  # hex
    "0177.0.0.1",  # octal
    "127.1",  # short form
    "127.0.0.01",  # a leading zero
    "1.2.3.4.5",
])
def test_odd_ipv4_spellings_are_refused_before_any_lookup(host):
    with pytest.raises(UrlRefused, match="unusual spelling|cannot be parsed") as info:
        check_url(f"https://{host}/a.png", DEFAULT)
    assert not isinstance(info.value, ForbiddenAddress)


def test_a_name_resolving_to_loopback_is_forbidden():
    with pytest.raises(ForbiddenAddress, match="localhost"):
        check_url("https://localhost/a.png", DEFAULT)


@pytest.mark.parametrize(("url", "settings", "reason"), [
    ("http://8.8.8.8/a.png", DEFAULT, "scheme must be https"),
    ("ftp://8.8.8.8/a.png", HTTP, "scheme must be http or https"),
    ("file:///etc/passwd", HTTP, "scheme"),
    ("https://user:secret@8.8.8.8/a.png", DEFAULT, "credentials"),
    ("https:///a.png", DEFAULT, "no host"),
    ("https://[::1/a.png", DEFAULT, "cannot be parsed"),
])
def test_unacceptable_urls_are_refused(url, settings, reason):
    with pytest.raises(UrlRefused, match=reason) as info:
        check_url(url, settings)
    assert "secret" not in str(info.value)


def test_host_lists():
    public = {"img.example.com": ["93.184.216.34"], "evil.example.org": ["93.184.216.35"]}.__getitem__
    only_example = Settings(url_allow_hosts=["Example.com"])
    check_url("https://img.example.com/a.png", only_example, lambda host, port: public(host))
    with pytest.raises(UrlRefused, match="not in the allowed hosts"):
        check_url("https://evil.example.org/a.png", only_example, lambda host, port: public(host))
    with pytest.raises(UrlRefused, match="denied"):
        check_url("https://img.example.com/a.png", Settings(url_deny_hosts=["example.com"]))


def test_an_unknown_host_is_refused_as_not_found():
    with pytest.raises(HostNotFound):
        check_url("https://no-such-host.invalid/a.png", DEFAULT)


def test_allowed_networks_exempt_their_addresses_only():
    check_url("http://127.0.0.5:8080/a.png", SERVER_OK)
    for other in ("127.0.0.1", "10.0.0.1"):
        with pytest.raises(ForbiddenAddress):
            check_url(f"http://{other}/a.png", SERVER_OK)


def test_a_bad_cidr_stops_the_settings():
    with pytest.raises(ValueError):
        Settings(url_allowed_networks=["127.0.0.0/33"])


# --- the guarded client against a real server on 127.0.0.5 ---------------------------------------------------


@pytest.fixture
def served(http_server) -> str:
    return http_server.add("/guard/ok.txt", Route(b"hello", "text/plain"))


def test_the_local_server_is_refused_by_default_and_reached_when_its_network_is_allowed(served):
    with guarded_client(HTTP) as client, pytest.raises(ForbiddenAddress):
        client.get(served)
    with guarded_client(SERVER_OK) as client:
        assert client.get(served).content == b"hello"


def test_a_name_resolving_to_loopback_is_refused_by_the_client(http_server, served):
    with guarded_client(HTTP) as client, pytest.raises(ForbiddenAddress, match="localhost"):
        client.get(http_server.url("/guard/ok.txt", host="localhost"))


@pytest.mark.parametrize(("target", "error"), [
    ("http://127.0.0.1/", ForbiddenAddress),
    ("http://169.254.169.254/latest/meta-data/", ForbiddenAddress),
    ("http://10.1.2.3/", ForbiddenAddress),
    ("http://[::1]/", ForbiddenAddress),
    ("http://[fd12:3456::1]/", ForbiddenAddress),
    ("http://2130706433/", UrlRefused),
    ("http://0x7f.1/", UrlRefused),
    ("ftp://8.8.8.8/", UrlRefused),
])
def test_every_redirect_hop_is_checked_again(http_server, target, error):
    start = http_server.redirect(f"/guard/redirect/{abs(hash(target))}", target)
    with guarded_client(SERVER_OK) as client, pytest.raises(error):
        client.get(start)


def test_an_allowed_redirect_is_followed(http_server, served):
    start = http_server.redirect("/guard/hop", served)
    with guarded_client(SERVER_OK) as client:
        assert client.get(start).content == b"hello"


def test_redirects_are_bounded(http_server):
    http_server.redirect("/guard/loop", http_server.url("/guard/loop"))
    with guarded_client(SERVER_OK) as client, pytest.raises(httpx.TooManyRedirects):
        client.get(http_server.url("/guard/loop"))


def test_the_client_connects_to_the_address_it_checked(http_server, served):
    """No second lookup: the name is known only to the guard's resolver, so the connection can only have gone to
    the address the guard resolved and checked, and the resolver is asked once."""
    lookups: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return [http_server.host]

    with guarded_client(SERVER_OK, resolve=resolve) as client:
        response = client.get(http_server.url("/guard/ok.txt", host="images.rebind.test"))
    assert response.content == b"hello" and lookups == ["images.rebind.test"]


def test_one_forbidden_address_among_several_refuses_the_host(http_server):
    def resolve(host: str, port: int) -> list[str]:
        return [http_server.host, "10.0.0.7"]

    with guarded_client(SERVER_OK, resolve=resolve) as client, pytest.raises(ForbiddenAddress, match="10.0.0.7"):
        client.get(http_server.url("/guard/ok.txt", host="mixed.test"))


# --- TLS on the checked address ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https server on 127.0.0.5 whose certificate names images.test, and a client context trusting its CA."""
    server_context, client_context = make_tls(tmp_path_factory.mktemp("tls"), "images.test")
    with LocalHttpServer(tls=server_context) as server:
        server.add("/tls/ok.txt", Route(b"over tls", "text/plain"))
        yield server, client_context


def to_server(host: str, port: int) -> list[str]:
    return ["127.0.0.5"]  # every name is the test server here: DNS stands in for what the internet would say


def test_tls_connects_to_the_checked_address_and_verifies_the_url_host(tls_server):
    server, client_context = tls_server
    settings = Settings(url_allowed_networks=[NETWORK])
    with guarded_client(settings, resolve=to_server, ssl_context=client_context) as client:
        assert client.get(server.url("/tls/ok.txt", host="images.test")).content == b"over tls"
        with pytest.raises(httpx.ConnectError, match="certificate"):  # the name is checked, not the address
            client.get(server.url("/tls/ok.txt", host="other.test"))


def test_a_redirect_from_https_to_http_is_refused_unless_http_is_allowed(tls_server, http_server):
    server, client_context = tls_server
    server.redirect("/tls/downgrade", http_server.url("/guard/ok.txt"))
    settings = Settings(url_allowed_networks=[NETWORK])
    with guarded_client(settings, resolve=to_server, ssl_context=client_context) as client:
        with pytest.raises(UrlRefused, match="scheme must be https"):
            client.get(server.url("/tls/downgrade", host="images.test"))
