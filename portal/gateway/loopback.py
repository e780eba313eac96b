"""
Loopback listeners: parsing the address of a listener that must stay on this machine (the local
peer endpoint, the tunnel's metrics), and the endpoint description that listens there.
"""

from __future__ import annotations

import ipaddress


class EndpointAddressError(ValueError):
    """
    The address given for a loopback-only listener is malformed or not a loopback address.
    """


def isLoopbackHost(host: str) -> bool:
    """
    @param host: A host name or address (IPv6 without brackets).
    @return: Whether it is C{localhost} or a loopback address.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parseLoopbackAddress(text: str, what: str, risk: str) -> tuple[str, int]:
    """
    Parse the address of a listener that may only listen on a loopback address.

    @param text: C{PORT}, C{HOST:PORT} or C{[IPV6]:PORT}; port 0 lets the OS choose.  HOST must be
        a loopback address (C{127.0.0.0/8}, C{::1}); C{localhost} means C{127.0.0.1}.
    @param what: The listener, for messages (C{"the peer endpoint"}).
    @param risk: Why it must stay on loopback, for messages.
    @return: The address and port.
    @raise EndpointAddressError: If it is malformed or the host is not a loopback address.
    """
    text = text.strip()
    if text.isdigit():
        host, port = "127.0.0.1", text
    elif text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise EndpointAddressError(f"{text!r} is not [IPV6]:PORT")
        port = rest[1:]
    else:
        host, _, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise EndpointAddressError(f"{text!r}: expected PORT or HOST:PORT with a port 0-65535")
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise EndpointAddressError(
            f"{text!r}: {what} listens on a loopback address (127.0.0.1 or ::1), "
            f"given as an address, not a name"
        )
    if not loopback:
        raise EndpointAddressError(
            f"{text!r}: {what} may only listen on a loopback address (127.0.0.1 or ::1): {risk}"
        )
    return host, int(port)


def loopbackEndpoint(host: str, port: int) -> str:
    """
    @param host: An address L{parseLoopbackAddress} returned.
    @param port: Its port.
    @return: The server endpoint string listening on C{host}, C{port}.
    """
    if ":" in host:
        return f"tcp6:{port}:interface={host.replace(':', chr(92) + ':')}"
    return f"tcp:{port}:interface={host}"
