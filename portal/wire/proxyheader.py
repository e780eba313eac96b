"""
Build PROXY protocol headers for the connections the tunnel opens to its local target.

With C{--proxy-protocol v1|v2} the tunnel prepends one header to each connection it opens to the
target, so that the target learns the visitor's real address instead of the tunnel's. The format is
HAProxy's (U{https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt}). Everything here is a
pure function returning bytes: L{proxyHeader} when the visitor's address is known, L{localHeader}
when it is not, and L{parseVersion} for the command line. Malformed input raises L{ValueError}
with a message fit for a usage error.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

from twisted.internet.address import IPv4Address, IPv6Address

ProxyVersion = Literal["v1", "v2"]
"""
A PROXY protocol version, as L{parseVersion} returns it.
"""

V2_SIGNATURE: bytes = b"\r\n\r\n\x00\r\nQUIT\n"
"""
The twelve bytes every version 2 header starts with.
"""

_V2_LOCAL = 0x20
_V2_PROXY = 0x21
_V2_FAMILIES = {4: 0x10, 6: 0x20}
_V2_PROTOCOLS = {"TCP": 0x01, "UDP": 0x02}
_MAX_PORT = 65535

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def parseVersion(text: str) -> ProxyVersion:
    """
    Read a PROXY protocol version as the user wrote it on the command line.

    @param text: C{"v1"}, C{"v2"}, C{"1"} or C{"2"} (the C{v} in either case).
    @return: C{"v1"} or C{"v2"}.
    @raise ValueError: For anything else; the message is C{"<text>: expected v1 or v2"}, so the
        command line can report C{--proxy-protocol v3: expected v1 or v2}.
    """
    if text in ("v1", "V1", "1"):
        return "v1"
    if text in ("v2", "V2", "2"):
        return "v2"
    raise ValueError(f"{text}: expected v1 or v2")


def proxyHeader(
    version: str,
    source: IPv4Address | IPv6Address,
    destination: IPv4Address | IPv6Address,
    transport: Literal["TCP", "UDP"] = "TCP",
) -> bytes:
    """
    Build the header announcing a proxied connection from C{source} to C{destination}.

    When one address is IPv4 and the other IPv6, the IPv4 one is sent as its IPv4-mapped IPv6
    address (C{::ffff:a.b.c.d}) and the header uses the IPv6 form (C{TCP6}, or family C{0x2} in
    version 2), since neither version can mix families in one header. IPv6 zone identifiers
    (C{%eth0}) are dropped: the protocol has no place for them. The C{type} attribute of the
    addresses is ignored; C{transport} decides.

    @param version: C{"v1"} or C{"v2"} (anything L{parseVersion} accepts).
    @param source: The visitor's address; its C{host} must be an IP literal of its class's family.
    @param destination: The address the visitor connected to, likewise.
    @param transport: C{"TCP"} or C{"UDP"}; version 1 can only carry C{"TCP"}.
    @return: The header: one C{PROXY TCP4|TCP6 ...} line ending in CRLF for version 1, or the
        signature, command C{PROXY}, family and protocol, length and addresses for version 2.
    @raise ValueError: If the version or transport is unknown, version 1 is asked to carry UDP,
        a host is not an IP literal of its address's family, or a port is outside 0-65535.
    """
    parsed = parseVersion(version)
    if transport not in _V2_PROTOCOLS:
        raise ValueError(f"transport {transport!r}: expected 'TCP' or 'UDP'")
    if parsed == "v1" and transport != "TCP":
        raise ValueError("PROXY protocol v1 cannot carry UDP; use v2")
    sourceIP, sourcePort = _checked("source", source)
    destinationIP, destinationPort = _checked("destination", destination)
    if sourceIP.version != destinationIP.version:
        sourceIP, destinationIP = _mapped(sourceIP), _mapped(destinationIP)
    if parsed == "v1":
        line = (
            f"PROXY TCP{sourceIP.version} {_text(sourceIP)} {_text(destinationIP)}"
            f" {sourcePort} {destinationPort}\r\n"
        )
        return line.encode("ascii")
    body = sourceIP.packed + destinationIP.packed + struct.pack("!HH", sourcePort, destinationPort)
    familyProtocol = _V2_FAMILIES[sourceIP.version] | _V2_PROTOCOLS[transport]
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, familyProtocol, len(body)) + body


def localHeader(version: str) -> bytes:
    """
    Build the header for a connection whose visitor address is unknown.

    The target is told to use the connection's own addresses. The spec advises senders to avoid
    C{PROXY UNKNOWN} where they can, since some receivers refuse it (Twisted's own version 1
    parser, for one, refuses this short form); prefer L{proxyHeader} whenever an address is known.

    @param version: C{"v1"} or C{"v2"} (anything L{parseVersion} accepts).
    @return: C{PROXY UNKNOWN\\r\\n} for version 1; for version 2 the signature, command C{LOCAL},
        family and protocol unspecified, and no addresses.
    @raise ValueError: If the version is unknown.
    """
    if parseVersion(version) == "v1":
        return b"PROXY UNKNOWN\r\n"
    return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0x00, 0)


def _checked(role: str, address: IPv4Address | IPv6Address) -> tuple[_IP, int]:
    """
    Validate one endpoint.

    @param role: C{"source"} or C{"destination"}, for the error message.
    @param address: The endpoint.
    @return: Its host as an L{ipaddress} address and its port.
    @raise ValueError: If C{address} is not an IP address, its host not an IP literal of its
        class's family, or its port outside 0-65535.
    """
    ip: _IP
    if isinstance(address, IPv4Address):
        try:
            ip = ipaddress.IPv4Address(address.host)
        except ValueError:
            raise ValueError(f"{role} host {address.host!r} is not an IPv4 address") from None
    elif isinstance(address, IPv6Address):
        try:
            ip = ipaddress.IPv6Address(address.host)
        except ValueError:
            raise ValueError(f"{role} host {address.host!r} is not an IPv6 address") from None
    else:
        raise ValueError(f"{role} {address!r} is not an IPv4 or IPv6 address")
    port = address.port
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= _MAX_PORT:
        raise ValueError(f"{role} port {port!r} is not in 0-{_MAX_PORT}")
    return ip, port


def _mapped(ip: _IP) -> ipaddress.IPv6Address:
    """
    @param ip: An IPv4 or IPv6 address.
    @return: C{ip} if it is IPv6, else its IPv4-mapped IPv6 address C{::ffff:a.b.c.d}.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


def _text(ip: _IP) -> str:
    """
    Write an address as a version 1 header needs it.

    The spec wants IPv6 as hexadecimal groups with at most one C{::}, so the groups are written
    here rather than by L{str}, which newer Pythons write with a dotted-quad tail for
    IPv4-mapped addresses.

    @param ip: An IPv4 or IPv6 address.
    @return: Dotted-quad IPv4, or IPv6 as lower-case hexadecimal groups with the longest run of
        two or more zero groups (the first, on a tie) written C{::}, as RFC 5952 recommends.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    # From the packed bytes, so that a zone identifier (C{%eth0}) is left out.
    groups = struct.unpack("!8H", ip.packed)
    bestStart, bestLength = -1, 1
    start = 0
    while start < len(groups):
        end = start
        while end < len(groups) and groups[end] == 0:
            end += 1
        if end - start > bestLength:
            bestStart, bestLength = start, end - start
        start = end + 1
    words = [f"{group:x}" for group in groups]
    if bestStart < 0:
        return ":".join(words)
    head = ":".join(words[:bestStart])
    tail = ":".join(words[bestStart + bestLength :])
    return f"{head}::{tail}"
