"""
Tests for L{portal.forwarding.sealedstream}: raw TCP mode's sealed stream as a Twisted protocol wrapper,
and how a splice treats a broken one.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from portal.forwarding.sealedstream import SealedConnection, sealedStream
from portal.forwarding.splice import (
    BrokenStream,
    IHalfCloseableTransport,
    SpliceProtocol,
    splice,
)
from portal.wire.seal import Direction
from portal.wire.streamseal import StreamOpener, StreamSealer, streamKeys
from tests.test_tunnel_data import captureLogs

_SECRET = b"t" * 32
_NONCE = b"n" * 16
_R2T = Direction.RELAY_TO_TUNNEL
_T2R = Direction.TUNNEL_TO_RELAY


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    An inner protocol that records what its sealed transport hands it.

    @ivar received: Payloads in order.
    @ivar readClosed: Whether the far end's end frame arrived (C{readConnectionLost}).
    @ivar writeClosed: Whether C{writeConnectionLost} was called.
    @ivar lost: The reason given to C{connectionLost}, once called.
    """

    readClosed = False
    writeClosed = False
    lost: Failure | None = None

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        """
        Record a payload.
        """
        self.received.append(data)

    def readConnectionLost(self) -> None:
        """
        Record the far end's half-close.
        """
        self.readClosed = True

    def writeConnectionLost(self) -> None:
        """
        Record the end of our own direction.
        """
        self.writeClosed = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Record the end of the connection.
        """
        self.lost = reason


def connectedPair() -> tuple[Recorder, Recorder, SealedConnection, SealedConnection, IOPump]:
    """
    Connect a relay end and a tunnel end of one sealed stream in memory.

    @return: The relay's inner protocol, the tunnel's, their two wrappers and the pump.
    """
    relayInner, tunnelInner = Recorder(), Recorder()
    relay = sealedStream(relayInner, _SECRET, _NONCE, _R2T, 7)
    tunnel = sealedStream(tunnelInner, _SECRET, _NONCE, _T2R, 7)
    _, _, pump = connectedServerAndClient(lambda: relay, lambda: tunnel, greet=False)
    pump.flush()
    return relayInner, tunnelInner, relay, tunnel, pump


def wrapped(inner: Protocol) -> tuple[SealedConnection, StringTransport, StreamSealer]:
    """
    Connect the tunnel end of a sealed stream to a string transport.

    @return: The wrapper, its transport and a sealer of the relay's direction, to feed it frames.
    """
    sealed = sealedStream(inner, _SECRET, _NONCE, _T2R, 7)
    transport = StringTransportWithDisconnection()
    transport.protocol = sealed
    sealed.makeConnection(transport)
    relayToTunnel = streamKeys(_SECRET, _NONCE)[0]
    return sealed, transport, StreamSealer(relayToTunnel, _R2T)


class SealedConnectionTests(SynchronousTestCase):
    """
    Bytes, half-closes, closes and errors through a pair of sealed ends.
    """

    def test_interfaces(self) -> None:
        """
        The wrapper is a transport, consumer and push producer that can half-close.
        """
        sealed, _, _ = wrapped(Recorder())
        for interface in (ITransport, IConsumer, IPushProducer, IHalfCloseableTransport):
            self.assertTrue(verifyObject(interface, sealed))

    def test_bothWays(self) -> None:
        """
        What each inner protocol writes reaches the other, and only ciphertext is on the wire.
        """
        relayInner, tunnelInner, relay, tunnel, pump = connectedPair()
        underlying = relay.transport
        assert underlying is not None
        written: list[bytes] = []
        original = underlying.write
        underlying.write = lambda data: (written.append(data), original(data))  # type: ignore[method-assign]
        relay.write(b"secret request")
        tunnel.writeSequence([b"secret ", b"reply"])
        pump.flush()
        self.assertEqual(b"".join(tunnelInner.received), b"secret request")
        self.assertEqual(b"".join(relayInner.received), b"secret reply")
        self.assertNotIn(b"secret", b"".join(written))

    def test_halfClose(self) -> None:
        """
        A half-close reaches the far end as C{readConnectionLost} while the other direction keeps
        flowing; once both directions have ended the connection closes cleanly on both ends.
        """
        relayInner, tunnelInner, relay, tunnel, pump = connectedPair()
        relay.write(b"request")
        relay.loseWriteConnection()
        pump.flush()
        self.assertTrue(relayInner.writeClosed)
        self.assertTrue(tunnelInner.readClosed)
        self.assertIsNone(tunnelInner.lost)
        tunnel.write(b"reply")
        pump.flush()
        self.assertEqual(relayInner.received, [b"reply"])
        tunnel.loseWriteConnection()
        pump.flush()
        self.assertTrue(relayInner.readClosed)
        for inner in (relayInner, tunnelInner):
            assert inner.lost is not None
            self.assertFalse(inner.lost.check(BrokenStream))

    def test_writeAfterEndDropped(self) -> None:
        """
        Writes after this direction's end are dropped, as TCP drops writes after a close.
        """
        relayInner, tunnelInner, relay, tunnel, pump = connectedPair()
        relay.loseWriteConnection()
        relay.write(b"late")
        relay.loseWriteConnection()
        pump.flush()
        self.assertEqual(tunnelInner.received, [])
        self.assertTrue(tunnelInner.readClosed)

    def test_loseConnectionEndsCleanly(self) -> None:
        """
        A full close sends the end frame first: the far end sees a half-close, then a clean close,
        not a truncation.
        """
        relayInner, tunnelInner, relay, tunnel, pump = connectedPair()
        relay.write(b"all of it")
        relay.loseConnection()
        pump.flush()
        self.assertEqual(tunnelInner.received, [b"all of it"])
        self.assertTrue(tunnelInner.readClosed)
        assert tunnelInner.lost is not None and relayInner.lost is not None
        self.assertFalse(tunnelInner.lost.check(BrokenStream))
        self.assertFalse(relayInner.lost.check(BrokenStream))

    def test_abortIsTruncation(self) -> None:
        """
        An abort sends no end frame: the far end reports a truncation and its inner protocol loses
        the connection with L{BrokenStream}.
        """
        events = captureLogs(self)
        relayInner, tunnelInner, relay, tunnel, pump = connectedPair()
        relay.write(b"part")
        pump.flush()
        relay.abortConnection()
        pump.flush()
        self.assertEqual(tunnelInner.received, [b"part"])
        assert tunnelInner.lost is not None
        self.assertTrue(tunnelInner.lost.check(BrokenStream))
        self.assertIn("before the end of the stream", tunnelInner.lost.getErrorMessage())
        self.assertTrue(
            any("sealed stream {stream} closed" in str(e.get("log_format")) for e in events)
        )

    def test_tamperedAborts(self) -> None:
        """
        A changed byte on the wire aborts the connection with a log event; the payload of the changed
        frame is never handed on.
        """
        events = captureLogs(self)
        inner = Recorder()
        sealed, transport, sealer = wrapped(inner)
        frame = bytearray(sealer.seal(b"transfer 100"))
        frame[-1] ^= 1
        sealed.dataReceived(bytes(frame))
        self.assertEqual(inner.received, [])
        self.assertFalse(transport.connected)
        assert inner.lost is not None
        self.assertTrue(inner.lost.check(BrokenStream))
        self.assertIn("failed authentication", inner.lost.getErrorMessage())
        self.assertEqual(
            [e["reason"] for e in events if "sealed stream" in str(e.get("log_format"))],
            ["frame 0 failed authentication"],
        )

    def test_replayAborts(self) -> None:
        """
        A frame received twice aborts the connection after the first copy.
        """
        inner = Recorder()
        sealed, transport, sealer = wrapped(inner)
        frame = sealer.seal(b"once")
        sealed.dataReceived(frame + frame)
        self.assertEqual(inner.received, [b"once"])
        self.assertFalse(transport.connected)

    def test_dataAfterEndAborts(self) -> None:
        """
        Bytes after the far end's end frame abort the connection.
        """
        inner = Recorder()
        sealed, transport, sealer = wrapped(inner)
        sealed.dataReceived(sealer.end() + b"more")
        self.assertTrue(inner.readClosed)
        self.assertFalse(transport.connected)

    def test_eofBeforeEndIsTruncation(self) -> None:
        """
        The connection's reading side ending before the end frame aborts it as a truncation.
        """
        inner = Recorder()
        sealed, transport, sealer = wrapped(inner)
        sealed.dataReceived(sealer.seal(b"half"))
        sealed.readConnectionLost()
        self.assertFalse(transport.connected)
        assert inner.lost is not None
        self.assertTrue(inner.lost.check(BrokenStream))

    def test_eofAfterEndCloses(self) -> None:
        """
        The connection's reading side ending after the end frame closes it cleanly.
        """
        inner = Recorder()
        sealed, transport, sealer = wrapped(inner)
        sealed.dataReceived(sealer.seal(b"whole") + sealer.end())
        sealed.readConnectionLost()
        self.assertFalse(transport.connected)
        assert inner.lost is not None
        self.assertFalse(inner.lost.check(BrokenStream))

    def test_pausedHoldsFrames(self) -> None:
        """
        While the inner protocol has paused its transport, frames (the end frame too) are held and
        the connection is not read; resuming hands them on in order.
        """
        inner = Recorder()
        sealed, transport, sealer = wrapped(inner)
        sealed.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        sealed.dataReceived(sealer.seal(b"one") + sealer.seal(b"two") + sealer.end())
        self.assertEqual(inner.received, [])
        self.assertFalse(inner.readClosed)
        sealed.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(inner.received, [b"one", b"two"])
        self.assertTrue(inner.readClosed)

    def test_producerPassedThrough(self) -> None:
        """
        A producer registered on the wrapper is registered on the connection, and unregistering twice
        (as a splice end may) is harmless.
        """
        sealed, transport, _ = wrapped(Recorder())
        producer = StringTransport()
        sealed.registerProducer(producer, True)
        self.assertIs(transport.producer, producer)
        sealed.unregisterProducer()
        sealed.unregisterProducer()
        self.assertIsNone(transport.producer)

    def test_addresses(self) -> None:
        """
        The wrapper's addresses are the connection's.
        """
        sealed, transport, _ = wrapped(Recorder())
        self.assertEqual(sealed.getPeer(), transport.getPeer())
        self.assertEqual(sealed.getHost(), transport.getHost())


class BrokenSpliceTests(SynchronousTestCase):
    """
    A splice aborts, instead of closing, the other side of a stream that broke.
    """

    def splicedToSealed(self) -> tuple[StringTransport, SealedConnection, StreamSealer]:
        """
        Splice a visitor on a string transport to the inner end of a sealed stream.

        @return: The visitor's transport, the wrapper and a sealer feeding it.
        """
        visitor = SpliceProtocol()
        visitorTransport = StringTransportWithDisconnection()
        visitorTransport.protocol = visitor
        visitor.makeConnection(visitorTransport)
        end = SpliceProtocol()
        sealed, _, sealer = wrapped(end)
        splice(visitor, end)
        return visitorTransport, sealed, sealer

    def test_truncationAbortsOtherSide(self) -> None:
        """
        A truncated stream aborts the visitor (a reset, not a clean end), after what arrived intact
        was written to it.
        """
        visitorTransport, sealed, sealer = self.splicedToSealed()
        aborted: list[bool] = []
        visitorTransport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        sealed.dataReceived(sealer.seal(b"partial"))
        sealed.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(visitorTransport.value(), b"partial")
        self.assertEqual(aborted, [True])

    def test_cleanEndClosesOtherSide(self) -> None:
        """
        A stream that ended with its end frame closes the visitor cleanly.
        """
        visitorTransport, sealed, sealer = self.splicedToSealed()
        aborted: list[bool] = []
        visitorTransport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        sealed.dataReceived(sealer.seal(b"whole") + sealer.end())
        sealed.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(visitorTransport.value(), b"whole")
        self.assertEqual(aborted, [])
        self.assertFalse(visitorTransport.connected)


class OpenerSharedTests(SynchronousTestCase):
    """
    Both ends derive the same keys: what one end's wrapper seals, the far end's opener opens.
    """

    def test_tunnelSealsForRelay(self) -> None:
        """
        The tunnel's wrapper seals under the tunnel-to-relay key of the stream.
        """
        sealed, transport, _ = wrapped(Recorder())
        sealed.write(b"up")
        tunnelToRelay = streamKeys(_SECRET, _NONCE)[1]
        self.assertEqual(
            StreamOpener(tunnelToRelay, _T2R).openFrame(transport.value()),
            (b"up", len(transport.value())),
        )
