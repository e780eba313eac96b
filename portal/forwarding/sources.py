"""
Source addresses as limits count them: an IPv4 address on its own (/32), an IPv6 address by its /64
network (one subscriber usually gets a whole /64, so counting single IPv6 addresses would let one
client take 2**64 of them).
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

#: The prefix length IPv6 sources are grouped by.
IPV6_PREFIX = 64


#: Addresses whose source is remembered (L{sourceKey} parses an address in microseconds, and a
#: flood brings the same few addresses again and again); a flood from more addresses only misses.
SOURCE_CACHE = 4096


@functools.lru_cache(maxsize=SOURCE_CACHE)
def sourceKey(host: str) -> str:
    """
    The source a limit counts C{host} as.

    @param host: An IPv4 or IPv6 address literal (an IPv6 scope, C{%eth0}, is ignored); anything
        else, such as a UNIX socket path, is its own source.
    @return: The IPv4 address (also for an IPv4-mapped IPv6 address), or the IPv6 address's /64
        network in CIDR form.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


def peerSource(address: Any) -> str:
    """
    The source of a connection or datagram's peer address.

    @param address: An L{IAddress} with a C{host} (TCP, UDP), or a C{(host, port, ...)} tuple.
    @return: L{sourceKey} of its host; the address's text for one without a host.
    """
    if isinstance(address, tuple):
        return sourceKey(str(address[0]))
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return sourceKey(str(host))
