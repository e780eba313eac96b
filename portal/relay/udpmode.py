"""
UDP mode on the relay: a public UDP port per live lease, and one UDP socket (on the control port's
number) where tunnels send and receive sealed datagrams (L{portal.wire.udpseal}).

Each visitor address on a lease's public port is a flow (L{portal.relay.udp.PublicUDP}). The relay
tells the tunnel about a new flow over the control session (L{FlowOpened}, with the visitor's address),
then seals each datagram with the session's relay-to-tunnel key and sends it to the address the tunnel
last sent an authenticated datagram from. The tunnel's keepalives keep that address fresh (and NAT
mappings open); the relay answers each one, so the tunnel knows the path works. Without a fresh
address (UDP blocked), or for a datagram too large to seal into one, the datagram goes over the
control session (L{Datagram}) instead.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from portal.forwarding.boundedreads import listenUDP
from portal.forwarding.datagramwriter import DatagramWriter
from portal.forwarding.logthrottle import LogThrottle
from portal.forwarding.refusals import Refusals
from portal.forwarding.reuseport import listenSharedUDP
from portal.forwarding.udpbuffers import enlargeBuffers
from portal.relay.interfaces import IUDPMode
from portal.relay.leaseports import LeasePorts, PortLease
from portal.relay.ports import PortAllocator
from portal.relay.udp import MAX_PACKET_SIZE, PublicUDP
from portal.relay.udpsession import UDPSession
from portal.wire.control import Datagram, FlowClosed, FlowOpened
from portal.wire.udpseal import (
    HEADER_LENGTH,
    MAX_PAYLOAD,
    SESSION_ID_LENGTH,
    Kind,
    SealError,
)

#: Seconds after the tunnel's last authenticated datagram that its UDP address is still used.
PATH_TIMEOUT = 45.0
#: Seconds a visitor flow may be idle on the relay (the tunnel's own, shorter timeout usually ends
#: flows first, with L{FlowClosed}).
RELAY_FLOW_IDLE = 300.0
#: Most flows per lease on the relay.
RELAY_MAX_FLOWS = 4096
#: Seconds between two log events about dropped tunnel datagrams.
DROP_LOG_INTERVAL = 10.0


@implementer(IUDPMode)
class UDPMode:
    """
    The relay's UDP mode: sessions, lease ports and the tunnel-facing socket.

    @ivar ports: The public UDP ports of live leases.
    @ivar sessions: UDP sessions by id.
    @ivar tunnelSide: The protocol of the tunnel-facing socket (the service listens with it).
    @ivar counters: Datagrams by path, and drops by reason.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        allocator: PortAllocator,
        interface: str = "",
        maxFlowsPerSource: int = 64,
        refusals: Refusals | None = None,
        shared: bool = False,
    ) -> None:
        """
        @param reactor: UDP and time.
        @param allocator: The UDP lease ports' allocator.
        @param interface: The address lease ports bind.
        @param maxFlowsPerSource: Most flows one source address may have on a lease's port.
        @param refusals: Where flows refused for their source are counted and logged.
        @param shared: Bind lease ports with C{SO_REUSEPORT} (C{--workers}: the other workers
            bind them too, to forward their share of the visitors to this one).
        """
        self._reactor = reactor
        self._shared = shared
        self.maxFlowsPerSource = maxFlowsPerSource
        self._refusals = refusals
        self.ports = LeasePorts("udp", allocator, self._listen, interface)
        self.sessions: dict[bytes, UDPSession] = {}
        self.tunnelSide = TunnelSide(self)
        self.counters = {
            "udp_to_tunnel": 0,
            "udp_from_tunnel": 0,
            "udp_over_control": 0,
            "udp_dropped": 0,
        }
        self._dropLog = LogThrottle(reactor, DROP_LOG_INTERVAL)

    def newSession(self, control: amp.AMP, secret: bytes) -> UDPSession:
        """
        Start the UDP side of a control session.

        @param secret: Exported from the control session's TLS (L{portal.wire.control.EXPORTER_UDP_KEY}).
        """
        sessionId = os.urandom(SESSION_ID_LENGTH)
        session = self.sessions[sessionId] = UDPSession(control, sessionId, secret)
        return session

    def forget(self, session: UDPSession) -> None:
        """
        The control session closed.
        """
        self.sessions.pop(session.sessionId, None)

    def _listen(self, lease: PortLease, interface: str) -> IListeningPort:
        """
        Listen on a lease's public UDP port.
        """
        session: UDPSession = lease.holder.udpSession
        public = PublicUDP(
            self._reactor,
            lambda flowId, data: self.toTunnel(session, flowId, data),
            name=lease.name,
            idleTimeout=RELAY_FLOW_IDLE,
            maxFlows=RELAY_MAX_FLOWS,
            maxFlowsPerSource=self.maxFlowsPerSource,
            refusals=self._refusals,
            onFlowClosed=lambda flowId: self._flowClosed(session, flowId),
        )
        listen = listenSharedUDP if self._shared else listenUDP
        listening: IListeningPort = listen(
            self._reactor, lease.port, public, interface=interface, maxPacketSize=MAX_PACKET_SIZE
        )
        enlargeBuffers(listening)
        session.public = public

        def closed() -> None:
            # The tunnel must forget the flows too: a reopened port numbers its flows from 1 again.
            public.stop()
            if session.public is public:
                session.public = None
            for flowId in sorted(session.announced):
                session.control.callRemote(FlowClosed, flowId=flowId)
            session.announced.clear()

        lease.onClose = closed
        return listening

    def toTunnel(self, session: UDPSession, flowId: int, data: bytes) -> None:
        """
        A visitor's datagram: announce a new flow, then send it sealed, or over the control session.
        """
        if flowId not in session.announced and session.public is not None:
            session.announced.add(flowId)
            address = session.public.flowAddress(flowId)
            host, port = address if address is not None else ("", 0)
            session.control.callRemote(FlowOpened, flowId=flowId, host=host, port=port)
        now = self._reactor.seconds()
        address = session.address
        if address is not None and now - session.heard < PATH_TIMEOUT and len(data) <= MAX_PAYLOAD:
            self.tunnelSide.send(session.sealer.seal(Kind.DATA, flowId, data), address)
            self.counters["udp_to_tunnel"] += 1
            return
        self.counters["udp_over_control"] += 1
        session.control.callRemote(Datagram, flowId=flowId, payload=data)

    def fromTunnel(self, session: UDPSession, flowId: int, payload: bytes) -> None:
        """
        The tunnel's reply for a flow, by either path.
        """
        if session.public is not None:
            session.public.fromTunnel(flowId, payload)

    def closeFlow(self, session: UDPSession, flowId: int) -> None:
        """
        The tunnel forgot a flow.
        """
        session.announced.discard(flowId)
        if session.public is not None:
            session.public.closeFlow(flowId)

    def _flowClosed(self, session: UDPSession, flowId: int) -> None:
        """
        The relay forgot an idle flow: tell the tunnel.
        """
        session.announced.discard(flowId)
        session.control.callRemote(FlowClosed, flowId=flowId)

    def dropped(self, reason: str, address: Any) -> None:
        """
        Count a dropped tunnel-side datagram, and log it at most once per L{DROP_LOG_INTERVAL}.
        """
        self.counters["udp_dropped"] += 1
        unlogged = self._dropLog.due()
        if unlogged is None:
            return
        self._log.warn(
            "dropped a UDP datagram from {address}: {reason} ({unlogged} more dropped since the "
            "last report)",
            address=address,
            reason=reason,
            unlogged=unlogged,
        )

    def received(self, datagram: bytes, address: tuple[str, int]) -> None:
        """
        A datagram on the tunnel-facing socket: authenticate it and act on it.
        """
        if len(datagram) < HEADER_LENGTH:
            self.dropped("too short", address)
            return
        session = self.sessions.get(datagram[1 : 1 + SESSION_ID_LENGTH])
        if session is None:
            self.dropped("unknown session", address)
            return
        try:
            kind, flowId, payload = session.opener.open(datagram)
        except SealError as e:
            self.dropped(e.reason, address)
            return
        session.address = address
        session.heard = self._reactor.seconds()
        if kind == Kind.KEEPALIVE:
            self.tunnelSide.send(session.sealer.seal(Kind.KEEPALIVE, 0, b""), address)
        elif kind == Kind.DATA:
            self.counters["udp_from_tunnel"] += 1
            self.fromTunnel(session, flowId, payload)
        elif kind == Kind.CLOSE:
            self.closeFlow(session, flowId)


class TunnelSide(DatagramProtocol):
    """
    The relay's UDP socket for tunnels (the control port's number).
    """

    _writer: DatagramWriter | None = None

    def __init__(self, mode: UDPMode) -> None:
        self._mode = mode

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        Hand a tunnel's datagram to L{UDPMode.received}.
        """
        self._mode.received(datagram, (addr[0], addr[1]))

    def send(self, datagram: bytes, address: tuple[str, int]) -> None:
        """
        Send a sealed datagram to a tunnel; a send error drops it (UDP gives no guarantee anyway).
        """
        transport = self.transport
        if transport is None:
            return
        writer = self._writer
        if writer is None or writer.port is not transport:
            writer = self._writer = DatagramWriter(transport)
        try:
            writer.write(datagram, address)
        except OSError as e:
            self._mode.dropped(f"send failed: {e}", address)

    def sendFailed(self, datagram: bytes, address: Any, error: BaseException) -> None:
        """
        A datagram queued during a read burst could not be sent after all: drop it as L{send}
        would have (L{portal.forwarding.udpbatch}).
        """
        self._mode.dropped(f"send failed: {error}", address)
