"""
What the relay's router knows of the parts that plug into it: the ends a data pool pairs (a data
session, and a visitor from the public TLS listener or a raw TCP port), and the lease modes a relay
offers (the public ports of raw TCP and UDP leases).

The router (L{portal.relay.router}) imports only these interfaces; the modules that implement them
(L{portal.relay.data}, L{portal.relay.public}, L{portal.relay.rawtcp}, L{portal.relay.leaseports},
L{portal.relay.udpmode}) import the router, so no import runs in a circle. The service registers the
modes it offers on the router (C{router.tcp}, C{router.udp}).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.protocols import amp
from zope.interface import Attribute, Interface

from portal.forwarding.splice import SpliceProtocol
from portal.relay.udpsession import UDPSession


class IDataSession(Interface):
    """
    A data session that finished its attach: it waits idle in its control session's pool until a
    visitor is paired with it, then carries that visitor's bytes (a
    L{SpliceProtocol<portal.forwarding.splice.SpliceProtocol>}).
    """

    transport = Attribute("The session's transport.")
    nonce = Attribute("The fresh nonce (bytes) its attach and stream header are bound to.")
    tls = Attribute("Whether the session runs inside TLS (through a chain of hops).")
    streamId = Attribute("The stream it carries once paired (int), else None.")
    peer = Attribute("The visitor it is spliced to, once paired.")

    def seal(secret: bytes) -> SpliceProtocol:
        """
        Carry the rest of the session sealed (raw TCP mode), once the stream header is written.

        @param secret: The control session's raw TCP secret.
        @return: The splice end that stands for the tunnel's side of the stream.
        """

    def paired(streamId: int) -> None:
        """
        The pool paired the session with a visitor: it carries stream C{streamId} from now on (the
        stream header and the visitor's bytes follow).
        """


class IWaitingVisitor(Interface):
    """
    A visitor connection routed to a data pool: it waits there, paused, until a data session is
    paired with it (a L{SpliceProtocol<portal.forwarding.splice.SpliceProtocol>}).
    """

    transport = Attribute("The visitor's transport.")
    pool = Attribute("The data pool it waits in, while it waits; None once paired.")
    peer = Attribute("The data session it is spliced to, once paired.")

    def setTimeout(period: float | None) -> float | None:
        """
        Start (or, with L{None}, stop) the timer that drops the visitor if no data session comes.

        @return: The previous timeout.
        """

    def takePending() -> bytes:
        """
        @return: The bytes the visitor sent before pairing (its ClientHello), which the pool writes
            to the data session after the stream header.
        """


class IPortLease(Interface):
    """
    The public port of one live raw TCP or UDP lease.
    """

    port = Attribute("The public port number (int).")
    name = Attribute("The lease name (str).")
    owner = Attribute("The identity id holding the lease (str).")
    holder = Attribute("The control session holding the lease.")

    def close() -> Deferred[None]:
        """
        Stop listening and close the port's visitors.

        @return: A L{Deferred} that fires when the port is closed.
        """


class IPortClaims(Interface):
    """
    Where a relay cluster hands out raw ports: a port a member allocates for a lease counts only
    once the cluster gave it to that lease (L{portal.relay.clusterports.ClusterPorts}).
    """

    def claim(kind: str, port: int, owner: str, name: str, source: str | None) -> Deferred[bool]:
        """
        Claim C{port} in the cluster for the lease C{name} of C{owner}, held by this member; once
        claimed, the port is free to listen on here (any forwarding listener on it is closed).
        C{source}, the address the lease registered from, is recorded for the quotas per source.

        @return: A L{Deferred} firing with whether the port is the lease's; it fails with
            L{StoreError<portal.relay.store.StoreError>} when the cluster store is away.
        """

    def released(kind: str, port: int, owner: str, name: str, until: float | None) -> None:
        """
        The lease ended here and its port is closed: keep the port reserved in the cluster until
        C{until} (L{None}: free it).
        """


class ILeasePorts(Interface):
    """
    One kind of public lease port a relay offers (raw TCP or UDP): a port and a listener per live
    lease. The raw TCP mode is one (L{portal.relay.rawtcp.tcpPorts}); the UDP mode has one.
    """

    kind = Attribute('"tcp" or "udp".')
    allocator = Attribute("The L{PortAllocator<portal.relay.ports.PortAllocator>} of its ports.")
    interface = Attribute("The address (str) the public ports are bound to.")
    leases = Attribute("Open lease ports (L{IPortLease}) by (identity id, name).")

    def open(
        router: Any, owner: str, name: str, hostname: str, holder: object
    ) -> Awaitable[IPortLease]:
        """
        Give the lease C{name} of C{owner} its public port and listen on it for C{holder}.

        @param router: The relay's router.
        @param hostname: The lease hostname, told to the tunnel with each stream.
        @return: The lease's port, once listening.
        """

    def close(owner: str, name: str, holder: object = None) -> Deferred[None]:
        """
        The lease of C{name} ended: close its port (which stays reserved for it).

        @param holder: Only close if this control session holds the port (L{None}: whoever does).
        """

    def sweep() -> bool:
        """
        Close the ports of leases that lapsed while their control session stayed connected.

        @return: Whether any port was closed.
        """

    def stopAccepting() -> Deferred[Any]:
        """
        Stop accepting new visitors, leaving open ones be (graceful shutdown).
        """

    def closeAll() -> Deferred[Any]:
        """
        Close every port (relay shutdown).
        """


class IUDPMode(Interface):
    """
    The relay's UDP mode: the UDP side of control sessions, the public UDP ports of their leases, and
    the socket tunnels send sealed datagrams to.
    """

    ports = Attribute("The public UDP ports of live leases (L{ILeasePorts}).")
    tunnelSide = Attribute("The protocol of the tunnel-facing UDP socket.")
    counters = Attribute("Datagrams by path and drops (dict of str to int), for /metrics.")

    def newSession(control: amp.AMP, secret: bytes) -> UDPSession:
        """
        Start the UDP side of a control session.

        @param control: The control session, for datagrams and flow news over it.
        @param secret: Exported from the control session's TLS.
        """

    def forget(session: UDPSession) -> None:
        """
        The control session of C{session} closed.
        """

    def fromTunnel(session: UDPSession, flowId: int, payload: bytes) -> None:
        """
        The tunnel's datagram for a visitor flow.
        """

    def closeFlow(session: UDPSession, flowId: int) -> None:
        """
        The tunnel forgot a flow.
        """
