"""The guarded fetcher against real loopback servers: refused URLs must never reach them (zero hits)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpcore
import pytest

from vlmbridge.errors import ImageInputError
from vlmbridge.media.addresses import AllowList, forbidden_reason, is_forbidden_address, parse_ip_literal
from vlmbridge.media.fetch import FetchPolicy, ImageFetcher

# --- a real HTTP server on loopback that counts every request it sees --------------------------------------


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.server.record(parts.path, dict(self.headers.items()))
        route = parts.path.strip("/").split("/")
        handler = getattr(self, "route_" + route[0].replace("-", "_").replace(".", "_"), self.route_missing)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # clients giving up is part of the tests
            handler(route[1:], query)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def route_missing(self, rest: list[str], query: dict[str, str]) -> None:
        self._send(404, b"not found")

    def route_image_png(self, rest: list[str], query: dict[str, str]) -> None:
        self._send(200, PNG, {"Content-Type": "image/png", "Set-Cookie": "session=abc; Path=/"})

    def route_redirect(self, rest: list[str], query: dict[str, str]) -> None:
        self._send(int(query.get("status", "302")), headers={"Location": query["to"]})

    def route_chain(self, rest: list[str], query: dict[str, str]) -> None:
        n = int(rest[0])
        self._send(302, headers={"Location": f"/chain/{n - 1}"}) if n > 0 else self.route_image_png(rest, query)

    def route_status(self, rest: list[str], query: dict[str, str]) -> None:
        self._send(int(rest[0]), b"nope")

    def route_gzip(self, rest: list[str], query: dict[str, str]) -> None:
        self._send(200, PNG, {"Content-Encoding": "gzip"})

    def route_declared_big(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(50_000_000))
        self.end_headers()
        self.wfile.write(b"x" * 1000)

    def route_big(self, rest: list[str], query: dict[str, str]) -> None:
        # No Content-Length (HTTP/1.0, close-delimited): the client must count and hang up on its own.
        self.send_response(200)
        self.end_headers()
        chunk = b"\0" * 65536
        try:
            for _ in range(256):  # 16 MiB, far more than loopback socket buffers hold
                self.wfile.write(chunk)
                self.server.big_sent += len(chunk)
        except OSError:
            self.server.big_aborted.set()
            return
        self.server.big_completed = True

    def route_slow(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):  # one byte every 50 ms: never idle long enough for a read timeout
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.05)


class ImageServer(ThreadingHTTPServer):
    """A loopback HTTP server in a thread; `hits[path]` counts requests (shared between servers if given)."""

    daemon_threads = True

    def __init__(
        self,
        host: str,
        hits: Counter[str],
        family: socket.AddressFamily = socket.AF_INET,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address_family = family
        super().__init__((host, 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.hits = hits
        self.headers_seen: list[dict[str, str]] = []
        self.big_aborted = threading.Event()
        self.big_sent = 0
        self.big_completed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def record(self, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.hits[path] += 1
            self.headers_seen.append(headers)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def hits() -> Counter[str]:
    return Counter()


@pytest.fixture(scope="module")
def server(hits: Counter[str]) -> Iterator[ImageServer]:
    srv = ImageServer("127.0.0.1", hits)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server6(hits: Counter[str]) -> Iterator[ImageServer | None]:
    try:
        srv = ImageServer("::1", hits, socket.AF_INET6)
    except OSError:
        yield None
        return
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _fresh_counts(hits: Counter[str], server: ImageServer) -> None:
    hits.clear()
    server.headers_seen.clear()
    server.big_aborted.clear()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def fetch_with(url: str, policy: FetchPolicy | None = None, **kwargs: Any) -> bytes:
    async with ImageFetcher(policy or FetchPolicy(connect_timeout=2, read_timeout=2, total_timeout=5), **kwargs) as f:
        return await f.fetch(url, param="messages[0].content[1].image_url")


def refused(url: str, policy: FetchPolicy | None = None, **kwargs: Any) -> ImageInputError:
    with pytest.raises(ImageInputError) as info:
        run(fetch_with(url, policy, **kwargs))
    assert info.value.param == "messages[0].content[1].image_url"
    return info.value


def resolver_for(table: dict[str, Sequence[str]], calls: list[str] | None = None) -> Any:
    """A resolver answering from `table` (recording each call), falling back to the system for others."""

    async def resolve(host: str, port: int) -> Sequence[str]:
        if calls is not None:
            calls.append(host)
        if host in table:
            return table[host]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(i[4][0]) for i in infos]

    return resolve


# --- loopback in every spelling: zero hits unless allow-listed, then exactly one ---------------------------

LOOPBACK_SPELLINGS = [
    "localhost",
    "LOCALHOST",
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0x7f.0.0.1",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:7f00:1]",
]


@pytest.mark.parametrize("host", [*LOOPBACK_SPELLINGS, "127.0.0.2", "0", "0.0.0.0", "0177.0.0.1"])
def test_loopback_refused_with_zero_hits(server: ImageServer, hits: Counter[str], host: str) -> None:
    err = refused(f"http://{host}:{server.port}/image.png?sig=SECRET")
    assert err.code in ("image_url_refused", "invalid_image_url")  # 0177.0.0.1: httpx rejects the URL itself
    assert "SECRET" not in err.message
    assert sum(hits.values()) == 0


@pytest.mark.parametrize("host", ["127.0.0.1.", "localhost.", "0x7f000001."])
def test_trailing_dot_spellings_reach_nothing(server: ImageServer, hits: Counter[str], host: str) -> None:
    # Not IP literals to us, so they are resolved (or not, depending on the platform) and then vetted.
    refused(f"http://{host}:{server.port}/image.png")
    assert sum(hits.values()) == 0


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_allow_listed_loopback_gets_exactly_one_hit(server: ImageServer, hits: Counter[str], host: str) -> None:
    # The control for the test above: the same URLs do reach the server once the range is allow-listed.
    policy = FetchPolicy(allow_hosts=("127.0.0.0/8",), total_timeout=5)
    assert run(fetch_with(f"http://{host}:{server.port}/image.png", policy)) == PNG
    assert hits == Counter({"/image.png": 1})


def test_ipv6_loopback(server6: ImageServer | None, hits: Counter[str]) -> None:
    if server6 is None:
        pytest.skip("no IPv6 loopback here")
    for host in ("[::1]", "[0:0:0:0:0:0:0:1]", "[::]"):
        assert refused(f"http://{host}:{server6.port}/image.png").code == "image_url_refused"
    assert sum(hits.values()) == 0
    assert run(fetch_with(f"http://[::1]:{server6.port}/image.png", FetchPolicy(allow_hosts=("::1",)))) == PNG
    assert hits == Counter({"/image.png": 1})


def test_name_resolving_to_loopback_is_refused_before_connecting(server: ImageServer, hits: Counter[str]) -> None:
    calls: list[str] = []
    err = refused(
        f"http://images.test:{server.port}/image.png", resolver=resolver_for({"images.test": ["127.0.0.1"]}, calls)
    )
    assert err.code == "image_url_refused" and "images.test" in err.message and "loopback" in err.message
    assert calls == ["images.test"] and sum(hits.values()) == 0


def test_one_forbidden_answer_among_public_ones_refuses_the_host(server: ImageServer, hits: Counter[str]) -> None:
    resolver = resolver_for({"mixed.test": ["8.8.8.8", "10.0.0.7"]})
    assert refused(f"http://mixed.test:{server.port}/image.png", resolver=resolver).code == "image_url_refused"


def test_metadata_stays_closed_even_when_allow_listed() -> None:
    policy = FetchPolicy(allow_hosts=("169.254.0.0/16", "meta.test", "fd00::/8"))
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://[::ffff:a9fe:a9fe]/"):
        assert "metadata" in refused(url, policy).message
    resolver = resolver_for({"meta.test": ["169.254.169.254"]})
    assert "metadata" in refused("http://meta.test/", policy, resolver=resolver).message


# --- DNS pinning: the address we vetted is the one we connect to -------------------------------------------


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records connection targets; connects for real only to loopback, fails anything else at once."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        if not host.startswith("127."):
            raise httpcore.ConnectError("test backend: no network")
        return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def test_connects_to_the_vetted_address_and_keeps_the_host_header(server: ImageServer, hits: Counter[str]) -> None:
    calls: list[str] = []
    backend = RecordingBackend()
    policy = FetchPolicy(allow_hosts=("127.0.0.0/8",))
    resolver = resolver_for({"images.test": ["127.0.0.1"]}, calls)
    url = f"http://images.test:{server.port}/image.png"
    assert run(fetch_with(url, policy, resolver=resolver, network_backend=backend)) == PNG
    assert backend.connects == [("127.0.0.1", server.port)] and calls == ["images.test"]
    assert server.headers_seen[0]["Host"] == f"images.test:{server.port}"


def test_dns_rebinding_gets_one_resolution_per_connection(server: ImageServer, hits: Counter[str]) -> None:
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # public while checked, loopback a moment later
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> Sequence[str]:
        calls.append(host)
        return next(answers)

    backend = RecordingBackend()
    url = f"http://rebind.test:{server.port}/image.png"
    assert refused(url, resolver=rebinding, network_backend=backend).code == "image_fetch_failed"
    assert backend.connects == [("93.184.216.34", server.port)]  # never the second answer
    assert calls == ["rebind.test"] and sum(hits.values()) == 0


# --- redirects: every hop is checked again --------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/image.png",
        "http://[::ffff:127.0.0.1]:{port}/image.png",
        "http://2130706433:{port}/image.png",
        "http://0x7f000001:{port}/image.png",
        "http://evil.test:{port}/image.png",
        "http://user:pw@localhost:{port}/image.png",
        "file:///etc/passwd",
        "ftp://localhost:{port}/image.png",
    ],
)
def test_redirect_from_allowed_host_to_forbidden_one(server: ImageServer, hits: Counter[str], target: str) -> None:
    # `localhost` is allow-listed by name only; the redirect target is not.
    policy = FetchPolicy(allow_hosts=("localhost",))
    to = target.format(port=server.port)
    resolver = resolver_for({"evil.test": ["127.0.0.1"]})
    err = refused(f"http://localhost:{server.port}/redirect?to={to}", policy, resolver=resolver)
    assert err.code == "image_url_refused"
    assert hits == Counter({"/redirect": 1})


def test_redirect_within_allowed_host_is_followed(server: ImageServer, hits: Counter[str]) -> None:
    policy = FetchPolicy(allow_hosts=("localhost",))
    for status in (301, 302, 303, 307, 308):
        url = f"http://localhost:{server.port}/redirect?status={status}&to=/image.png"
        assert run(fetch_with(url, policy)) == PNG
    assert hits == Counter({"/redirect": 5, "/image.png": 5})


def test_redirect_cap(server: ImageServer, hits: Counter[str]) -> None:
    policy = FetchPolicy(allow_hosts=("localhost",), max_redirects=2)
    assert run(fetch_with(f"http://localhost:{server.port}/chain/2", policy)) == PNG
    hits.clear()
    err = refused(f"http://localhost:{server.port}/chain/5", policy)
    assert err.code == "image_fetch_failed" and "more than 2" in err.message
    assert hits == Counter({"/chain/5": 1, "/chain/4": 1, "/chain/3": 1})
    hits.clear()
    assert refused(f"http://localhost:{server.port}/chain/1", FetchPolicy(allow_hosts=("localhost",), max_redirects=0))
    assert hits == Counter({"/chain/1": 1})


# --- size, time, status ----------------------------------------------------------------------------------


def test_body_over_max_bytes_is_cut_off(server: ImageServer, hits: Counter[str]) -> None:
    policy = FetchPolicy(allow_hosts=("localhost",), max_bytes=100_000)
    err = refused(f"http://localhost:{server.port}/big", policy)
    assert err.code == "image_too_large"
    assert server.big_aborted.wait(5), "the server should see the connection closed mid-body"
    assert not server.big_completed and server.big_sent < 16 * 1024 * 1024


def test_declared_length_over_max_bytes_is_refused_before_reading(server: ImageServer) -> None:
    err = refused(f"http://localhost:{server.port}/declared-big", FetchPolicy(allow_hosts=("localhost",)))
    assert err.code == "image_too_large" and "50000000" in err.message


def test_exactly_max_bytes_is_fine(server: ImageServer) -> None:
    assert run(fetch_with(f"http://localhost:{server.port}/image.png", FetchPolicy(("localhost",), len(PNG)))) == PNG
    assert refused(f"http://localhost:{server.port}/image.png", FetchPolicy(("localhost",), len(PNG) - 1))


@pytest.mark.parametrize("status", [404, 500, 204])
def test_non_200_status(server: ImageServer, status: int) -> None:
    err = refused(f"http://localhost:{server.port}/status/{status}", FetchPolicy(allow_hosts=("localhost",)))
    assert err.code == "image_fetch_failed" and str(status) in err.message


def test_compressed_body_is_refused(server: ImageServer) -> None:
    err = refused(f"http://localhost:{server.port}/gzip", FetchPolicy(allow_hosts=("localhost",)))
    assert "Content-Encoding" in err.message


def test_server_that_never_answers_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # connections complete in the backlog; nobody ever reads or answers
    try:
        policy = FetchPolicy(allow_hosts=("127.0.0.1",), read_timeout=0.3, total_timeout=3)
        start = time.monotonic()
        err = refused(f"http://127.0.0.1:{listener.getsockname()[1]}/image.png", policy)
        assert err.code == "image_fetch_failed" and "in time" in err.message
        assert time.monotonic() - start < 2
    finally:
        listener.close()


def test_connect_timeout_bounds_name_resolution() -> None:
    async def stuck(host: str, port: int) -> Sequence[str]:
        await asyncio.sleep(10)
        return ["8.8.8.8"]

    start = time.monotonic()
    err = refused("http://slow-dns.test/x.png", FetchPolicy(connect_timeout=0.2), resolver=stuck)
    assert err.code == "image_fetch_failed" and "resolve" in err.message
    assert time.monotonic() - start < 1.5


def test_total_timeout_bounds_a_slow_drip(server: ImageServer) -> None:
    policy = FetchPolicy(allow_hosts=("localhost",), read_timeout=2, total_timeout=0.4)
    start = time.monotonic()
    err = refused(f"http://localhost:{server.port}/slow", policy)
    assert "longer than 0.4 s" in err.message and time.monotonic() - start < 1.5


def test_refused_connection_is_a_fetch_failure() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    err = refused(f"http://127.0.0.1:{port}/", FetchPolicy(allow_hosts=("127.0.0.1",)))
    assert err.code == "image_fetch_failed" and "connection failed" in err.message


# --- what we send, what we keep, what we log -----------------------------------------------------------------


def test_headers_no_cookies_and_no_query_in_logs(
    server: ImageServer, hits: Counter[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vlmbridge")
    policy = FetchPolicy(allow_hosts=("localhost",), user_agent="test-agent/1")

    async def twice() -> None:
        async with ImageFetcher(policy) as fetcher:
            for _ in range(2):  # the first answer sets a cookie; a shared client must not send it back
                await fetcher.fetch(f"http://localhost:{server.port}/image.png?sig=SECRET", param="p")
            with pytest.raises(ImageInputError):
                await fetcher.fetch(f"http://127.0.0.1:{server.port}/x?sig=SECRET", param="p")

    run(twice())
    assert hits == Counter({"/image.png": 2})
    first, second = server.headers_seen
    assert first["User-Agent"] == "test-agent/1" and first["Accept-Encoding"] == "identity"
    assert "Cookie" not in second
    assert "SECRET" not in caplog.text and "localhost" in caplog.text


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.png",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http:///x",
        "http://a b/",
        "not a url",
        "http://%6c%6fcalhost/",
        "http://h:99999/",
        "https://user@example.com/a.png",
        "gopher://x/",
    ],
)
def test_invalid_urls_are_refused_without_network(url: str) -> None:
    backend = RecordingBackend()
    assert refused(url, network_backend=backend).code == "invalid_image_url"
    assert backend.connects == []


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="allow-list entry"):
        FetchPolicy(allow_hosts=("not a host!",))
    with pytest.raises(ValueError, match="CIDR"):
        FetchPolicy(allow_hosts=("10.0.0.0/99",))
    with pytest.raises(ValueError):
        FetchPolicy(max_bytes=0)
    assert FetchPolicy(allow_hosts=["api", "172.18.0.0/16"]).allow_hosts == ("api", "172.18.0.0/16")  # type: ignore[arg-type]


# --- TLS: connect to the vetted IP, verify the certificate against the host name --------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImageServer, Path, list[str]]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    names: list[str] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def record_sni(sock: ssl.SSLSocket | ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(str(name))

    ctx.sni_callback = record_sni
    srv = ImageServer("127.0.0.1", Counter(), tls=ctx)
    yield srv, cert, names
    srv.stop()


def test_tls_uses_the_host_name_for_sni_and_verification(tls_server: tuple[ImageServer, Path, list[str]]) -> None:
    srv, cert, names = tls_server
    client_ctx = ssl.create_default_context(cafile=str(cert))
    policy = FetchPolicy(allow_hosts=("127.0.0.0/8",))
    resolver = resolver_for({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    url = f"https://images.test:{srv.port}/image.png"
    assert run(fetch_with(url, policy, resolver=resolver, ssl_context=client_ctx)) == PNG
    assert names == ["images.test"] and srv.headers_seen[-1]["Host"] == f"images.test:{srv.port}"
    for wrong in (f"https://other.test:{srv.port}/image.png", f"https://127.0.0.1:{srv.port}/image.png"):
        err = refused(wrong, policy, resolver=resolver, ssl_context=client_ctx)
        assert err.code == "image_fetch_failed" and "certificate" in err.message
    assert srv.hits == Counter({"/image.png": 1})


# --- address classification (pure) -------------------------------------------------------------------------

FORBIDDEN = [
    "127.0.0.1", "127.1", "127.255.255.254", "2130706433", "0x7f000001", "0x7F.0.0.1", "0177.0.0.1", "0177.1",
    "017700000001", "0", "0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "169.254.169.254", "169.254.170.2", "169.254.0.1", "100.64.0.1", "100.127.255.255",
    "100.100.100.200", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.0.1", "192.0.0.192",
    "192.0.2.1", "192.88.99.1", "198.18.0.1", "198.51.100.1", "203.0.113.1", "168.63.129.16",
    "::1", "[::1]", "0:0:0:0:0:0:0:1", "::", "::ffff:127.0.0.1", "::ffff:7f00:1", "0:0:0:0:0:ffff:7f00:1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:0.0.0.0", "::127.0.0.1", "::ffff:0:7f00:1",
    "fe80::1", "fe80::1%eth0", "fc00::1", "fd00::1", "fd00:ec2::254", "fec0::1", "ff02::1", "ff05::2",
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::10.1.2.3", "64:ff9b:1::1", "2002:7f00:1::",
    "2002:c0a8:101::1", "2002:a9fe:a9fe::", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:db8::1", "100::1",
    "3fff::1",
]  # fmt: skip
ALLOWED = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "134744072", "0x8.0x8.0x8.0x8", "100.63.255.255", "100.128.0.0",
    "172.15.255.255", "172.32.0.0", "11.0.0.1", "192.169.0.1", "2606:4700:4700::1111", "2001:4860:4860::8888",
    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
]  # fmt: skip


@pytest.mark.parametrize("ip", FORBIDDEN)
def test_forbidden_addresses(ip: str) -> None:
    assert is_forbidden_address(ip), ip
    assert forbidden_reason(ip)


@pytest.mark.parametrize("ip", ALLOWED)
def test_public_addresses(ip: str) -> None:
    assert not is_forbidden_address(ip), forbidden_reason(ip)


def test_reasons_name_the_kind_of_address() -> None:
    assert forbidden_reason("127.0.0.1") == "a loopback address"
    assert forbidden_reason("10.1.2.3") == "a private address"
    assert forbidden_reason("169.254.169.254") == "a cloud metadata endpoint"
    assert forbidden_reason("100.64.1.1") == "a carrier-grade NAT (shared) address"
    assert forbidden_reason("fd12::1") == "a unique-local (private) address"
    assert "loopback" in (forbidden_reason("::ffff:127.0.0.1") or "")
    assert forbidden_reason(IPv4Address("8.8.8.8")) is None and forbidden_reason(IPv6Address("::1"))
    with pytest.raises(ValueError):
        forbidden_reason("example.com")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("10.1.258", "10.1.1.2"), ("0", "0.0.0.0"),
        ("[::1]", "::1"), ("::ffff:127.0.0.1", "::ffff:7f00:1"), ("4294967295", "255.255.255.255"),
        ("4294967296", None), ("256.0.0.1", None), ("1.2.3.4.5", None), ("08.0.0.1", None), ("0x", None),
        ("1.2.3.", None), ("example.com", None), ("localhost", None), ("[v1.x]", None), ("", None),
    ],
)  # fmt: skip
def test_parse_ip_literal(text: str, expected: str | None) -> None:
    parsed = parse_ip_literal(text)
    assert (parsed.compressed if parsed is not None else None) == expected


def test_allow_list_matching() -> None:
    allow = AllowList.parse(["API", "nginx", "172.18.0.0/16", "127.0.0.1", "::1", "[fd00::]/8", " "])
    assert allow.names == frozenset({"api", "nginx"})
    assert allow.allows_name("api") and allow.allows_name("Api")
    assert not allow.allows_name("api.") and not allow.allows_name("evil.api") and not allow.allows_name("apix")
    for ip in ("172.18.3.4", "127.0.0.1", "::1", "fd00::5", "::ffff:172.18.0.9"):
        assert allow.allows_address(parse_ip_literal(ip))  # type: ignore[arg-type]
    for ip in ("172.19.0.1", "127.0.0.2", "10.0.0.1", "::2"):
        assert not allow.allows_address(parse_ip_literal(ip))  # type: ignore[arg-type]
    assert not AllowList.parse([]) and allow
