"""
UDP mode in the tunnel: sealed datagrams to and from the relay (L{portal.wire.udpseal}), one local socket
per visitor flow (L{portal.tunnel.udpflows.FlowTable}), and the fallback over the control session.

The tunnel sends a keepalive to the relay's UDP socket (the control port's number) at once and every
L{KEEPALIVE_INTERVAL} seconds; the relay answers each. Datagrams go as UDP while answers come; when
none came within L{PATH_CHECK} seconds of the first keepalive, or for L{PATH_TIMEOUT} seconds since,
they go over the control session (L{Datagram}) instead, and the log says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from portal.forwarding.boundedreads import listenUDP
from portal.forwarding.udpbuffers import enlargeBuffers
from portal.tunnel.udpflows import MAX_PACKET_SIZE, FlowTable
from portal.wire.control import Datagram, FlowClosed
from portal.wire.udpseal import MAX_PAYLOAD, Direction, Kind, Opener, Sealer, SealError, deriveKeys

#: Seconds between keepalives (they also hold NAT mappings open; common UDP NAT timeouts are 30 s+).
KEEPALIVE_INTERVAL = 10.0
#: Seconds to wait for the relay's first keepalive answer before using the control session.
PATH_CHECK = 3.0
#: Seconds without any answer after which the UDP path counts as lost.
PATH_TIMEOUT = 3 * KEEPALIVE_INTERVAL + 1


class TunnelUDP(DatagramProtocol):
    """
    The tunnel's UDP socket to one relay for one control session.

    @ivar flows: The visitor flows and their local sockets.
    @ivar pathUp: Whether datagrams currently go as UDP.
    @ivar dropped: Datagrams from the relay refused, by reason.
    """

    _log = Logger()
    pathUp = False
    heard = float("-inf")
    _fellBack = False
    _check: Any = None

    def __init__(
        self,
        reactor: Any,
        control: Any,
        relay: tuple[str, int],
        sessionId: bytes,
        secret: bytes,
        target: tuple[str, int],
        idleTimeout: float = 60.0,
        maxFlows: int = 1024,
        overControl: bool = False,
        maxFlowsPerSource: int = 64,
        screen: Callable[[str], str | None] | None = None,
    ) -> None:
        """
        @param reactor: UDP and time.
        @param control: The control session (L{Datagram}, L{FlowClosed}).
        @param relay: The relay's UDP address (IP literal, control port).
        @param sessionId: The UDP session id the relay gave at registration.
        @param secret: Exported from the control session (L{portal.wire.control.EXPORTER_UDP_KEY}).
        @param target: The local UDP service (IP literal, port).
        @param overControl: Never send UDP to the relay; carry every datagram over the control
            session (a relay reached through hops must not learn the tunnel's address).
        @param maxFlowsPerSource: Most flows at once from one visitor source address.
        @param screen: The address rules' judgement of visitor addresses (L{FlowTable}'s
            C{screen}), or L{None} to serve every visitor.
        """
        self._overControl = overControl
        self._reactor = reactor
        self._control = control
        self._relay = relay
        toTunnel, toRelay = deriveKeys(secret, sessionId)
        self._sealer = Sealer(toRelay, sessionId, Direction.TUNNEL_TO_RELAY)
        self._opener = Opener(toTunnel, sessionId, Direction.RELAY_TO_TUNNEL)
        self.flows = FlowTable(
            reactor,
            target,
            self.toRelay,
            idleTimeout=idleTimeout,
            maxFlows=maxFlows,
            maxFlowsPerSource=maxFlowsPerSource,
            onFlowClosed=self._flowClosed,
            screen=screen,
        )
        self.dropped: dict[str, int] = {}
        self._keepalive = LoopingCall(self._sendKeepalive)
        self._keepalive.clock = reactor

    def start(self) -> None:
        """
        Open the socket and start the keepalives; over the control session only, open nothing.
        """
        if self._overControl:
            self._log.info(
                "the relay is reached through hops: carrying datagrams over the control session"
            )
            return
        enlargeBuffers(
            listenUDP(self._reactor, 0, self, maxPacketSize=MAX_PACKET_SIZE, coalesced=True)
        )

    def startProtocol(self) -> None:
        """
        Talk to the relay only; send the first keepalive.
        """
        assert self.transport is not None
        self.transport.connect(*self._relay)
        self._keepalive.start(KEEPALIVE_INTERVAL, now=True)
        self._check = self._reactor.callLater(PATH_CHECK, self._checkPath)

    def _sendKeepalive(self) -> None:
        """
        Send a keepalive; notice a path that stopped answering.
        """
        if self.pathUp and self._reactor.seconds() - self.heard > PATH_TIMEOUT:
            self._fallBack(f"no answer from the relay over UDP for {PATH_TIMEOUT:.0f} s")
        self._send(self._sealer.seal(Kind.KEEPALIVE, 0, b""))

    def _checkPath(self) -> None:
        """
        No answer to the first keepalive yet: use the control session.
        """
        self._check = None
        if not self.pathUp:
            self._fallBack(f"no answer from the relay over UDP within {PATH_CHECK:.0f} s")

    def _fallBack(self, why: str) -> None:
        """
        Carry datagrams over the control session, and say so once per change.
        """
        self.pathUp = False
        if not self._fellBack:
            self._fellBack = True
            self._log.warn(
                "{why}: UDP to the relay seems blocked; carrying datagrams over the control "
                "session (TCP) instead",
                why=why,
            )

    def _send(self, datagram: bytes) -> None:
        """
        Send to the relay; errors (ICMP refusals) only count.
        """
        if self.transport is None:
            return
        try:
            # A connected UDP port takes no address.
            self.transport.write(datagram, None)
        except OSError as e:
            self.dropped["send"] = self.dropped.get("send", 0) + 1
            self._log.debug("UDP send to the relay failed: {error}", error=str(e))

    def sendFailed(self, datagram: bytes, address: Any, error: BaseException) -> None:
        """
        A datagram queued during a read burst could not be sent after all: count it as L{_send}
        would have (L{portal.forwarding.udpbatch}).
        """
        self.dropped["send"] = self.dropped.get("send", 0) + 1
        self._log.debug("UDP send to the relay failed: {error}", error=str(error))

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        A sealed datagram from the relay.
        """
        try:
            kind, flowId, payload = self._opener.open(datagram)
        except SealError as e:
            self.dropped[e.reason] = self.dropped.get(e.reason, 0) + 1
            return
        self.heard = self._reactor.seconds()
        if not self.pathUp:
            self.pathUp = True
            if self._fellBack:
                self._fellBack = False
                self._log.info("the relay answers over UDP again; datagrams go as UDP")
        if kind == Kind.DATA:
            self.flows.deliver(flowId, payload)
        elif kind == Kind.CLOSE:
            self.flows.close(flowId)

    def connectionRefused(self) -> None:
        """
        The relay's UDP port refused (ICMP): keep going over the control session.
        """
        if self.pathUp:
            self._fallBack("the relay's UDP port refused a datagram")

    def toRelay(self, flowId: int, data: bytes) -> None:
        """
        A reply from the local service: send it sealed, or over the control session.
        """
        if self.pathUp and len(data) <= MAX_PAYLOAD:
            self._send(self._sealer.seal(Kind.DATA, flowId, data))
            return
        self._control.callRemote(Datagram, flowId=flowId, payload=data)

    def _flowClosed(self, flowId: int) -> None:
        """
        A flow went idle here: tell the relay.
        """
        self._control.callRemote(FlowClosed, flowId=flowId)

    def stop(self) -> None:
        """
        The control session ended: close every flow and the socket.
        """
        self.flows.stop()
        if self._keepalive.running:
            self._keepalive.stop()
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
        if self.transport is not None:
            self.transport.stopListening()
