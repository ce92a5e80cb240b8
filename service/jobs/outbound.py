"""Where the server may send a request to a URL a tenant gave (today: webhooks): the check against server-side
request forgery.

``check_url(url, policy)`` parses the URL, resolves its host to every address and refuses it (``Refused``) unless
each address is allowed; it returns the ``Destination`` to connect to, those checked addresses, so the sender opens
its socket to exactly what was checked and never looks the name up again (a second lookup is what DNS rebinding
answers differently). Addresses decide, not spellings: IP literals in every form the C library accepts (``127.1``,
``0x7f000001``, ``2130706433``, ``0177.0.0.1``) and IPv6 forms that carry an IPv4 address (mapped, compatible,
6to4, NAT64) are classified by the address they reach.

Allowed are public addresses, plus what ``Policy`` allows (the server's settings, ``Policy.from_settings``):
``allow_private`` allows every address; a network in ``networks`` (a CIDR or a single address) allows the
addresses in it, whatever they are; a name in ``hosts`` allows that name to resolve to private-network addresses
(10/8, 172.16/12, 192.168/16, fc00::/7), never to loopback, link-local (cloud metadata), shared 100.64/10, cloud
metadata or other special addresses: naming an internal service trusts it, not whatever its DNS answers.
Messages show scheme://host[:port] only: paths and queries of webhook URLs often hold tokens.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any
from urllib.parse import quote, urlsplit

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = re.compile(r"^[a-z0-9_-]{1,63}$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
# Networks of the private kind a host-name entry may reach (RFC 1918 and unique-local IPv6).
_PRIVATE = tuple(map(ipaddress.ip_network, ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")))
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; Alibaba Cloud's metadata is 100.100.100.200
# Cloud metadata inside a private range: AWS's IPv6 instance metadata, DNS and NTP (fd00:ec2::254, ::253, ::123).
_METADATA = (ipaddress.ip_network("fd00:ec2::/32"),)
# What Python 3.11's is_global misses: IETF protocol assignments (192.0.0.0/24), local-use NAT64 (RFC 8215).
_SPECIAL = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("64:ff9b:1::/48"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(ValueError):
    """The URL may not be called; the message says why, showing scheme://host[:port] only."""


class Unresolved(Refused):
    """The host has no address now: refused at submit, but a lookup that may succeed later (retried at send)."""


@dataclass(frozen=True)
class Policy:
    """What besides public addresses a URL may reach; the default is the strict one (https, public only)."""

    allow_http: bool = False
    allow_private: bool = False
    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any | None) -> Policy:
        """The webhook policy of ``settings`` (a ``Settings``; None: the defaults)."""
        if settings is None:
            return cls()
        entries = [allow_entry(entry) for entry in settings.webhook_allow]
        return cls(allow_http=settings.webhook_allow_http, allow_private=settings.webhook_allow_private,
                   hosts=frozenset(e for e in entries if isinstance(e, str)),
                   networks=tuple(e for e in entries if not isinstance(e, str)))


@dataclass(frozen=True)
class Destination:
    """A checked URL: connect to ``addresses`` (in order), send ``host_header`` as Host and, for https, verify the
    certificate for ``server_name``."""

    scheme: str
    host: str  # the URL's host, lowercase ASCII (IDNA), or an IP literal in canonical form
    port: int
    target: str  # path and query: the request line's target
    addresses: tuple[Address, ...]

    @property
    def origin(self) -> str:
        return _origin(self.scheme, self.host, self.port)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def server_name(self) -> str:
        return self.host


def _origin(scheme: str, host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port and port != DEFAULT_PORTS.get(scheme) else "")


def safe_origin(url: str) -> str:
    """scheme://host[:port] of any URL, for logs and messages (never its userinfo, path or query)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    return _origin(parts.scheme, parts.hostname or "", port)


# ---------------------------------------------------------------------------------------------------- hosts


def ipv4_literal(host: str) -> IPv4Address | None:
    """The address of an IPv4 literal as the C library's inet_aton reads it (1 to 4 parts, each decimal, octal
    with a leading 0 or hex with 0x; the last fills the remaining bytes: ``127.1``, ``2130706433``), or None."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        if part.startswith("0x"):
            digits, base = part[2:], 16
        elif len(part) > 1 and part.startswith("0"):
            digits, base = part[1:], 8
        else:
            digits, base = part, 10
        if not digits or any(c not in "0123456789abcdef"[:base] for c in digits):
            return None
        numbers.append(int(digits, base))
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    return IPv4Address(sum(n << 8 * (3 - i) for i, n in enumerate(head)) + last)


def _host(parts) -> str | Address:
    """The URL's host: an address for a literal, else the name in lowercase ASCII. Refused when malformed."""
    host = parts.hostname or ""
    if not host:
        raise Refused("must name a host")
    if ":" in host:  # urlsplit only gives a colon for a bracketed IPv6 literal
        if "%" in host:
            # A zone picks an interface of the server; every zoned address is link-local anyway.
            raise Refused("must not name an IPv6 zone (%)")
        return ipaddress.ip_address(host)
    try:
        # IDNA first: it folds look-alikes (fullwidth letters, circled digits) into the ASCII a resolver sees.
        name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise Refused("must name a valid host") from None
    name = name[:-1] if name.endswith(".") else name
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise Refused("must name a valid host")
    if _NUMERIC_LABEL.match(labels[-1]):
        # Ends in a number: an IPv4 literal or nothing (a resolver would read some of these as addresses).
        address = ipv4_literal(name)
        if address is None:
            raise Refused("must name a valid host or IP address")
        return address
    return name


