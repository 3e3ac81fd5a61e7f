"""Which IP addresses an image URL may reach: pure functions, no I/O.

`forbidden_reason(ip)` names why an address is off limits (loopback, private, link-local, metadata…) or returns
None for a public address. `parse_ip_literal(host)` reads every spelling a resolver accepts (IPv6 with or
without brackets, dotted quads, and the legacy inet_aton forms `2130706433`, `0x7f000001`, `0177.0.0.1`,
`127.1`), so that spelling cannot smuggle a forbidden address past the check. `AllowList` holds the operator's
exceptions (host names, IPs, CIDRs).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

__all__ = [
    "AllowList",
    "IPAddress",
    "forbidden_reason",
    "is_forbidden_address",
    "is_metadata_address",
    "normalize_host",
    "parse_ip_literal",
]

IPAddress = IPv4Address | IPv6Address

# Cloud metadata and platform endpoints: never an image source, whatever the allow-list says.
_METADATA = frozenset(
    {
        IPv4Address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack… instance metadata
        IPv4Address("169.254.170.2"),  # AWS ECS task metadata
        IPv4Address("100.100.100.200"),  # Alibaba Cloud metadata
        IPv4Address("168.63.129.16"),  # Azure WireServer (a public-looking address)
        IPv4Address("192.0.0.192"),  # Oracle Cloud metadata
        IPv6Address("fd00:ec2::254"),  # AWS metadata over IPv6
    }
)

_V4_RANGES: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a carrier-grade NAT (shared) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol-assignment address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
)

_V6_RANGES: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), why)
    for net, why in (
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("::/96", "an IPv4-compatible IPv6 address (deprecated)"),
        ("::ffff:0:0:0/96", "an IPv4-translated IPv6 address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001::/32", "a Teredo tunnel address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("fc00::/7", "a unique-local (private) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)

_NAT64 = IPv6Network("64:ff9b::/96")
_SIXTOFOUR = IPv6Network("2002::/16")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*\.?$")
_LEGACY_PART = re.compile(r"^(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address `host` spells, in any form a resolver would take as numeric; None for a host name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return IPv6Address(text)
        except ValueError:
            return None
    return _parse_legacy_ipv4(text)


def _parse_legacy_ipv4(text: str) -> IPv4Address | None:
    # BSD inet_aton: 1–4 parts, each decimal, 0x-hex or 0-octal; the last part fills the remaining bytes.
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_LEGACY_PART.match(p) for p in parts):
        return None
    values = [int(p, 16) if p[:2].lower() == "0x" else int(p, 8) if p.startswith("0") else int(p) for p in parts]
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = 0
    for v in head:
        number = (number << 8) | v
    number = (number << (8 * (4 - len(head)))) | last
    return IPv4Address(number)


def _as_address(ip: IPAddress | str) -> IPAddress:
    if isinstance(ip, IPv4Address | IPv6Address):
        return ip
    parsed = parse_ip_literal(ip)
    if parsed is None:
        raise ValueError(f"not an IP address: {ip[:64]!r}")
    return parsed


def is_metadata_address(ip: IPAddress | str) -> bool:
    """True for a cloud metadata/platform endpoint, also when spelled as IPv4-mapped or NAT64 IPv6."""
    addr = _as_address(ip)
    if isinstance(addr, IPv6Address):
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            return embedded in _METADATA
    return addr in _METADATA


def _embedded_ipv4(addr: IPv6Address) -> IPv4Address | None:
    # Forms where the kernel or a gateway ends up talking to the embedded IPv4 address.
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _SIXTOFOUR:
        return addr.sixtofour
    return None


def forbidden_reason(ip: IPAddress | str) -> str | None:
    """Why `ip` must not be fetched from ("a loopback address", …), or None when it is a public address.

    Strings may use any spelling `parse_ip_literal` reads; a string that is not an address raises ValueError.
    """
    addr = _as_address(ip)
    if is_metadata_address(addr):
        return "a cloud metadata endpoint"
    if isinstance(addr, IPv6Address):
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            inner = forbidden_reason(embedded)
            return None if inner is None else f"{inner} (embedded in IPv6 {addr.compressed})"
        for net6, why in _V6_RANGES:
            if addr in net6:
                return why
        # Python's registry view catches what the table does not (reserved blocks, ORCHID…).
        if addr.is_reserved or addr.is_multicast or not addr.is_global:
            return "a reserved or non-global address"
        return None
    for net4, why in _V4_RANGES:
        if addr in net4:
            return why
    if addr.is_reserved or addr.is_multicast or addr.is_private or not addr.is_global:
        return "a reserved or non-global address"
    return None


def is_forbidden_address(ip: IPAddress | str) -> bool:
    """True when an image URL must not reach `ip` (unless the operator allow-lists it)."""
    return forbidden_reason(ip) is not None


def normalize_host(host: str) -> str | None:
    """Lower-cased host name or canonical IP text; None when `host` is neither (e.g. `%6c` escapes, spaces)."""
    text = host.strip().lower()
    literal = parse_ip_literal(text)
    if literal is not None:
        return literal.compressed
    return text if _HOSTNAME.match(text) else None


@dataclass(frozen=True)
class AllowList:
    """Operator exceptions: exact host names (no wildcards, no suffixes), single IPs and CIDR ranges."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPv4Network | IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        names: set[str] = set()
        networks: list[IPv4Network | IPv6Network] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            if "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry.replace("[", "").replace("]", ""), strict=False))
                except ValueError:
                    raise ValueError(f"image host allow-list entry {raw!r} is not a valid CIDR") from None
                continue
            literal = parse_ip_literal(entry)
            if literal is not None:
                networks.append(ipaddress.ip_network(literal))
            elif _HOSTNAME.match(entry):
                names.add(entry)
            else:
                raise ValueError(f"image host allow-list entry {raw!r} is not a host name, IP or CIDR")
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str) -> bool:
        """Exact, case-insensitive name match: `api` does not allow `api.` or `evil.api`."""
        return host.strip().lower() in self.names

    def allows_address(self, ip: IPAddress) -> bool:
        """True when `ip` (or the IPv4 address an IPv4-mapped `ip` stands for) lies in an allowed range."""
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c.version == net.version and c in net for c in candidates for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.names or self.networks)
