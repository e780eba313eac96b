"""
The tunnel's UDP flow table: one local UDP socket per visitor flow.

In UDP mode the relay forwards each public visitor's datagrams to the tunnel tagged with a flow id,
one per visitor address.  The tunnel gives every flow its own local UDP socket, connected to the
local service, so that the service sees one peer per visitor and its replies can be told apart and
sent back, tagged with the right flow id.

A connected UDP socket accepts datagrams only from the address it is connected to (the kernel
filters the rest), and learns from an ICMP port-unreachable that nothing listens there.  Twisted's
select reactor then calls C{connectionRefused()}; its epoll and poll reactors close the socket
instead.  Either way the refusal is counted and the flow kept, so that datagrams reach the service
once it comes up: a flow whose socket was closed opens a new one for its next datagram.

A flow with no datagram either way for C{idleTimeout} seconds is closed.  Datagrams only reset a
per-flow counter, so keeping a flow alive costs no allocation and no clock reading; a periodic sweep
every C{idleTimeout / 4} seconds counts the sweeps each flow has been silent for.  A flow is
therefore closed by the first sweep at least C{idleTimeout} seconds after its last datagram: after
between C{idleTimeout} and C{1.25 * idleTimeout} seconds of silence.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from portal.forwarding.boundedreads import listenUDP
from portal.forwarding.logthrottle import LogThrottle
from portal.forwarding.sources import sourceKey
from portal.forwarding.udpbuffers import enlargeBuffers

#: The C{maxPacketSize} of every flow's socket: the largest UDP datagram, so no reply is truncated.
MAX_PACKET_SIZE = 65535

#: Sweeps per idle timeout; a flow is closed once it has been silent through one more than this.
SWEEPS_PER_TIMEOUT = 4

#: Every reason L{FlowTable.dropped} counts.
DROP_REASONS = (
    "too_many_flows",
    "too_many_flows_per_source",
    "refused",
    "stopped",
    "open_failed",
    "write_failed",
    "address_refused",
    "unannounced",
)
#: With address rules, datagrams held per flow until the relay's C{FlowOpened} says who sent them.
MAX_HELD_DATAGRAMS = 8


def localInterface(host: str) -> str:
    """
    Choose the interface a flow's socket binds to, to reach a target address.

    A loopback target is reached from the loopback address of its family, so the socket is not
    reachable from other hosts; any other target from the wildcard address of its family, so the
    system picks the source address of the route to it.

    @param host: The target's IPv4 or IPv6 address literal.
    @return: C{"127.0.0.1"}, C{"::1"}, C{"0.0.0.0"} or C{"::"}.
    @raise ValueError: If C{host} is not an IP address literal.
    """
    address = ipaddress.ip_address(host)
    if address.version == 4:
        return "127.0.0.1" if address.is_loopback else "0.0.0.0"
    return "::1" if address.is_loopback else "::"


class _Flow(DatagramProtocol):
    """
    The protocol of one flow's local socket: hands the target's replies to the table.

    @ivar flowId: The flow's id.
    @ivar port: The flow's socket, listening and connected, or C{None} while it has none: before
        it is opened, and after the reactor lost it.
    @ivar silentSweeps: How many idle sweeps have passed since the flow's last datagram.
    @ivar closed: Whether the flow has been closed; a closed flow ignores its socket.
    @ivar source: The visitor's source address (L{sourceKey}), once the relay has said it.
    """

    port: IUDPTransport | None = None
    source: str | None = None

    def __init__(self, table: FlowTable, flowId: int) -> None:
        """
        @param table: The table the flow belongs to.
        @param flowId: The flow's id.
        """
        self._table = table
        self.flowId = flowId
        self.silentSweeps = 0
        self.closed = False

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        Send a reply from the target back to the flow's visitor.

        @param datagram: The reply; may be empty.
        @param addr: The target's address (the socket is connected, so it accepts no other).
        """
        if not self.closed:
            self._table._reply(self, datagram)

    def sendFailed(self, datagram: bytes, address: Any, error: BaseException) -> None:
        """
        A datagram to the target queued during a read burst could not be sent after all
        (L{portal.forwarding.udpbatch}): drop it as a failed write.
        """
        self._table._drop(
            "write_failed", self.flowId, "could not send to the local service: {error}", error
        )

    def connectionRefused(self) -> None:
        """
        Note that the target refused a datagram: nothing listens on its port.
        """
        if not self.closed:
            self._table._refused(self)

    def stopProtocol(self) -> None:
        """
        Note that the flow's socket closed; unless the table closed it, the reactor lost it.
        """
        if not self.closed:
            self._table._lost(self)


