"""
The relay's side of multi-hop chains: after a L{portal.wire.control.Hop} command, the control session's
connection (inside this relay's TLS) is spliced to a TCP connection the relay opened to an allowed
destination, usually the next relay's control port.

The bytes forwarded are the tunnel's TLS to the next relay: this relay sees ciphertext only, and the
next relay sees a connection from this one. Each hop is logged when it opens (peer, identity,
destination, and the local address of the outbound connection) and when it closes (bytes each way and
duration), never with payload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from portal.forwarding.quietconnect import connectQuietly
from portal.forwarding.splice import SpliceProtocol, noDelay, pauseReading, splice
from portal.wire.control import HopLimit, HopRefused, HopUnreachable

#: Seconds the relay waits for a hop's outbound TCP connection.
HOP_CONNECT_TIMEOUT = 10.0
#: Hops one identity may have open (or opening) through a relay at once, by default.
MAX_HOPS_PER_IDENTITY = 256


class HopDestinationError(ValueError):
    """
    An C{--allow-hop} destination is not C{HOST:PORT}.
    """


def parseDestination(text: str) -> tuple[str, int]:
    """
    Parse an C{--allow-hop} destination, C{HOST:PORT} or C{[IPV6]:PORT}.

    @param text: The destination as given.
    @return: The host, lowercased, and the port.
    @raise HopDestinationError: When malformed.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            sep = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise HopDestinationError(f"--allow-hop {text!r}: expected HOST:PORT or [IPV6]:PORT")
    return host.lower(), int(port)


def formatDestination(host: str, port: int) -> str:
    """
    @return: C{host:port}, with an IPv6 host in brackets.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(address: IAddress | None) -> str:
    """
    @return: C{host:port} of a TCP address, or its C{str()}.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return formatDestination(host, port)


@attrs.define
class _HopRecord:
    """
    What is logged about one hop.

    @ivar number: The hop's number on this relay, to pair its log lines.
    @ivar peer: Who asked for it (the tunnel, or the previous relay of a chain).
    @ivar identity: The asking identity's id.
    @ivar destination: C{host:port} of the destination.
    @ivar started: The clock time the hop was asked for.
    @ivar up: Bytes forwarded from the peer to the destination.
    @ivar down: Bytes forwarded from the destination to the peer.
    """

    number: int
    peer: str
    identity: str
    destination: str
    started: float
    up: int = 0
    down: int = 0
    ended: bool = False


class HopOutbound(SpliceProtocol):
    """
    The relay's TCP connection to a hop's destination.
    """

    record: _HopRecord | None = None
    #: The destination closed before the hop was spliced.
    closedEarly = False

    def __init__(self, forwarder: HopForwarder) -> None:
        super().__init__()
        self._forwarder = forwarder

    def connectionMade(self) -> None:
        """
        Forward small writes at once, and read nothing until the hop is spliced.
        """
        assert self.transport is not None
        noDelay(self.transport)
        pauseReading(self.transport)

    def dataReceived(self, data: bytes) -> None:
        """
        Count and forward bytes from the destination.
        """
        if self.record is not None:
            self.record.down += len(data)
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Close the other side and end the hop.
        """
        super().connectionLost(reason)
        if self.record is not None:
            self._forwarder.ended(self.record)
        else:
            self.closedEarly = True


class HopInbound(SpliceProtocol):
    """
    The hop's incoming side: the control session's connection after the protocol switch.
    """

    def __init__(self, forwarder: HopForwarder, outbound: HopOutbound, record: _HopRecord) -> None:
        super().__init__()
        self._forwarder = forwarder
        self._outbound = outbound
        self.record = record

    def connectionMade(self) -> None:
        """
        The switch is done: splice to the outbound connection and log the hop.
        """
        outbound = self._outbound
        outbound.record = self.record
        assert outbound.transport is not None
        splice(self, outbound)
        self._forwarder.opened(self.record, _describe(outbound.transport.getHost()))
        if outbound.closedEarly:
            # splice() closed this side already; its connectionLost may come later.
            self._forwarder.ended(self.record)

    def dataReceived(self, data: bytes) -> None:
        """
        Count and forward bytes from the peer.
        """
        self.record.up += len(data)
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Close the other side and end the hop.
        """
        super().connectionLost(reason)
        self._forwarder.ended(self.record)


