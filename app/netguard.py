"""Which addresses the server may send to on a tenant's behalf (webhook deliveries).

A tenant names a URL; the server connects to it from inside its own network. Without a check,
that URL reaches the database, the cloud metadata service or any loopback port, and the answer
(or its error) tells the tenant what is there. So only globally routable unicast addresses are
allowed, plus the private networks an operator lists for internal receivers::

    SQUEEZE_WEBHOOK_ALLOWED_NETWORKS=10.20.0.0/16,fd00:1234::/32

>>> policy = AddressPolicy.from_setting("10.20.0.0/16")
>>> policy.allows(ipaddress.ip_address("10.20.1.5")), policy.allows(ipaddress.ip_address("169.254.169.254"))
(True, False)

The host is checked twice: when the URL is submitted (a literal address or a ``localhost``
name is refused at once) and at every attempt, where the name is resolved, every address it
resolves to is checked, and the connection goes to a checked address (never a second lookup
that could answer differently).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Resolves (host, port) to addresses; tests pass their own instead of asking DNS.
Resolver = Callable[[str, int], Sequence[str]]


class AddressNotAllowed(Exception):
    """The host is, or resolves to, an address the server must not send to."""


# Refused whatever ``is_global`` says in this Python version: ranges that are not global, and
# IPv6 ranges that embed an IPv4 address (mapped, compatible, translated, NAT64, 6to4, Teredo),
# which are other spellings of an IPv4 address, loopback and private ones included.
_NEVER = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64",
    "2001::/23", "2001:db8::/32", "2002::/16", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10",
    "fec0::/10", "ff00::/8",
)]


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address, in no spelling of a special range."""
    if any(address in network for network in _NEVER if network.version == address.version):
        return False
    return address.is_global and not (address.is_multicast or address.is_unspecified or address.is_reserved)


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses, plus the operator's listed networks (never unspecified or multicast,
    which no receiver has)."""

    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_setting(cls, value: str) -> "AddressPolicy":
        """``value``: comma-separated CIDRs, e.g. ``"10.0.0.0/8, 127.0.0.0/8"``; empty: none."""
        return cls(tuple(ipaddress.ip_network(part.strip()) for part in value.split(",") if part.strip()))

    def allows(self, address: IPAddress) -> bool:
        if address.is_unspecified or address.is_multicast:
            return False
        if is_public(address):
            return True
        return any(address in network for network in self.allowed_networks if network.version == address.version)

    def check_submitted_host(self, host: str) -> None:
        """What can be refused before any lookup: a literal address (any spelling) or a
        ``localhost`` name that is not allowed. Raises ``AddressNotAllowed``."""
        addresses = literal_addresses(host)
        if addresses is not None and not all(self.allows(a) for a in addresses):
            raise AddressNotAllowed(host)

    def resolve(self, host: str, port: int, resolver: Resolver | None = None) -> list[IPAddress]:
        """The addresses to connect to, in the resolver's order, after checking every one
        (a name with one forbidden address is refused whole). Raises ``AddressNotAllowed``,
        or ``OSError`` when the name does not resolve."""
        addresses = literal_addresses(host)
        if addresses is None:
            addresses = []
            for text in (resolver or system_resolver)(host, port):
                address = parse_address(text)
                if address is None:
                    raise AddressNotAllowed(host)  # a resolver answering something odd is not trusted
                if address not in addresses:
                    addresses.append(address)
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        if not all(self.allows(a) for a in addresses):
            raise AddressNotAllowed(host)
        return addresses


def literal_addresses(host: str) -> list[IPAddress] | None:
    """The addresses a host means without asking DNS, or None for a name to resolve.

    Covers every spelling ``getaddrinfo`` would accept for an IPv4 address (``127.1``,
    ``0x7f000001``, ``2130706433``) and the ``localhost`` names (RFC 6761: always loopback).
    """
    name = host.strip("[]").rstrip(".").lower()
    address = parse_address(name)
    if address is not None:
        return [address]
    if name == "localhost" or name.endswith(".localhost"):
        return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    return None


def parse_address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        try:  # the legacy IPv4 spellings: inet_aton reads "127.1" and "0x7f.1" as 127.0.0.1
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except (OSError, ValueError):
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return None  # a zone ("fe80::1%eth0") only means something on this machine
    return address


def system_resolver(host: str, port: int) -> list[str]:
    """The machine's resolver (DNS, /etc/hosts), TCP addresses only."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
