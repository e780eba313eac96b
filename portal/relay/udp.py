"""
The relay's public UDP port for one lease in UDP mode: each visitor address is a flow.

Each distinct visitor address, (host, port), that sends a datagram to the port gets a flow id: an
integer from 1 up, never reused by one L{PublicUDP}, at most L{MAX_FLOW_ID} because the id travels
as 4 bytes with each datagram between relay and tunnel (L{portal.wire.udpseal}).  Replies from the
tunnel name the flow and go to its visitor.  A flow with no datagram in either direction for
C{idleTimeout} seconds is forgotten.

Idle flows are found by one periodic sweep every C{idleTimeout / 4} seconds, not by a timer per
flow.  A datagram only sets its flow's activity flag (no clock read, no allocation, no timer to
reset); each sweep clears the flags and counts, for every flow, the sweep intervals since it was
last active.  A flow is forgotten once four intervals in a row have passed with no datagram, that
is between C{idleTimeout} and C{1.25 * idleTimeout} seconds after its last datagram, never sooner.
The sweep runs only while there are flows, and costs time proportional to their number.

This class does not listen; the caller does, and must pass C{maxPacketSize=MAX_PACKET_SIZE}::

    reactor.listenUDP(port, PublicUDP(...), interface=interface, maxPacketSize=MAX_PACKET_SIZE)

Twisted's default C{maxPacketSize} is 8192 bytes, the size of the buffer each datagram is read
into: a larger datagram (9,000 bytes from a jumbo-frame network, or anything up to 65,507 bytes)
would arrive truncated to 8192 bytes, without any error (on Linux).

In a relay cluster, visitors of the port may also arrive at another member, which forwards their
datagrams over a member link (L{portal.relay.clusterudp}); they enter here by L{PublicUDP.datagramVia},
with their real address and the link as the flow's I{reply path}, and count against the same flow
table and per-source limits as the port's own visitors. The tunnel's replies to such a flow go
back over the link instead of out of this port.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface

from portal.forwarding.datagramwriter import DatagramWriter
from portal.forwarding.logthrottle import LogThrottle
from portal.forwarding.refusals import Refusals
from portal.forwarding.sources import sourceKey
from portal.wire.udpseal import MAX_FLOW_ID

#: The C{maxPacketSize} the caller must give C{listenUDP}, so that datagrams of any size arrive
#: whole.
MAX_PACKET_SIZE = 65535

#: How many sweep intervals make up the idle timeout; a flow is forgotten after this many
#: intervals in a row without a datagram.
SWEEPS_PER_TIMEOUT = 4

#: Seconds of clock time between two log events about refused new flows.
FLOW_LIMIT_LOG_INTERVAL = 10.0

#: The keys of L{PublicUDP.dropped}: why datagrams were dropped.
DROP_REASONS = (
    "too_many_flows",
    "too_many_flows_per_source",
    "flow_ids_exhausted",
    "unknown_flow",
    "send_failed",
    "stopped",
)

#: A visitor's address as flows are keyed: (host, port).
Address = tuple[str, int]


class IReplyPath(Interface):
    """
    Where the replies of a flow whose visitor came through another cluster member go: the member
    link it came over.
    """

    def send(payload: bytes, address: Address) -> bool:
        """
        Send a reply towards the visitor at C{address}.

        @return: Whether it was sent (a closed or congested link drops it).
        """


@attrs.define
class _Flow:
    """
    One visitor's flow.

    @ivar flowId: The flow's id.
    @ivar key: The visitor's (host, port).
    @ivar source: The visitor's source address as per-source limits count it (L{sourceKey}).
    @ivar address: The address replies are written to, as the visitor's first datagram came from.
    @ivar active: Whether a datagram went either way since the last sweep.
    @ivar idleSweeps: How many sweep intervals in a row have passed without a datagram.
    @ivar path: Where replies go instead of this port, for a visitor whose last datagram came over
        a member link (an L{IReplyPath}); L{None} for one that sent to this port.
    """

    flowId: int
    key: Address
    source: str
    address: tuple[Any, ...]
    active: bool = True
    idleSweeps: int = 0
    path: IReplyPath | None = None


class PublicUDP(DatagramProtocol):
    """
    The public UDP port of one lease: visitors' datagrams go to the tunnel tagged with a flow id,
    and the tunnel's replies go back to the flow's visitor.

    @ivar name: The lease's name, for log events.
    @ivar idleTimeout: Seconds without a datagram either way after which a flow is forgotten.
    @ivar maxFlows: Most flows live at once; datagrams from new visitors beyond them are dropped.
    @ivar maxFlowsPerSource: Most flows live at once from one source address (IPv4 /32, IPv6 /64),
        so that one source sending from many ports cannot take every flow.
    @ivar received: How many visitor datagrams were passed to the tunnel.
    @ivar sent: How many datagrams from the tunnel were written to visitors.
    @ivar dropped: How many datagrams, either way, were dropped, by reason (L{DROP_REASONS}):
        C{"too_many_flows"} and C{"flow_ids_exhausted"} for a new visitor's datagram when
        L{maxFlows} flows are live or every flow id has been used, C{"too_many_flows_per_source"}
        when its source address has L{maxFlowsPerSource} flows, C{"unknown_flow"} for a reply
        to a flow that is not live, C{"send_failed"} for a reply the socket (or the member link of
        a forwarded flow) refused, and
        C{"stopped"} for anything after L{stop} or while not listening.
    """

    _log = Logger()
    _writer: DatagramWriter | None = None

    def __init__(
        self,
        clock: IReactorTime,
        toTunnel: Callable[[int, bytes], None],
        *,
        name: str,
        idleTimeout: float = 60.0,
        maxFlows: int = 1024,
        maxFlowsPerSource: int = 64,
        onFlowClosed: Callable[[int], None] | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        """
        @param clock: The source of time for idle expiry and log rate limiting.
        @param toTunnel: Called with the flow id and the payload of every visitor datagram to
            forward; a new flow's visitor address is available from L{flowAddress}.
        @param name: The lease's name, for log events.
        @param idleTimeout: Seconds without a datagram either way after which a flow is
            forgotten.
        @param maxFlows: Most flows live at once.
        @param maxFlowsPerSource: Most flows live at once from one source address.
        @param refusals: Where new flows refused are counted by reason (C{udp_flows} over
            C{maxFlows}, C{udp_flows_per_source} over C{maxFlowsPerSource}); refusals for the
            source are logged there, the others here (both rate-limited).
        @param onFlowClosed: Called with the flow id of each flow forgotten for being idle, so
            the caller can tell the tunnel; not called for L{closeFlow} or L{stop}.
        @raise ValueError: If C{idleTimeout} is not a positive finite number or C{maxFlows} is
            less than 1.
        """
        if not (math.isfinite(idleTimeout) and idleTimeout > 0):
            raise ValueError(
                f"idle timeout must be a positive number of seconds, not {idleTimeout}"
            )
        if maxFlows < 1:
            raise ValueError(f"maxFlows must be at least 1, not {maxFlows}")
        if maxFlowsPerSource < 1:
            raise ValueError(f"maxFlowsPerSource must be at least 1, not {maxFlowsPerSource}")
        self.name = name
        self.maxFlowsPerSource = maxFlowsPerSource
        self._refusals = refusals
        self._bySource: dict[str, int] = {}
        self.idleTimeout = idleTimeout
        self.maxFlows = maxFlows
        self.received = 0
        self.sent = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._clock = clock
        self._toTunnel = toTunnel
        self._onFlowClosed = onFlowClosed
        self._byKey: dict[Address, _Flow] = {}
        self._byId: dict[int, _Flow] = {}
        self._nextFlowId = 1
        self._stopped = False
        self._sweeper = LoopingCall.withCount(self._sweep)
        self._sweeper.clock = clock
        # When the last "too many flows" event was logged, and refusals since.
        self._limitLog = LogThrottle(clock, FLOW_LIMIT_LOG_INTERVAL)

    @property
    def flows(self) -> int:
        """
        The number of live flows.
        """
        return len(self._byId)

    def flowAddress(self, flowId: int) -> Address | None:
        """
        Find a flow's visitor.

        @param flowId: A flow id.
        @return: The (host, port) of the flow's visitor, or C{None} if the flow is not live.
        """
        flow = self._byId.get(flowId)
        return None if flow is None else flow.key

    def datagramReceived(self, datagram: bytes, addr: tuple[Any, ...]) -> None:
        """
        Forward a visitor's datagram to the tunnel, opening a flow for a new visitor.

        @param datagram: The payload; an empty one is forwarded too.
        @param addr: The visitor's address, (host, port) or, for IPv6, possibly
            (host, port, flowinfo, scopeid); flows are keyed on (host, port).
        """
        if self._stopped:
            self.dropped["stopped"] += 1
            return
        key: Address = addr[:2]
        flow = self._byKey.get(key)
        if flow is None:
            flow = self._openFlow(key, addr)
            if flow is None:
                return
        else:
            flow.active = True
            flow.path = None
        self.received += 1
        self._toTunnel(flow.flowId, datagram)

    def datagramVia(self, datagram: bytes, addr: Address, path: IReplyPath) -> None:
        """
        Forward to the tunnel a visitor's datagram that another cluster member received on this
        port's number, exactly as L{datagramReceived} does (same flow table, same limits); the
        flow's replies go to C{path} until the visitor sends to this port directly.

        @param datagram: The payload.
        @param addr: The visitor's real (host, port), as the forwarding member saw it.
        @param path: The L{IReplyPath} the datagram came over.
        """
        if self._stopped:
            self.dropped["stopped"] += 1
            return
        flow = self._byKey.get(addr)
        if flow is None:
            flow = self._openFlow(addr, addr)
            if flow is None:
                return
        else:
            flow.active = True
        flow.path = path
        self.received += 1
        self._toTunnel(flow.flowId, datagram)

    @property
    def stopped(self) -> bool:
        """
        Whether L{stop} was called: the port takes no more datagrams.
        """
        return self._stopped

    def _openFlow(self, key: Address, addr: tuple[Any, ...]) -> _Flow | None:
        """
        Open a flow for a new visitor, unless flow ids are used up or too many flows are live.

        @param key: The visitor's (host, port).
        @param addr: The visitor's address as received.
        @return: The new flow, or C{None} if the datagram was dropped (and counted).
        """
        flowId = self._nextFlowId
        if flowId > MAX_FLOW_ID:
            self.dropped["flow_ids_exhausted"] += 1
            if self.dropped["flow_ids_exhausted"] == 1:
                self._log.error(
                    "UDP port for {name} has used every flow id; refusing all new visitors",
                    name=self.name,
                )
            return None
        if len(self._byId) >= self.maxFlows:
            self.dropped["too_many_flows"] += 1
            self._flowLimitReached(key)
            return None
        source = sourceKey(key[0])
        held = self._bySource.get(source, 0)
        if held >= self.maxFlowsPerSource:
            self.dropped["too_many_flows_per_source"] += 1
            self._sourceLimitReached(source)
            return None
        self._bySource[source] = held + 1
        self._nextFlowId = flowId + 1
        flow = _Flow(flowId, key, source, addr)
        self._byKey[key] = flow
        self._byId[flowId] = flow
        if not self._sweeper.running:
            self._sweeper.start(self.idleTimeout / SWEEPS_PER_TIMEOUT, now=False)
        return flow

    def _flowLimitReached(self, key: Address) -> None:
        """
        Log that a new visitor was refused for want of a flow, at most once every
        L{FLOW_LIMIT_LOG_INTERVAL} seconds; each event says how many were refused since the last.

        @param key: The refused visitor's (host, port).
        """
        if self._refusals is not None:
            self._refusals.count("udp_flows")
        held = self._limitLog.due()
        if held is None:
            return
        self._log.warn(
            "UDP port for {name} has {maxFlows} live flows, the most allowed; refused "
            "{refused} new visitor datagram(s), the latest from {host} port {port}",
            name=self.name,
            maxFlows=self.maxFlows,
            refused=held + 1,
            host=key[0],
            port=key[1],
        )

    def _sourceLimitReached(self, source: str) -> None:
        """
        Count and log (rate-limited) a new flow refused because its source has too many.

        @param source: The source address.
        """
        format = (
            "UDP port for {name}: refused a new flow from {source}, which has {maximum} flows, "
            "the most allowed per source address"
        )
        fields = {"name": self.name, "source": source, "maximum": self.maxFlowsPerSource}
        if self._refusals is not None:
            self._refusals.refuse("udp_flows_per_source", format, **fields)
            return
        held = self._limitLog.due("per_source")
        if held is not None:
            self._log.warn(format + " ({unlogged} more not logged)", unlogged=held, **fields)

    def _forget(self, flow: _Flow) -> None:
        """
        Remove a flow from the tables and its source's count.

        @param flow: A live flow.
        """
        del self._byId[flow.flowId]
        del self._byKey[flow.key]
        held = self._bySource.get(flow.source, 0) - 1
        if held > 0:
            self._bySource[flow.source] = held
        else:
            self._bySource.pop(flow.source, None)

    def fromTunnel(self, flowId: int, payload: bytes) -> bool:
        """
        Write the tunnel's datagram for a flow to the flow's visitor.

        @param flowId: The flow the tunnel named.
        @param payload: The payload; an empty one is written too.
        @return: Whether the datagram was written; if not, the drop was counted in L{dropped}.
        """
        transport = self.transport
        if self._stopped or transport is None:
            self.dropped["stopped"] += 1
            return False
        flow = self._byId.get(flowId)
        if flow is None:
            self.dropped["unknown_flow"] += 1
            return False
        flow.active = True
        path = flow.path
        if path is not None:
            if not path.send(payload, flow.key):
                self.dropped["send_failed"] += 1
                return False
            self.sent += 1
            return True
        writer = self._writer
        if writer is None or writer.port is not transport:
            writer = self._writer = DatagramWriter(transport)
        try:
            writer.write(payload, flow.address)
        except (OSError, MessageLengthError):
            self.dropped["send_failed"] += 1
            return False
        self.sent += 1
        return True

    def sendFailed(self, datagram: bytes, address: Any, error: BaseException) -> None:
        """
        A reply queued during a read burst could not be sent after all: count it as dropped
        instead of sent (L{portal.forwarding.udpbatch}).
        """
        self.sent -= 1
        self.dropped["send_failed"] += 1

    def closeFlow(self, flowId: int) -> bool:
        """
        Forget a flow the tunnel has forgotten; C{onFlowClosed} is not called.

        @param flowId: The flow id.
        @return: Whether the flow was live.
        """
        flow = self._byId.get(flowId)
        if flow is None:
            return False
        self._forget(flow)
        return True

    def _sweep(self, intervals: int) -> None:
        """
        Forget flows idle for L{SWEEPS_PER_TIMEOUT} sweep intervals and tell C{onFlowClosed}.

        @param intervals: How many sweep intervals passed since the last sweep: more than 1 when
            the reactor was late.
        """
        expired = []
        for flow in self._byId.values():
            if flow.active:
                flow.active = False
                flow.idleSweeps = 0
            else:
                flow.idleSweeps += intervals
                if flow.idleSweeps >= SWEEPS_PER_TIMEOUT:
                    expired.append(flow)
        for flow in expired:
            self._forget(flow)
        if self._onFlowClosed is not None:
            for flow in expired:
                try:
                    self._onFlowClosed(flow.flowId)
                except Exception:
                    self._log.failure(
                        "onFlowClosed failed for flow {flowId} of {name}",
                        flowId=flow.flowId,
                        name=self.name,
                    )
        # Only now: a callback may have opened a flow, or stopped us.
        if not self._byId and self._sweeper.running:
            self._sweeper.stop()

    def stop(self) -> None:
        """
        Forget every flow without calling C{onFlowClosed}, stop the sweep, and drop every datagram
        from now on.  The caller then stops listening.
        """
        self._stopped = True
        self._byKey.clear()
        self._byId.clear()
        self._bySource.clear()
        if self._sweeper.running:
            self._sweeper.stop()

    def stopProtocol(self) -> None:
        """
        The port stopped listening: L{stop}.
        """
        self.stop()
