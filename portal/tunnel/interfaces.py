"""
What the tunnel's parts know of each other, so that imports run one way: a control session talks to
its relay link through L{IRelayLink} (L{portal.tunnel.control} never imports the link), and a relay
link (L{portal.tunnel.link}) and the registry's relay pool (L{portal.tunnel.relaypool}) talk to their
tunnel through L{ITunnel} (neither imports L{portal.tunnel.service}).
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class ITunnel(Interface):
    """
    A tunnel, as its relay links and its relay pool see it (L{TunnelService
    <portal.tunnel.service.TunnelService>}).
    """

    reactor = Attribute("The reactor (TCP, time, name resolution).")
    config = Attribute("The tunnel's L{TunnelConfig<portal.tunnel.config.TunnelConfig>}.")
    identity = Attribute("The tunnel's L{Identity<portal.trust.identity.Identity>}.")
    label = Attribute("The (first) lease label asked for on every relay.")
    labels = Attribute("Every lease label asked for on every relay.")
    reporter = Attribute("The L{Reporter<portal.tunnel.report.Reporter>} of user-facing events.")
    pins = Attribute("Relay identities pinned on first use (L{KnownRelays}).")
    udpTarget = Attribute("The local UDP service's (host, port), in UDP mode; else None.")
    streamHandler = Attribute("What data sessions hand their streams to.")
    servedHostnames = Attribute("Lease hostnames relays gave the tunnel (a set, updated by links).")
    publicURLs = Attribute("The https URLs of live leases (a set, updated by links).")
    caPath = Attribute("The local CA certificate file, when the local CA issues certificates.")
    acme = Attribute(
        "With --acme, the lease hostnames' certificates (L{AcmeCertificates<portal.tunnel.acme."
        "certificates.AcmeCertificates>}: C{want(hostname)}); else None."
    )
    links = Attribute("The tunnel's relay links (a list; the relay pool adds and removes some).")

    def certificateKind(hostname: str) -> str:
        """
        @param hostname: A lease hostname.
        @return: Which certificate it presents now: C{"file"} (C{--cert}), C{"acme"}, or
            C{"local-ca"}.
        """

    def fatal(message: str, relay: str = "") -> None:
        """
        Report an unrecoverable error and stop the tunnel.

        @param message: What went wrong and what to do.
        @param relay: The relay concerned, if one is.
        """


class IRelayLink(Interface):
    """
    One relay's link, as its control session sees it (L{RelayLink<portal.tunnel.link.RelayLink>}).
    """

    reactor = Attribute("The reactor (time, name resolution).")
    tunnel = Attribute("The tunnel (L{ITunnel}), for its configuration.")
    relay = Attribute("The relay's L{RelayAddress<portal.trust.relayaddress.RelayAddress>}.")
    identity = Attribute("The tunnel's identity, which signs registrations.")
    labels = Attribute("The lease labels to register.")
    mode = Attribute("The tunnel's mode (L{portal.wire.control.MODES}).")
    reporter = Attribute("The L{Reporter<portal.tunnel.report.Reporter>} of user-facing events.")
    pins = Attribute("Relay identities pinned on first use (L{KnownRelays}).")
    pool = Attribute("The data session pool (C{start(sessionId, key)}, C{want(count)}).")
    udpTarget = Attribute("The local UDP service's (host, port), in UDP mode; else None.")
    flag = Attribute("The option the relay was given with, for messages about its identity.")

    def registered(
        protocol: Any,
        hostnames: list[str],
        port: int,
        tcp: tuple[str, int] | None = None,
        udp: tuple[str, int] | None = None,
    ) -> None:
        """
        The relay accepted the leases on the control session C{protocol}.

        @param hostnames: The lease hostnames.
        @param port: The relay's public TLS port.
        @param tcp: In raw TCP mode, the host and port of the lease's public TCP port.
        @param udp: In UDP mode, the host and port of the lease's public UDP port.
        """

    def controlLost(protocol: Any) -> None:
        """
        The control session C{protocol} closed.
        """

    def fatal(message: str) -> None:
        """
        Something reconnecting cannot fix happened on this relay.
        """