def resolve_name(host: str) -> list[str]:
    """Every address ``host`` resolves to, as strings (the system resolver; tests swap this function out)."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


# ------------------------------------------------------------------------------------------------ addresses


def _embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 one reaches through: mapped, compatible (::a.b.c.d), 6to4 or NAT64 (64:ff9b::/96)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or int(address) >> 32 == 0 and int(address) > 1:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def kind(address: Address) -> str:
    """"public", or what the address is that makes it not: "loopback", "link-local", "private", "shared",
    "metadata", "multicast", "unspecified", "reserved" or "special-purpose"."""
    if isinstance(address, IPv6Address):
        if address.scope_id:
            return "link-local"
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = kind(embedded)
            compatible = int(address) >> 32 == 0  # ::a.b.c.d: deprecated, routed nowhere useful, never public
            return "reserved" if inner == "public" and compatible else inner
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if any(address in network for network in _METADATA):
        return "metadata"
    if address in _SHARED:
        return "shared"
    if any(address in network for network in _PRIVATE):
        return "private"
    if address.is_reserved or address == IPv4Address("255.255.255.255") or getattr(address, "is_site_local", False):
        return "reserved"
    if not address.is_global or any(address in network for network in _SPECIAL):
        return "special-purpose"
    return "public"


def allowed(address: Address, host: str, policy: Policy) -> str | None:
    """None when ``policy`` lets ``host`` (a name, or the literal) reach ``address``, else the address's kind."""
    what = kind(address)
    if what == "public" or policy.allow_private:
        return None
    if any(address in network for network in policy.networks):
        return None
    if what == "private" and host in policy.hosts:
        return None
    return what


def _canonical(address: Address) -> Address:
    # An IPv4-mapped address is the IPv4 one: compared with the allowed networks, and connected to, as such.
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# ------------------------------------------------------------------------------------------------ the check


def check_url(url: str, policy: Policy = Policy(),
              resolve: Callable[[str], Iterable[str]] | None = None) -> Destination:
    """``url`` as a ``Destination`` whose every address ``policy`` allows, or ``Refused`` saying why
    (``Unresolved`` when the name has no address). ``resolve`` maps a name to its addresses (default
    ``resolve_name``, the system resolver); IP literals never reach it."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise Refused("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Refused("must be a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise Refused("must be an http:// or https:// URL")
    if scheme == "http" and not policy.allow_http:
        raise Refused("must be an https:// URL (this server sends nothing over plain http://)")
    if "@" in parts.netloc:
        raise Refused("must not contain a user name or password (user:password@host)")
    if port == 0:
        raise Refused("must not name port 0")
    try:
        host = _host(parts)
    except ValueError as exc:  # Refused, or ipaddress refusing a bracketed literal
        raise Refused(str(exc) if isinstance(exc, Refused) else "must name a valid IPv6 address") from None
    port = port or DEFAULT_PORTS[scheme]
    if isinstance(host, str):
        origin = _origin(scheme, host, port)
        try:
            found = [ipaddress.ip_address(a) for a in (resolve or resolve_name)(host)]
        except (OSError, ValueError) as exc:  # gaierror; an IDNA error; an answer that is not an address
            raise Unresolved(f"cannot resolve {origin}: {getattr(exc, 'strerror', None) or exc}") from None
        if not found:
            raise Unresolved(f"cannot resolve {origin}: no address")
    else:
        found, host = [host], str(_canonical(host))
        origin = _origin(scheme, host, port)
    addresses = tuple(dict.fromkeys(map(_canonical, found)))
    for address in addresses:
        why = allowed(address, host, policy)
        if why is not None:
            shown = "" if str(address) == host else f" resolves to {address}, which"
            article = "an" if why[0] in "aeiou" else "a"
            raise Refused(f"{origin}{shown} is {article} {why} address; only public addresses are allowed unless the "
                          "server's webhook settings allow it")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    target = "".join(c if c.isascii() else quote(c) for c in target)  # a request line is ASCII
    return Destination(scheme=scheme, host=host, port=port, target=target, addresses=addresses)


def allow_entry(entry: str) -> str | Network:
    """One entry of an allow-list: a network (``10.0.0.0/8``; an address alone is a /32 or /128) or a host name
    (lowercase ASCII). ValueError when it is neither."""
    text = entry.strip().lower()
    if "%" in text:
        raise ValueError(f"{entry!r}: IPv6 zones are never called")
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=True)
    except ValueError as exc:
        if "/" in text or ":" in text:
            raise ValueError(f"{entry!r} is not a valid network ({exc})") from None
    try:
        host = _host(urlsplit(f"https://{text}"))
    except (Refused, ValueError):
        raise ValueError(f"{entry!r} is neither a host name nor an IP network") from None
    return ipaddress.ip_network(host) if not isinstance(host, str) else host
