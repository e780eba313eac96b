"""
The client endpoint for a TCP host and port: straight to an IP literal, through the resolver for a
name.

Twisted's C{HostnameEndpoint} hands even an IP literal to the resolver, which runs C{getaddrinfo} on
a thread of the reactor's pool and builds its connection attempts in C{Deferred}s: on the path of
every new visitor (the tunnel's connection to its target, each replacement data session to the
relay) that is a thread hand-off, and contention for the GIL with that thread, that a direct
C{connectTCP} does not need (issue 16's profile: about a tenth of the tunnel's time per connection,
and as much again waiting for the GIL in OpenSSL calls).

On a real reactor an IP literal's endpoint also connects without C{TCP4ClientEndpoint}'s wrappers
(a wrapping factory, a wrapping protocol between the transport and the protocol, a C{Deferred}),
which stay referenced by the connection for its whole life; and its transports are of their own
class (L{_LeanClient}), whose attributes fit the interpreter's shared instance keys, so that
registering a producer on one (every spliced connection does) does not turn its attributes into a
dictionary of their own: together about 1.6 KB per idle connection of a tunnel (issue 16).
"""

from __future__ import annotations

import socket
from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from os import strerror
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.python.failure import Failure

from portal.forwarding.writethrough import WriteThrough


class _LeanClient(WriteThrough, tcp.Client):
    """
    A client TCP transport that fires its connector's C{Deferred} once its protocol is connected.
    A class of its own: CPython shares the attribute keys of a class's instances, up to 30 names,
    and L{tcp.Client}'s table is filled by every kind of client connection of the process.

    It writes through (L{WriteThrough}), and connects to an IPv4 literal with fewer steps than
    L{tcp.Client}: the non-blocking C{connect} at once instead of on the reactor's next turn
    through a C{Deferred} chain, no longer registered for writing once it is connected
    (Twisted unregisters reading and writing, then registers reading again: five C{epoll_ctl}
    where three do), and its outcome read once from C{SO_ERROR}. Failures are still
    reported on a later turn, never from within C{connectTCP}.
    """

    def _finishInit(self, whenDone: Any, skt: Any, err: Any, reactor: Any) -> None:
        """
        Start connecting at once to an IPv4 literal; anything else the way L{tcp.Client} does.
        """
        base: Any = super()
        this: Any = self
        if whenDone is None or this._requiresResolution or len(this.addr) != 2:
            base._finishInit(whenDone, skt, err, reactor)
            return
        this._commonConnection.__init__(self, skt, None, reactor)
        this.realAddress = this.addr
        try:
            result = skt.connect_ex(this.realAddress)
        except OSError as e:
            result = e.args[0]
        if result in (EINPROGRESS, EWOULDBLOCK, EALREADY):
            this.doWrite = this.doRead = self._connectAnswered
            # Reading too, so that a refusal (EPOLLERR and EPOLLHUP with EPOLLIN) comes to
            # _connectAnswered, not to the reactor's lost-connection path.
            this.startReading()
            this.startWriting()
        elif result in (0, EISCONN):
            reactor.callLater(0, self._connected)
        else:
            reactor.callLater(
                0, this.failIfNotConnected, error.getConnectError((result, strerror(result)))
            )

    def _connectAnswered(self) -> None:
        """
        The socket is writable (or has an error): the connection attempt has its outcome.
        """
        this: Any = self
        if not hasattr(this, "connector"):
            return  # Already failed (timed out, cancelled).
        failed = this.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if failed:
            this.failIfNotConnected(error.getConnectError((failed, strerror(failed))))
            return
        self._connected()

    def _connected(self) -> None:
        """
        Connected: stop watching for writability, connect the protocol (which reads from now on).
        """
        this: Any = self
        if not hasattr(this, "connector") or this.connected:
            return
        this.__dict__.pop("doWrite", None)
        this.__dict__.pop("doRead", None)
        this.stopWriting()
        this._connectDone()

    def _connectDone(self) -> None:
        """
        Connect the protocol, then tell whoever waits for the connection.
        """
        # Twisted's TCP internals are untyped.
        base: Any = super()
        base._connectDone()
        connector = self.connector
        assert isinstance(connector, _LeanConnector)
        connector.connected(self)


