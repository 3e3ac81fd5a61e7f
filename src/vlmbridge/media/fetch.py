"""The guarded image fetcher: http(s) only, bounded in time and bytes, and never towards internal addresses.

Every TCP connection goes through `_GuardedBackend`, which resolves the host itself, vets every resolved
address (loopback, private, link-local, metadata… see `addresses`) unless the operator allow-listed it, and
then connects to exactly the address it vetted. TLS still runs on the URL's host name (SNI and certificate
checks), because httpcore only sees the vetted IP at the socket layer. A DNS answer that changes between check
and connect (rebinding) therefore has nothing to exploit, and redirects are followed one hop at a time through
the same path.

One `ImageFetcher` holds one `httpx.AsyncClient`; create it at startup and `await fetcher.aclose()` at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from ipaddress import ip_address
from types import TracebackType
from typing import Self

import httpcore
import httpx

from vlmbridge import __version__
from vlmbridge.errors import ImageInputError
from vlmbridge.media.addresses import (
    AllowList,
    IPAddress,
    forbidden_reason,
    is_metadata_address,
    normalize_host,
    parse_ip_literal,
)

__all__ = ["FetchPolicy", "ImageFetcher", "Resolver"]

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]  # (host, port) -> IP address strings
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_URL_CHARS = 16 * 1024
_MAX_ADDRESSES = 4  # connection attempts per host; the total timeout bounds them anyway
_TOKEN = re.compile(r"^[A-Za-z0-9._+-]{1,40}$")
_NET_ERRORS: tuple[type[Exception], ...] = (
    httpx.HTTPError,
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
)
_TIMEOUTS: tuple[type[Exception], ...] = (httpx.TimeoutException, httpcore.TimeoutException)


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for fetching image URLs. `allow_hosts` opens specific internal hosts (names, IPs or CIDRs)."""

    allow_hosts: tuple[str, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    max_redirects: int = 3
    user_agent: str = f"vlmbridge/{__version__} (image fetcher)"
    accept: str = "image/*"  # the Accept header (the video sources fetch with "video/*")
    max_connections: int = 32
    allow_list: AllowList = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Parse the allow-list once, here, so a bad entry fails at startup rather than on the first request.
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))
        object.__setattr__(self, "allow_list", AllowList.parse(self.allow_hosts))
        if self.max_bytes < 1 or self.max_redirects < 0 or self.max_connections < 1:
            raise ValueError("max_bytes and max_connections must be positive and max_redirects non-negative")
        if min(self.connect_timeout, self.read_timeout, self.total_timeout) <= 0:
            raise ValueError("fetch timeouts must be positive")


class _Refusal(Exception):
    """Raised below httpx (in the network backend); the fetcher turns it into an ImageInputError."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


class _AddressGuard:
    """Resolves a host and vets each address against the allow-list and `forbidden_reason`."""

    def __init__(self, allow: AllowList, resolver: Resolver) -> None:
        self._allow = allow
        self._resolve = resolver

    def check(self, host: str, ip: IPAddress) -> None:
        # Metadata endpoints stay closed even for allow-listed names or ranges: they are never an image.
        reason = "a cloud metadata endpoint" if is_metadata_address(ip) else None
        if reason is None:
            if self._allow.allows_name(host) or self._allow.allows_address(ip):
                return
            reason = forbidden_reason(ip)
        if reason is not None:
            logger.warning("image fetch refused: host %s -> %s is %s", host, ip, reason)
            verb = "is" if parse_ip_literal(host) is not None else "resolves to"
            raise _Refusal(
                f"image URL refused: host {host!r} {verb} {reason}, which this server does not fetch from",
                "image_url_refused",
            )

    async def vet(self, host: str, port: int, timeout: float | None) -> list[IPAddress]:
        literal = parse_ip_literal(host)
        if literal is not None:
            self.check(host, literal)
            return [literal]
        if normalize_host(host) is None:
            raise _Refusal("image URL host is not a valid host name", "invalid_image_url")
        try:
            async with asyncio.timeout(timeout):
                answers = await self._resolve(host, port)
            addresses = list(dict.fromkeys(ip_address(a) for a in answers))
        except (OSError, TimeoutError, UnicodeError, ValueError):
            addresses = []
        if not addresses:
            raise _Refusal(f"could not resolve image host {host!r}", "image_fetch_failed")
        for ip in addresses:  # all of them: a name that also resolves to an internal address is refused
            self.check(host, ip)
        return addresses


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to vetted addresses; httpcore then layers TLS with the URL's host name on top."""

    def __init__(self, guard: _AddressGuard, inner: httpcore.AsyncNetworkBackend) -> None:
        self._guard = guard
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._guard.vet(host, port, timeout)
        error: Exception = httpcore.ConnectError(f"could not connect to {host}")
        for ip in addresses[:_MAX_ADDRESSES]:
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise _Refusal("image URL refused: unix sockets are not fetched", "image_url_refused")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: Iterable[bytes] | AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if isinstance(self._stream, AsyncIterable):
            async for part in self._stream:
                yield part
        else:
            for part in self._stream:
                yield part

    async def aclose(self) -> None:
        closer = getattr(self._stream, "aclose", None)
        if closer is not None:
            await closer()