class FlowTable:
    """
    The tunnel's UDP flows, each with its own local socket connected to the local service.

    @ivar target: The local service's (IP address literal, port).
    @ivar interface: The interface every flow's socket binds to, from L{localInterface}.
    @ivar idleTimeout: Seconds of silence, either way, after which a flow is closed.
    @ivar maxFlows: The most flows open at once; datagrams of new flows beyond it are dropped.
    @ivar maxFlowsPerSource: The most flows open at once from one visitor source address (IPv4
        /32, IPv6 /64), as the relay reports it in L{noteSource}; a flow beyond it is closed.
    @ivar received: How many datagrams from visitors were given to L{deliver}, dropped or not.
    @ivar sent: How many replies from the local service were passed to C{send}.
    @ivar dropped: How many datagrams were dropped, by reason: C{"too_many_flows"} (a new flow while
        L{maxFlows} are open), C{"too_many_flows_per_source"} (a flow whose source already has
        L{maxFlowsPerSource}), C{"refused"} (the service's port refused a datagram, or the
        reactor closed the flow's socket; the flow is kept), C{"stopped"} (after L{stop}), C{"open_failed"} (the flow's socket could not be opened
        or connected), C{"write_failed"} (the socket refused a datagram, such as one too long),
        and with address rules C{"address_refused"} (a flow whose visitor they refuse) and
        C{"unannounced"} (held for a flow the relay had not announced, beyond L{MAX_HELD_DATAGRAMS}
        or the L{maxFlows} flows held).
    @cvar logInterval: Least seconds between two log events for the same drop reason; the drops in
        between are counted in the next event's C{suppressed} field.
    """

    _log = Logger()
    logInterval: float = 60.0

    def __init__(
        self,
        reactor: Any,
        target: tuple[str, int],
        send: Callable[[int, bytes], None],
        *,
        idleTimeout: float = 60.0,
        maxFlows: int = 1024,
        maxFlowsPerSource: int = 64,
        onFlowClosed: Callable[[int], None] | None = None,
        screen: Callable[[str], str | None] | None = None,
    ) -> None:
        """
        @param reactor: The reactor (UDP and time) the flows' sockets and the idle sweep use.
        @param target: The local service's (IP address literal, port); host names must be resolved
            first.  IPv4 and IPv6 addresses are accepted.
        @param send: Called with a flow id and a reply to send it back to the flow's visitor.
        @param idleTimeout: Seconds of silence, either way, after which a flow is closed.
        @param maxFlows: The most flows open at once.
        @param maxFlowsPerSource: The most flows open at once from one source address.
        @param onFlowClosed: Called with a flow id when the flow is closed for being idle or for
            its source's limit, so the relay can forget it; not called for L{close} or L{stop}.
        @param screen: The address rules' judgement of a visitor address (L{None} to serve it, else
            why not). With it, a flow's datagrams reach the service only once L{announce} has
            admitted the flow's visitor; before that they are held (a few), after a refusal
            dropped.
        @raise ValueError: If the target's host is not an IP address literal, its port is not
            1-65535, C{idleTimeout} is not positive or C{maxFlows} is less than 1.
        """
        host, port = target
        self.interface = localInterface(host)
        if not 1 <= port <= 65535:
            raise ValueError(f"target port must be between 1 and 65535, not {port}")
        if not idleTimeout > 0:
            raise ValueError(f"idle timeout must be positive, not {idleTimeout}")
        if maxFlows < 1:
            raise ValueError(f"maxFlows must be at least 1, not {maxFlows}")
        if maxFlowsPerSource < 1:
            raise ValueError(f"maxFlowsPerSource must be at least 1, not {maxFlowsPerSource}")
        self.maxFlowsPerSource = maxFlowsPerSource
        self._bySource: dict[str, int] = {}
        # Sources the relay named for flows whose first datagram has not come yet (the source
        # travels over the control session, the datagram usually over UDP), oldest first.
        self._earlySources: dict[int, str] = {}
        self.target = (host, port)
        self.idleTimeout = idleTimeout
        self.maxFlows = maxFlows
        self.received = 0
        self.sent = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._reactor = reactor
        self._send = send
        self._onFlowClosed = onFlowClosed
        self._flows: dict[int, _Flow] = {}
        self._stopped = False
        self._sweeper = LoopingCall.withCount(self._sweep)
        self._sweeper.clock = reactor
        # While a sweep runs, the sweeper is neither stopped nor started (callbacks may close and
        # open flows); the sweep stops it at its end if no flow is left.
        self._sweeping = False
        # Drop events, at most one per reason every logInterval seconds.
        self._dropLog = LogThrottle(reactor, self.logInterval)
        self._screen = screen
        self._admitted: set[int] = set()
        self._refusedFlows: OrderedDict[int, None] = OrderedDict()
        self._held: OrderedDict[int, list[bytes]] = OrderedDict()

    @property
    def flows(self) -> int:
        """
        The number of open flows.
        """
        return len(self._flows)

    def socketFor(self, flowId: int) -> IUDPTransport | None:
        """
        Find a flow's local socket.

        @param flowId: The flow's id.
        @return: The flow's socket, or C{None} if the flow is not open or has lost its socket
            since its last datagram.
        """
        flow = self._flows.get(flowId)
        return None if flow is None else flow.port

    def deliver(self, flowId: int, payload: bytes) -> None:
        """
        Send a visitor's datagram to the local service, on the flow's socket, opening the flow if
        it is new and a socket if it has none.

        @param flowId: The visitor's flow id.
        @param payload: The datagram; may be empty.
        """
        self.received += 1
        if self._screen is not None and flowId not in self._admitted:
            self._hold(flowId, payload)
            return
        self._deliver(flowId, payload)

    def _deliver(self, flowId: int, payload: bytes) -> None:
        """
        Send a datagram of a flow that may reach the service; see L{deliver}.
        """
        flow = self._flows.get(flowId)
        if flow is None:
            flow = self._open(flowId)
            if flow is None:
                return
        port = flow.port
        if port is None:
            port = self._listen(flow)
            if port is None:
                return
        flow.silentSweeps = 0
        try:
            port.write(payload, None)
        except (MessageLengthError, OSError) as e:
            self._drop("write_failed", flowId, "could not send to the local service: {error}", e)

    def noteSource(self, flowId: int, host: str) -> None:
        """
        The relay says which visitor address a flow comes from: count it against its source, and
        close the flow (telling C{onFlowClosed}) if the source already has L{maxFlowsPerSource}.

        @param flowId: The flow's id; it may not be open yet (its first datagram may come later).
        @param host: The visitor's address literal.
        """
        source = sourceKey(host)
        flow = self._flows.get(flowId)
        if flow is None:
            if not self._stopped:
                self._earlySources[flowId] = source
                while len(self._earlySources) > self.maxFlows:
                    del self._earlySources[next(iter(self._earlySources))]
            return
        if flow.source is not None:
            return
        if not self._admitSource(flowId, source):
            del self._flows[flowId]
            self._forget(flowId)
            self._closeFlow(flow)
            if self._onFlowClosed is not None:
                self._onFlowClosed(flowId)
            return
        flow.source = source

    def _admitSource(self, flowId: int, source: str) -> bool:
        """
        Count a flow against its source, unless the source has L{maxFlowsPerSource} (the drop is
        then counted and logged).

        @return: Whether the flow may stay.
        """
        held = self._bySource.get(source, 0)
        if held >= self.maxFlowsPerSource:
            self._drop(
                "too_many_flows_per_source",
                flowId,
                "new UDP flow from {source} refused: it has {maxFlows} flows open, the most "
                "allowed per source address",
                source=source,
                maxFlows=self.maxFlowsPerSource,
            )
            return False
        self._bySource[source] = held + 1
        return True

    def announce(self, flowId: int, host: str) -> None:
        """
        The relay says who flow C{flowId} is: with address rules, serve the flow (its held
        datagrams go to the service now) or refuse it (they, and all later ones, are dropped).

        @param flowId: The flow's id.
        @param host: The visitor's IP address.
        """
        if self._screen is None:
            return
        held = self._held.pop(flowId, [])
        reason = self._screen(host)
        if reason is None:
            self._admitted.add(flowId)
            for payload in held:
                self._deliver(flowId, payload)
            return
        self._refusedFlows[flowId] = None
        while len(self._refusedFlows) > self.maxFlows:
            # A forgotten refusal makes its flow unannounced again: still never delivered.
            self._refusedFlows.popitem(last=False)
        self.dropped["address_refused"] += len(held)
        suppressed = self._dropLog.due("refused visitor")
        if suppressed is not None:
            self._log.warn(
                "UDP flow {flowId}: refused visitor {host}: {why} ({suppressed} similar refusals "
                "not logged)",
                flowId=flowId,
                host=host,
                why=reason,
                suppressed=suppressed,
            )

    def _hold(self, flowId: int, payload: bytes) -> None:
        """
        Keep a datagram of a flow not admitted yet, or drop it if the flow was refused or too much
        is held.
        """
        if flowId in self._refusedFlows:
            self.dropped["address_refused"] += 1
            return
        queue = self._held.get(flowId)
        if queue is None:
            if len(self._held) >= self.maxFlows:
                _, oldest = self._held.popitem(last=False)
                self.dropped["unannounced"] += len(oldest)
            queue = self._held[flowId] = []
        if len(queue) >= MAX_HELD_DATAGRAMS:
            self._drop(
                "unannounced", flowId, "datagram dropped: the relay has not said who sent it"
            )
            return
        queue.append(payload)

    def _forget(self, flowId: int) -> None:
        """
        Forget what the address rules decided about a flow that has ended.
        """
        self._admitted.discard(flowId)
        self._refusedFlows.pop(flowId, None)
        self._held.pop(flowId, None)

    def close(self, flowId: int) -> None:
        """
        Close a flow the relay has forgotten, without calling C{onFlowClosed}.

        @param flowId: The flow's id; closing a flow that is not open does nothing.
        """
        self._forget(flowId)
        flow = self._flows.pop(flowId, None)
        if flow is not None:
            self._closeFlow(flow)

    def stop(self) -> None:
        """
        Close every flow, without calling C{onFlowClosed}, and stop the idle sweep; every later
        datagram is dropped.
        """
        self._stopped = True
        self._earlySources.clear()
        self._admitted.clear()
        self._refusedFlows.clear()
        self._held.clear()
        flows = list(self._flows.values())
        self._flows.clear()
        for flow in flows:
            self._closeFlow(flow)

    def _open(self, flowId: int) -> _Flow | None:
        """
        Open a new flow, unless the table is stopped or full; its socket is opened by
        L{_listen}.

        @param flowId: The new flow's id.
        @return: The flow, or C{None} if the datagram was dropped (and counted).
        """
        if self._stopped:
            self.dropped["stopped"] += 1
            return None
        if len(self._flows) >= self.maxFlows:
            self._drop(
                "too_many_flows",
                flowId,
                "new UDP flow refused: {maxFlows} flows are open, the most allowed",
                maxFlows=self.maxFlows,
            )
            return None
        source = self._earlySources.pop(flowId, None)
        if source is not None and not self._admitSource(flowId, source):
            return None
        flow = _Flow(self, flowId)
        flow.source = source
        if self._listen(flow) is None:
            self._forgetSource(flow)
            return None
        self._flows[flowId] = flow
        if not self._sweeper.running:
            sweeping = self._sweeper.start(self.idleTimeout / SWEEPS_PER_TIMEOUT, now=False)
            sweeping.addErrback(lambda failure: self._log.failure("idle sweep failed", failure))
        return flow

    def _listen(self, flow: _Flow) -> IUDPTransport | None:
        """
        Open a flow's socket, connected to the target.

        @param flow: The flow, which has no socket.
        @return: The socket, also set as C{flow.port}, or C{None} if it could not be opened (the
            datagram is dropped and counted).
        """
        try:
            port = cast(
                IUDPTransport,
                listenUDP(
                    self._reactor, 0, flow, interface=self.interface, maxPacketSize=MAX_PACKET_SIZE
                ),
            )
        except CannotListenError as e:
            self._drop("open_failed", flow.flowId, "could not open a UDP socket: {error}", e)
            return None
        enlargeBuffers(port)
        try:
            port.connect(*self.target)
        except OSError as e:
            # Closing it calls stopProtocol: the flow must not take that for a lost socket.
            closed, flow.closed = flow.closed, True
            port.stopListening()
            flow.closed = closed
            self._drop("open_failed", flow.flowId, "could not open a UDP socket: {error}", e)
            return None
        flow.port = port
        return port

    def _closeFlow(self, flow: _Flow) -> None:
        """
        Close the socket of a flow already removed from the table, and stop the idle sweep if no
        flow is left.

        @param flow: The flow.
        """
        flow.closed = True
        self._forgetSource(flow)
        if flow.port is not None:
            flow.port.stopListening()
        if not self._flows and self._sweeper.running and not self._sweeping:
            self._sweeper.stop()

    def _forgetSource(self, flow: _Flow) -> None:
        """
        Stop counting a flow against its source.

        @param flow: A flow leaving the table.
        """
        source, flow.source = flow.source, None
        if source is None:
            return
        held = self._bySource.get(source, 0) - 1
        if held > 0:
            self._bySource[source] = held
        else:
            self._bySource.pop(source, None)

    def _reply(self, flow: _Flow, datagram: bytes) -> None:
        """
        Send a reply from the local service back to the flow's visitor.

        @param flow: The flow whose socket received the reply.
        @param datagram: The reply.
        """
        flow.silentSweeps = 0
        self.sent += 1
        self._send(flow.flowId, datagram)

    def _refused(self, flow: _Flow) -> None:
        """
        Count and log a datagram the local service's port refused; the flow stays open, as the
        service may come up.

        @param flow: The flow whose socket was refused.
        """
        self._drop(
            "refused",
            flow.flowId,
            "local UDP service at {host}:{port} refused a datagram (is it listening?)",
            host=self.target[0],
            port=self.target[1],
        )

    def _lost(self, flow: _Flow) -> None:
        """
        Forget the socket of a flow the reactor closed, keeping the flow: its next datagram opens
        a new socket.

        Twisted's epoll and poll reactors close a connected UDP socket when the local service's
        port refuses a datagram (the ICMP error makes the socket report an error, not data to
        read), where the select reactor calls C{connectionRefused()} instead; so a lost socket
        is counted and logged as a refusal.

        @param flow: The flow.
        """
        flow.port = None
        self._drop(
            "refused",
            flow.flowId,
            "local UDP service at {host}:{port} refused a datagram (is it listening?); "
            "the flow's socket was closed",
            host=self.target[0],
            port=self.target[1],
        )

    def _sweep(self, count: int) -> None:
        """
        Count silent sweeps for every flow, and close those silent for longer than
        C{idleTimeout}, telling C{onFlowClosed}.

        @param count: How many sweep intervals have passed since the last sweep: more than 1 when
            the reactor was too busy to sweep on time.
        """
        self._sweeping = True
        try:
            expired = []
            for flow in self._flows.values():
                flow.silentSweeps += count
                if flow.silentSweeps > SWEEPS_PER_TIMEOUT:
                    expired.append(flow)
            for flow in expired:
                # An earlier callback may have closed or replaced this flow.
                if self._flows.get(flow.flowId) is flow:
                    self._expire(flow)
        finally:
            self._sweeping = False
        if not self._flows and self._sweeper.running:
            self._sweeper.stop()

    def _expire(self, flow: _Flow) -> None:
        """
        Close an idle flow and tell C{onFlowClosed}.

        @param flow: The flow, still in the table.
        """
        del self._flows[flow.flowId]
        self._forget(flow.flowId)
        self._closeFlow(flow)
        self._log.debug("UDP flow {flowId} closed after being idle", flowId=flow.flowId)
        if self._onFlowClosed is not None:
            try:
                self._onFlowClosed(flow.flowId)
            except Exception:
                self._log.failure("onFlowClosed failed for UDP flow {flowId}", flowId=flow.flowId)

    def _drop(
        self,
        reason: str,
        flowId: int,
        format: str,
        error: BaseException | None = None,
        **fields: Any,
    ) -> None:
        """
        Count a dropped datagram and log it, unless an event for the same reason was logged less
        than L{logInterval} seconds ago.

        @param reason: The key in L{dropped}.
        @param flowId: The flow the datagram belonged to.
        @param format: The event's format string; the event also has the fields C{flowId},
            C{reason}, C{suppressed} (the drops for this reason not logged since the last event)
            and, if C{error} is given, C{error}.
        @param error: The exception that caused the drop, if any.
        @param fields: More fields for the event.
        """
        self.dropped[reason] += 1
        suppressed = self._dropLog.due(reason)
        if suppressed is None:
            return
        if error is not None:
            fields["error"] = error
        self._log.warn(
            "UDP flow {flowId}: " + format + " ({suppressed} similar drops not logged)",
            flowId=flowId,
            reason=reason,
            suppressed=suppressed,
            **fields,
        )