class _ClientFactoryFor:
    """
    What a connector needs of its factory, for any L{IProtocolFactory}: protocols are built, and
    the factory started and stopped, by it; the connection's outcome goes to the connector's
    C{Deferred} instead.
    """

    __slots__ = ("_factory",)

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory

    def doStart(self) -> None:
        """
        Start the factory.
        """
        self._factory.doStart()

    def doStop(self) -> None:
        """
        Stop the factory.
        """
        self._factory.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        """
        @return: The factory's protocol.
        """
        return self._factory.buildProtocol(addr)

    def startedConnecting(self, connector: Any) -> None:
        """
        Nothing to do.
        """

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """
        Nothing to do: the connector fails its C{Deferred}.
        """

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """
        Nothing to do: the protocol is told.
        """


class _LeanConnector(tcp.Connector):
    """
    A connector making L{_LeanClient}s and reporting the outcome to a C{Deferred}.

    @ivar whenConnected: Fires with the protocol once connected, fails if the attempt does; set to
        L{None} once it fired.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.whenConnected: Deferred[Any] | None = Deferred(self._cancel)

    def _makeTransport(self) -> tcp.Client:
        """
        @return: A new L{_LeanClient}.
        """
        client: Any = _LeanClient
        made: tcp.Client = client(self.host, self.port, self.bindAddress, self, self.reactor)
        return made

    def connected(self, transport: _LeanClient) -> None:
        """
        The protocol is connected (unless it closed at once).
        """
        d, self.whenConnected = self.whenConnected, None
        if d is not None:
            d.callback(transport.protocol)

    def connectionFailed(self, reason: Failure) -> None:
        """
        The attempt failed (refused, timed out, cancelled).
        """
        d, self.whenConnected = self.whenConnected, None
        super().connectionFailed(reason)
        if d is not None:
            d.errback(reason)

    def _cancel(self, d: Deferred[Any]) -> None:
        """
        Stop the attempt when the C{Deferred} is cancelled (as Twisted's TCP endpoints do).
        """
        self.whenConnected = None
        connector: Any = self
        d.errback(error.ConnectingCancelledError(connector.getDestination()))
        self.stopConnecting()


def _leanConnect(
    reactor: PosixReactorBase, host: str, port: int, timeout: float, factory: IProtocolFactory
) -> Deferred[Any]:
    """
    Connect C{factory}'s protocol straight to C{host}:C{port} with a L{_LeanConnector}.

    @return: A L{Deferred} firing with the protocol once connected.
    """
    connector = _LeanConnector(host, port, _ClientFactoryFor(factory), timeout, None, reactor)
    d = connector.whenConnected
    assert d is not None
    connector.connect()
    return d


class _LeanConnect:
    """
    For a TCP client endpoint: connect with L{_leanConnect} on a real reactor, as the endpoint
    class it is mixed with does otherwise.
    """

    def __init__(self, reactor: Any, host: str, port: int, timeout: float) -> None:
        base: Any = super()
        base.__init__(reactor, host, port, timeout=timeout)
        self._leanArgs = (reactor, host, port, timeout)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        @return: A L{Deferred} firing with the connected protocol.
        """
        reactor, host, port, timeout = self._leanArgs
        if isinstance(reactor, PosixReactorBase):
            return _leanConnect(reactor, host, port, timeout, protocolFactory)
        base: Any = super()
        connecting: Deferred[Any] = base.connect(protocolFactory)
        return connecting


class _LeanTCP4Endpoint(_LeanConnect, TCP4ClientEndpoint):
    """
    L{TCP4ClientEndpoint} connecting with L{_leanConnect} on a real reactor.
    """


class _LeanTCP6Endpoint(_LeanConnect, TCP6ClientEndpoint):
    """
    L{TCP6ClientEndpoint} connecting with L{_leanConnect} on a real reactor.
    """


def tcpEndpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    A client endpoint to C{host}:C{port}.

    @param reactor: The reactor (TCP, time; name resolution for a hostname).
    @param host: An IPv4 or IPv6 literal (connected to directly), or a hostname (resolved by
        L{HostnameEndpoint}, which tries each address it gets).
    @param port: The TCP port.
    @param timeout: Seconds a connection attempt may take.
    @return: A L{TCP4ClientEndpoint} or L{TCP6ClientEndpoint} for an IP literal (without their
        wrappers on a real reactor), else a L{HostnameEndpoint}.
    """
    if isIPAddress(host):
        return _LeanTCP4Endpoint(reactor, host, port, timeout)
    if isIPv6Address(host):
        return _LeanTCP6Endpoint(reactor, host, port, timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)