class _GuardedTransport(httpx.AsyncBaseTransport):
    """httpx transport over an httpcore pool whose every connection goes through `_GuardedBackend`.

    No proxies (a proxy would resolve hosts we never vetted), HTTP/1.1 only, no retries.
    """

    def __init__(self, backend: httpcore.AsyncNetworkBackend, ssl_context: ssl.SSLContext, limit: int) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limit,
            max_keepalive_connections=min(limit, 8),
            keepalive_expiry=5.0,
            http1=True,
            http2=False,
            retries=0,
            network_backend=backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class ImageFetcher:
    """Fetches image URLs under a `FetchPolicy`. One per app: it pools connections; close it with `aclose()`.

    `resolver` replaces the system resolver (tests, or a DNS server of one's own); `ssl_context` the default
    certifi-based verification.
    """

    def __init__(
        self,
        policy: FetchPolicy | None = None,
        *,
        resolver: Resolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.policy = policy or FetchPolicy()
        self._guard = _AddressGuard(self.policy.allow_list, resolver or _system_resolve)
        backend = _GuardedBackend(self._guard, network_backend or httpcore.AnyIOBackend())
        p = self.policy
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(backend, ssl_context or httpx.create_ssl_context(), p.max_connections),
            timeout=httpx.Timeout(connect=p.connect_timeout, read=p.read_timeout, write=p.read_timeout, pool=5.0),
            follow_redirects=False,  # each hop is re-checked below
            trust_env=False,  # no env proxies, no .netrc credentials
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),  # one client serves every caller
            headers={"User-Agent": p.user_agent, "Accept": p.accept, "Accept-Encoding": "identity"},
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, param: str) -> bytes:
        """The body of `url` (http/https, ≤ max_bytes), following at most max_redirects vetted redirects."""
        total = self.policy.total_timeout
        try:
            async with asyncio.timeout(total):
                return await self._fetch(url, param)
        except TimeoutError:
            raise ImageInputError(
                f"image URL took longer than {total:g} s to download", param=param, code="image_fetch_failed"
            ) from None

    async def _fetch(self, url: str, param: str) -> bytes:
        if len(url) > _MAX_URL_CHARS:
            raise ImageInputError("image URL is too long", param=param, code="invalid_image_url")
        target = self._checked_url(url, param, redirected=False)
        for hop in range(self.policy.max_redirects + 1):
            host = target.host
            logger.debug("fetching image from %s://%s (hop %d)", target.scheme, host, hop)
            try:
                async with self._client.stream("GET", target) as response:
                    if response.status_code in _REDIRECTS:
                        target = self._next_hop(target, response, param)
                        continue
                    return await self._read_body(response, host, param)
            except _Refusal as refusal:
                raise ImageInputError(refusal.message, param=param, code=refusal.code) from None
            except _TIMEOUTS:
                raise ImageInputError(
                    f"image host {host!r} did not answer in time", param=param, code="image_fetch_failed"
                ) from None
            except _NET_ERRORS as exc:
                logger.info("image fetch from %s failed: %s", host, type(exc).__name__)
                raise ImageInputError(
                    f"could not download the image from {host!r} ({_describe(exc)})",
                    param=param,
                    code="image_fetch_failed",
                ) from None
        raise ImageInputError(
            f"image URL redirected more than {self.policy.max_redirects} times",
            param=param,
            code="image_fetch_failed",
        )

    def _next_hop(self, current: httpx.URL, response: httpx.Response, param: str) -> httpx.URL:
        location = response.headers.get("location", "")
        if not location or len(location) > _MAX_URL_CHARS:
            raise ImageInputError(
                f"image host {current.host!r} sent a redirect without a usable Location",
                param=param,
                code="image_fetch_failed",
            )
        try:
            joined = current.join(location)
        except (httpx.InvalidURL, ValueError):
            raise ImageInputError(
                f"image host {current.host!r} redirected to an invalid URL", param=param, code="image_fetch_failed"
            ) from None
        return self._checked_url(joined, param, redirected=True)

    def _checked_url(self, url: str | httpx.URL, param: str, *, redirected: bool) -> httpx.URL:
        # Reject what we can without the network; the backend still vets every address it connects to.
        where = "image URL redirected to" if redirected else "image URL is"
        code = "image_url_refused" if redirected else "invalid_image_url"
        try:
            parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            raise ImageInputError(f"{where} not a valid URL", param=param, code=code) from None
        if parsed.scheme not in ("http", "https"):
            raise ImageInputError(f"{where} not an http(s) URL", param=param, code=code)
        if parsed.userinfo:
            raise ImageInputError(f"{where} a URL with credentials (user@host)", param=param, code=code)
        raw_host = parsed.raw_host.decode("ascii", errors="replace")
        host = normalize_host(raw_host)
        if host is None:
            raise ImageInputError(f"{where} a URL without a valid host name", param=param, code=code)
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise ImageInputError(f"{where} a URL with an invalid port", param=param, code=code)
        literal = parse_ip_literal(raw_host)
        if literal is not None:
            try:
                self._guard.check(raw_host, literal)
            except _Refusal as refusal:
                raise ImageInputError(refusal.message, param=param, code=refusal.code) from None
        return parsed

    async def _read_body(self, response: httpx.Response, host: str, param: str) -> bytes:
        limit = self.policy.max_bytes
        if response.status_code != 200:
            raise ImageInputError(
                f"image host {host!r} answered HTTP {response.status_code}", param=param, code="image_fetch_failed"
            )
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            shown = encoding if _TOKEN.match(encoding) else "unknown"
            raise ImageInputError(
                f"image host {host!r} sent a compressed body (Content-Encoding: {shown}); images must be sent as is",
                param=param,
                code="image_fetch_failed",
            )
        declared = response.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise ImageInputError(
                f"image at {host!r} is {int(declared)} bytes, more than the {limit} allowed",
                param=param,
                code="image_too_large",
            )
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > limit:  # leaving the stream early closes the connection
                raise ImageInputError(
                    f"image at {host!r} is more than the {limit} bytes allowed", param=param, code="image_too_large"
                )
        return bytes(body)


def _describe(exc: Exception) -> str:
    # Class names only: exception texts can carry URLs (and their signed query strings).
    if isinstance(exc, httpx.ConnectError | httpcore.ConnectError):
        return "TLS certificate not valid for this host" if "CERTIFICATE" in str(exc).upper() else "connection failed"
    if isinstance(exc, httpx.RemoteProtocolError | httpcore.RemoteProtocolError | httpcore.ProtocolError):
        return "invalid HTTP response"
    if isinstance(exc, httpx.ReadError | httpcore.ReadError):
        return "connection lost"
    return type(exc).__name__