class HopForwarder:
    """
    Opens hops for one relay: checks the allow list and the per-identity limit, connects to the
    destination with a timeout, and counts and logs each hop.

    @ivar allowed: The destinations hops may go to, as C{(host, port)} with the host lowercased and
        compared as written (names are not resolved to match addresses).
    @ivar maxPerIdentity: Hops one identity may have open or opening at once.
    @ivar connectTimeout: Seconds to wait for the outbound connection.
    @ivar counters: C{opened}, C{refused} and C{failed} hop counts, for metrics.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        allowed: Iterable[tuple[str, int]],
        maxPerIdentity: int = MAX_HOPS_PER_IDENTITY,
        connectTimeout: float = HOP_CONNECT_TIMEOUT,
        endpointFor: Callable[[str, int], IStreamClientEndpoint] | None = None,
    ) -> None:
        """
        @param clock: Time, for timeouts and durations.
        @param allowed: The allowed destinations (see L{parseDestination}).
        @param maxPerIdentity: Hops one identity may have open or opening at once.
        @param connectTimeout: Seconds to wait for the outbound connection.
        @param endpointFor: Builds the endpoint to a destination; by default a L{HostnameEndpoint}
            on C{clock}, which must then also be the reactor.
        """
        self._clock = clock
        self.allowed = frozenset((host.lower(), port) for host, port in allowed)
        self.maxPerIdentity = maxPerIdentity
        self.connectTimeout = connectTimeout
        self._endpointFor = endpointFor or (
            lambda host, port: HostnameEndpoint(clock, host, port, timeout=connectTimeout)
        )
        self._perIdentity: dict[str, int] = {}
        self._next = 0
        self.counters = {"opened": 0, "refused": 0, "failed": 0}

    def open(
        self, peer: IAddress | None, identity: str, host: str, port: int
    ) -> Deferred[HopInbound]:
        """
        Check and start one hop: connect to C{host}:C{port}.

        @param peer: The address the request came from.
        @param identity: The verified identity id of the tunnel asking.
        @param host: The destination host, as asked.
        @param port: The destination port.
        @return: A L{Deferred} firing with the protocol to switch the control session to, once the
            destination has accepted, or failing with L{HopUnreachable}.
        @raise HopRefused: When this relay forwards no hops, or not to this destination.
        @raise HopLimit: When the identity has L{maxPerIdentity} hops already.
        """
        destination = formatDestination(host, port)
        shortId = identity[:12]
        if not self.allowed:
            self._refused(peer, shortId, destination, "this relay does not forward hops")
            raise HopRefused("this relay does not forward hops")
        if (host.lower(), port) not in self.allowed:
            reason = f"destination {destination} is not allowed on this relay"
            self._refused(peer, shortId, destination, reason)
            raise HopRefused(reason)
        count = self._perIdentity.get(identity, 0)
        if count >= self.maxPerIdentity:
            reason = f"this identity has {count} hops open through this relay, the most allowed"
            self._refused(peer, shortId, destination, reason)
            raise HopLimit(reason)
        self._perIdentity[identity] = count + 1
        self._next += 1
        record = _HopRecord(
            self._next, _describe(peer), identity, destination, self._clock.seconds()
        )
        outbound = HopOutbound(self)
        d = connectQuietly(self._endpointFor(host, port), outbound)
        d.addTimeout(self.connectTimeout, self._clock)

        def connected(_: object) -> HopInbound:
            return HopInbound(self, outbound, record)

        def failed(failure: Failure) -> Failure:
            self._release(record)
            self.counters["failed"] += 1
            if failure.check(TimeoutError):
                reason = f"no connection to {destination} within {self.connectTimeout:g} s"
            elif failure.check(CancelledError):
                return failure
            else:
                reason = f"cannot connect to {destination}: {failure.getErrorMessage()}"
            self._log.info(
                "hop {number} failed: {peer} ({identity}) -> {destination}: {reason}",
                number=record.number,
                peer=record.peer,
                identity=shortId,
                destination=destination,
                reason=reason,
            )
            return Failure(HopUnreachable(reason))

        opened: Deferred[HopInbound] = d.addCallbacks(connected, failed)
        return opened

    def _refused(self, peer: IAddress | None, shortId: str, destination: str, reason: str) -> None:
        """
        Log and count a refused hop.
        """
        self.counters["refused"] += 1
        self._log.info(
            "hop refused: {peer} ({identity}) -> {destination}: {reason}",
            peer=_describe(peer),
            identity=shortId,
            destination=destination,
            reason=reason,
        )

    def opened(self, record: _HopRecord, local: str) -> None:
        """
        A hop is spliced: log it.

        @param record: The hop.
        @param local: C{host:port} of the outbound connection's own end.
        """
        self.counters["opened"] += 1
        self._log.info(
            "hop {number} opened: {peer} ({identity}) -> {destination} from {local}",
            number=record.number,
            peer=record.peer,
            identity=record.identity[:12],
            destination=record.destination,
            local=local,
        )

    def ended(self, record: _HopRecord) -> None:
        """
        One side of a spliced hop closed (the splice closes the other): log it once and give the
        identity's slot back.

        @param record: The hop.
        """
        if record.ended:
            return
        self._release(record)
        self._log.info(
            "hop {number} closed: {peer} ({identity}) -> {destination}: {up} bytes up, "
            "{down} bytes down, {duration:.1f} s",
            number=record.number,
            peer=record.peer,
            identity=record.identity[:12],
            destination=record.destination,
            up=record.up,
            down=record.down,
            duration=self._clock.seconds() - record.started,
        )

    def abandon(self, hop: HopInbound) -> None:
        """
        A hop was connected but the control session cannot switch to it (it closed meanwhile): close
        the outbound connection and give the slot back.

        @param hop: The unconnected incoming side.
        """
        self._release(hop.record)
        transport = hop._outbound.transport
        if transport is not None:
            transport.loseConnection()

    def _release(self, record: _HopRecord) -> None:
        """
        Give the identity's slot back, once.
        """
        if record.ended:
            return
        record.ended = True
        left = self._perIdentity.get(record.identity, 0) - 1
        if left > 0:
            self._perIdentity[record.identity] = left
        else:
            self._perIdentity.pop(record.identity, None)

    @property
    def openCount(self) -> int:
        """
        The hops open or opening through this relay, all identities together.
        """
        return sum(self._perIdentity.values())

    def openFor(self, identity: str) -> int:
        """
        @return: The hops C{identity} has open or opening through this relay.
        """
        return self._perIdentity.get(identity, 0)
