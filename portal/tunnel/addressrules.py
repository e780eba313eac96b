"""
Visitor address rules, C{--allow-ip CIDR} and C{--deny-ip CIDR}: which visitor addresses (as the relay
reports them in the stream header, or in C{FlowOpened} for UDP) a tunnel serves. A pure decision; the
tunnel applies it before any of the visitor's bytes reach the service.

Like nginx's C{allow}/C{deny} with deny first: an address in a C{--deny-ip} network is refused; with
any C{--allow-ip}, an address in none of them is refused too. An IPv4-mapped IPv6 address
(C{::ffff:203.0.113.5}) is judged as the IPv4 address it carries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attrs

from portal.trust.relayaddress import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Most networks C{--allow-ip} and C{--deny-ip} may list together (each visitor is checked against
#: all of them).
MAX_NETWORKS = 1024


def parseNetwork(text: str, flag: str) -> Network:
    """
    Parse a CIDR network, or one address (a /32 or /128).

    @param text: The network as given, like C{203.0.113.0/24} or C{2001:db8::/32}.
    @param flag: The option it came from, for the message.
    @raise ConfigError: When it is not a network, or has bits set after the prefix.
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise ConfigError(
            f"{flag} {text!r}: expected an address or a CIDR network like 203.0.113.0/24 or "
            f"2001:db8::/32 ({e})"
        )


@attrs.frozen
class AddressRules:
    """
    The allow and deny lists of a tunnel.

    @ivar allow: With any network here, only visitors in one of them are served.
    @ivar deny: Visitors in any of these networks are refused.
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> AddressRules:
        """
        Build the rules from the options' strings.

        @raise ConfigError: For a malformed network, or more than L{MAX_NETWORKS} in all.
        """
        if len(allow) + len(deny) > MAX_NETWORKS:
            raise ConfigError(
                f"--allow-ip and --deny-ip: at most {MAX_NETWORKS} networks in all "
                f"({len(allow) + len(deny)} given)"
            )
        return cls(
            tuple(parseNetwork(n, "--allow-ip") for n in allow),
            tuple(parseNetwork(n, "--deny-ip") for n in deny),
        )

    def __bool__(self) -> bool:
        """
        @return: Whether any rule is set (without one, every visitor is served).
        """
        return bool(self.allow or self.deny)

    def refusal(self, host: str) -> str | None:
        """
        Judge a visitor address.

        @param host: The visitor's IP address as the relay reported it.
        @return: L{None} to serve the visitor, else why not (for the log).
        """
        if not self:
            return None
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for network in self.deny:
            if address in network:
                return f"in --deny-ip {network}"
        if self.allow and not any(address in network for network in self.allow):
            return "not in any --allow-ip"
        return None


#: The rules of a tunnel without C{--allow-ip} or C{--deny-ip}: every visitor is served.
SERVE_ALL = AddressRules()
