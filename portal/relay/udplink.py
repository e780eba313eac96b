"""
The holding member's end of a UDP member link (docs/cluster.md, I{UDP visitors}): the datagrams
another member received on a UDP lease's port, forwarded here in frames
(L{portal.wire.udpframes}) with each visitor's real address.

Each frame becomes a datagram from that address into the lease's public UDP port
(L{portal.relay.udp.PublicUDP.datagramVia}), so forwarded visitors share the port's flow table and
per-source limits with its own; the link is the flow's reply path (L{IReplyPath}), and the tunnel's
replies go back over it as frames. A frame that is not one closes the link, with a log event and a
refusal counted; the flows it carried are left to idle out, and no other flow is touched. While
the link's socket cannot take more (the forwarding member reads slowly), replies are dropped, as a
congested UDP path would drop them. A link with no frame either way for L{LINK_IDLE_TIMEOUT}
seconds is closed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from portal.relay.router import Router
from portal.relay.udp import Address, IReplyPath, PublicUDP
from portal.wire.udpframes import FrameError, FrameReader, encodeFrame

#: Seconds a UDP member link may carry nothing either way before it is closed (the relay's own
#: flows idle out after L{portal.relay.udpmode.RELAY_FLOW_IDLE}).
LINK_IDLE_TIMEOUT = 300.0

#: The refusal reason (C{portal_refusals_total{reason=...}}) of a UDP link closed for a bad frame.
BAD_FRAME = "member_link_frame"


def countDrop(router: Router, reason: str) -> None:
    """
    Count a datagram a UDP member link dropped, in the router's counters (C{/metrics}).

    @param reason: A short label, part of the counter's name (C{udp_link_dropped_<reason>}).
    """
    name = f"udp_link_dropped_{reason}"
    router.counters[name] = router.counters.get(name, 0) + 1


class DropWhilePaused:
    """
    The producer side of a UDP member link's end (registered with the link's transport): while the
    link's socket is full, or closing, C{paused} is true and the end drops datagrams (counted)
    rather than queue them.

    @ivar paused: Whether datagrams are dropped now.
    """

    paused = False

    def pauseProducing(self) -> None:
        """
        The link's socket is full: drop datagrams until it drains.
        """
        self.paused = True

    def resumeProducing(self) -> None:
        """
        The link's socket drained.
        """
        self.paused = False

    def stopProducing(self) -> None:
        """
        The link's connection is closing.
        """
        self.paused = True


@implementer(IReplyPath, IPushProducer)
class HolderUDPLink(DropWhilePaused, TimeoutMixin):
    """
    The holding member's end of one UDP member link, for one lease's public UDP port.

    @ivar paused: Whether the link's socket asked for no more writes for now.
    @ivar closed: Whether the link is gone.
    """

    _log = Logger()
    paused = False
    closed = False

    def __init__(
        self,
        router: Router,
        transport: Any,
        public: PublicUDP,
        member: str,
        idleTimeout: float = LINK_IDLE_TIMEOUT,
    ) -> None:
        """
        @param router: The relay's routing state (clock, counters, refusals).
        @param transport: The link's connection.
        @param public: The lease's public UDP port.
        @param member: The forwarding member's name, for logs.
        @param idleTimeout: Seconds without a frame either way before the link is closed.
        """
        self._router = router
        self._transport = transport
        self._public = public
        self._member = member
        self._reader = FrameReader()
        self.callLater = router.clock.callLater  # type: ignore[method-assign, assignment]
        transport.registerProducer(self, True)
        self.setTimeout(idleTimeout)

    def dataReceived(self, data: bytes) -> None:
        """
        Hand every complete frame to the lease's port as a datagram from the visitor it names.

        @param data: Bytes read from the link.
        """
        if self.closed:
            return
        try:
            frames = self._reader.feed(data)
        except FrameError as e:
            self._badFrame(e.reason)
            return
        if not frames:
            return
        self.resetTimeout()
        public = self._public
        for frame in frames:
            if public.stopped:
                self._log.info(
                    "closing the UDP link from member {member}: the lease's port {name} closed",
                    member=self._member,
                    name=public.name,
                )
                self.close()
                return
            public.datagramVia(frame.payload, (frame.host, frame.port), self)

    def send(self, payload: bytes, address: Address) -> bool:
        """
        Send a reply of the tunnel's to the visitor at C{address}, over the link.

        @return: Whether it was written (not while the link is closed or congested).
        """
        if self.closed:
            countDrop(self._router, "closed")
            return False
        if self.paused:
            countDrop(self._router, "congested")
            return False
        try:
            frame = encodeFrame(address[0], address[1], payload)
        except FrameError:
            countDrop(self._router, "unencodable")
            return False
        self._transport.write(frame)
        self.resetTimeout()
        return True

    def _badFrame(self, reason: str) -> None:
        """
        Close the link on a frame that is not one, with a refusal counted and logged.
        """
        self._router.refusals.refuse(
            BAD_FRAME,
            "closed the UDP link from member {member} for {name}: {reason}",
            member=self._member,
            name=self._public.name,
            reason=reason,
        )
        self.close()

    def close(self) -> None:
        """
        Close the link; its flows' replies are dropped from now on.
        """
        if not self.closed:
            self.closed = True
            self.setTimeout(None)
            # A registered producer would keep a paused connection open.
            self._transport.unregisterProducer()
            self._transport.loseConnection()

    def timeoutConnection(self) -> None:
        """
        Nothing crossed the link for the idle timeout: close it.
        """
        self._log.info(
            "closing the idle UDP link from member {member} for {name}",
            member=self._member,
            name=self._public.name,
        )
        self.close()

    def connectionLost(self) -> None:
        """
        The link's connection is gone.
        """
        self.closed = True
        self.setTimeout(None)
