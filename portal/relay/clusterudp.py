"""
UDP visitors across a relay cluster, the forwarding member's side (docs/cluster.md, I{UDP
visitors}): every member binds every UDP port whose lease another member holds live
(L{portal.relay.clusterports.ClusterPorts} does the binding), and relays its datagrams there.

Each such port has at most one member link to the holding member at a time (L{UDPLinkClient}),
opened on the port's first datagram and attached like every member link (L{MemberLinkClient}, a
header naming the port as C{udpPort}). Every visitor datagram crosses it as a frame naming the
visitor (L{portal.wire.udpframes}); the holder's replies come back the same way and are sent to
the visitor from the port's own socket, so the visitor sees the answer from the address it wrote
to. The forwarding member keeps no flow table: the holder applies its flow table and per-source
limits to the visitors' real addresses.

Everything is bounded. While the link connects, at most L{MAX_QUEUED_FRAMES} frames
(L{MAX_QUEUED_BYTES} bytes) wait; once it is up, a datagram the link's socket has no room for is
dropped; another link to a port is opened at most every L{LINK_RETRY} seconds; a link idle for
L{portal.relay.udplink.LINK_IDLE_TIMEOUT} seconds is closed; a bad frame from the holder closes
the link. Every drop is counted (C{udp_link_dropped_<reason>}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import DatagramProtocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.datagramwriter import DatagramWriter
from portal.relay.cluster import Member, PortClaim
from portal.relay.memberlink import MemberLinkClient, MemberLinks
from portal.relay.udplink import BAD_FRAME, LINK_IDLE_TIMEOUT, DropWhilePaused, countDrop
from portal.trust.identity import identityId
from portal.trust.names import leaseHostname
from portal.trust.relayaddress import ConfigError
from portal.wire.memberlink import MemberHeader
from portal.wire.udpframes import Frame, FrameError, FrameReader, encodeFrame

#: Most frames waiting while a link connects; more are dropped.
MAX_QUEUED_FRAMES = 64
#: Most bytes of frames waiting while a link connects; more are dropped.
MAX_QUEUED_BYTES = 256 * 1024
#: Least seconds between two links opened for one port (a holder that refuses or cannot be
#: reached is not asked again for every datagram).
LINK_RETRY = 1.0


@implementer(IPushProducer)
class UDPLinkClient(DropWhilePaused, MemberLinkClient):
    """
    The forwarding member's end of the UDP link for one port: frames queued while it attaches,
    then written as they come; frames from the holder handed to the port's socket.

    @ivar memberId: The holding member's id.
    @ivar closed: Whether the link is gone (a new one must be opened).
    @ivar paused: Whether the link's socket asked for no more writes for now.
    """

    _log = Logger()
    closed = False
    paused = False

    def __init__(
        self,
        forwarder: ForwardedUDPPort,
        links: MemberLinks,
        member: Member,
        header: MemberHeader,
        idleTimeout: float = LINK_IDLE_TIMEOUT,
    ) -> None:
        """
        @param forwarder: The port whose datagrams the link carries.
        @param links: The member links.
        @param member: The holding member.
        @param header: The link's header (naming the port as C{udpPort}).
        @param idleTimeout: Seconds without a frame either way before the link is closed.
        """
        super().__init__(links, member, header)
        self.memberId = member.id
        self._forwarder = forwarder
        self._idleTimeout = idleTimeout
        self._queue: list[bytes] = []
        self._queued = 0
        self._reader = FrameReader()
        self.attached.addCallbacks(self._up, self._attachFailed)

    def sendFrame(self, frame: bytes) -> str | None:
        """
        Send (or, while attaching, queue) a visitor's datagram as a frame.

        @return: L{None} when sent or queued; otherwise why it was dropped.
        """
        if self.closed:
            return "closed"
        if not self._attachedYet:
            if (
                len(self._queue) >= MAX_QUEUED_FRAMES
                or self._queued + len(frame) > MAX_QUEUED_BYTES
            ):
                return "queue_full"
            self._queue.append(frame)
            self._queued += len(frame)
            return None
        if self.paused:
            return "congested"
        assert self.transport is not None
        self.transport.write(frame)
        self.resetTimeout()
        return None

    def _up(self, _: object) -> None:
        """
        The holder acknowledged the link: write what waited, read frames from now on.
        """
        if self.closed:
            return
        transport = cast(IConsumer, self.transport)
        transport.registerProducer(self, True)
        self.setTimeout(self._idleTimeout)
        queued, self._queue, self._queued = self._queue, [], 0
        if queued:
            transport.write(b"".join(queued))
        early = self.takePending()
        if early:
            self._frames(early)

    def _attachFailed(self, failure: Failure) -> None:
        """
        The holder refused the link or could not be reached: drop what waited.
        """
        self._log.warn(
            "could not open a UDP link for port {port} to member {member}: {error}",
            port=self._header.udpPort,
            member=self._member.nodeName,
            error=failure.getErrorMessage(),
        )
        self._closed()

    def connectFailed(self, failure: Failure) -> None:
        """
        The connection to the holder failed (or timed out) before the link began.
        """
        if not self.attached.called:
            self.attached.errback(failure)

    def unsplicedDataReceived(self, data: bytes) -> None:
        """
        Once attached, read the holder's frames; before, the attach (magic, nonce, ACK).
        """
        if self._attachedYet:
            self._frames(data)
            return
        super().unsplicedDataReceived(data)

    def _frames(self, data: bytes) -> None:
        """
        Send the holder's replies to their visitors; close the link on a frame that is not one.
        """
        if self.closed:
            return
        try:
            frames = self._reader.feed(data)
        except FrameError as e:
            self._links.router.refusals.refuse(
                BAD_FRAME,
                "closed the UDP link for port {port} to member {member}: {reason}",
                port=self._header.udpPort,
                member=self._member.nodeName,
                reason=e.reason,
            )
            self.close()
            return
        if frames:
            self.resetTimeout()
            for frame in frames:
                self._forwarder.reply(frame)

    def close(self) -> None:
        """
        Close the link (its queue is dropped); the port opens another on its next datagram.
        """
        if self.closed:
            return
        self._closed()
        transport = self.transport
        if transport is not None:
            cast(IConsumer, transport).unregisterProducer()
            transport.loseConnection()

    def _closed(self) -> None:
        """
        Mark the link gone, count what waited as dropped, and tell the port.
        """
        if self.closed:
            return
        self.closed = True
        self.setTimeout(None)
        router = self._links.router
        for _ in self._queue:
            countDrop(router, "link_failed")
        self._queue, self._queued = [], 0
        self._forwarder.linkLost(self)

    def timeoutConnection(self) -> None:
        """
        Before the ACK: the holder is too slow (the attach fails). After: the link is idle.
        """
        if not self._attachedYet:
            super().timeoutConnection()
            return
        self._log.info(
            "closing the idle UDP link for port {port} to member {member}",
            port=self._header.udpPort,
            member=self._member.nodeName,
        )
        self.close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The link's connection is gone; say so when the holder closed an attached link (it
        refused the port, or the lease's port closed there).
        """
        super().connectionLost(reason)
        if self._attachedYet and not self.closed:
            self._log.info(
                "member {member} closed the UDP link for port {port}",
                member=self._member.nodeName,
                port=self._header.udpPort,
            )
        self._closed()


class ForwardedUDPPort(DatagramProtocol):
    """
    A UDP port whose lease another member holds: its datagrams go there over a UDP link, and the
    replies that come back are sent to their visitors from this port.

    @ivar port: The port number.
    @ivar link: The current link to the holding member, while there is one.
    @ivar forwarded: Visitor datagrams handed to a link.
    @ivar replied: Replies sent to visitors.
    """

    _log = Logger()
    _writer: DatagramWriter | None = None
    link: UDPLinkClient | None = None

    def __init__(
        self,
        links: MemberLinks,
        port: int,
        holding: Callable[[int], PortClaim | None],
        idleTimeout: float = LINK_IDLE_TIMEOUT,
    ) -> None:
        """
        @param links: The member links (router, directory, connections to members).
        @param port: The port number.
        @param holding: Returns the record of a port whose lease is live on another member (or
            L{None}).
        @param idleTimeout: Seconds a link may carry nothing before it is closed.
        """
        self._links = links
        self.port = port
        self._holding = holding
        self._idleTimeout = idleTimeout
        self._retryAt = float("-inf")
        self.forwarded = 0
        self.replied = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        Frame a visitor's datagram and send it to the holding member, opening the link first.

        @param datagram: The payload.
        @param addr: The visitor's address.
        """
        router = self._links.router
        link = self.link
        if link is None:
            link = self._open()
            if link is None:
                return
        try:
            frame = encodeFrame(addr[0], addr[1], datagram)
        except FrameError:
            countDrop(router, "unencodable")
            return
        dropped = link.sendFrame(frame)
        if dropped is not None:
            countDrop(router, dropped)
            return
        self.forwarded += 1
        router.counters["udp_forwarded"] = router.counters.get("udp_forwarded", 0) + 1

    def _open(self) -> UDPLinkClient | None:
        """
        Open a link to the member holding the port's lease now, unless one was opened less than
        L{LINK_RETRY} seconds ago.

        @return: The new link, or L{None} when there is none (the drop is counted).
        """
        links = self._links
        router = links.router
        now = router.clock.seconds()
        if now < self._retryAt:
            countDrop(router, "retry_wait")
            return None
        claim = self._holding(self.port)
        member = None if claim is None else links.directory.member(claim.member)
        if claim is None or member is None:
            countDrop(router, "not_live")
            return None
        try:
            endpoint = links.endpointFor(member)
        except ConfigError as e:
            countDrop(router, "link_failed")
            self._log.warn(
                "member {member} has a bad address: {error}", member=member.nodeName, error=str(e)
            )
            return None
        self._retryAt = now + LINK_RETRY
        me = links.directory.me
        header = MemberHeader(
            # The relay's identity, not the member id (a worker's has a suffix): the holder checks
            # that the id is the key's.
            identityId(me.publicKey),
            me.publicKey,
            leaseHostname(claim.name, router.tunnelDomain),
            "",
            0,
            udpPort=self.port,
        )
        link = self.link = UDPLinkClient(self, links, member, header, self._idleTimeout)
        connecting = connectProtocol(endpoint, link)
        connecting.addTimeout(router.limits.attachTimeout, router.clock)
        connecting.addErrback(link.connectFailed)
        self._log.info(
            "opening a UDP link for port {port} to member {member}",
            port=self.port,
            member=member.nodeName,
        )
        return link

    def checkHolder(self) -> None:
        """
        Close the link when the port's lease is no longer live on the member it goes to (the next
        datagram opens one to the new holder).
        """
        link = self.link
        if link is None:
            return
        claim = self._holding(self.port)
        if claim is None or claim.member != link.memberId:
            link.close()

    def linkLost(self, link: UDPLinkClient) -> None:
        """
        A link closed or failed.
        """
        if self.link is link:
            self.link = None

    def reply(self, frame: Frame) -> None:
        """
        Send the holder's reply to its visitor from this port.

        @param frame: The reply and the visitor's address.
        """
        router = self._links.router
        transport = self.transport
        if transport is None:
            countDrop(router, "stopped")
            return
        writer = self._writer
        if writer is None or writer.port is not transport:
            writer = self._writer = DatagramWriter(transport)
        try:
            writer.write(frame.payload, (frame.host, frame.port))
        except (OSError, MessageLengthError, ValueError):
            countDrop(router, "send_failed")
            return
        self.replied += 1
        router.counters["udp_forward_replies"] = router.counters.get("udp_forward_replies", 0) + 1

    def sendFailed(self, datagram: bytes, address: Any, error: BaseException) -> None:
        """
        A reply queued during a read burst could not be sent after all
        (L{portal.forwarding.udpbatch}): count it as dropped instead of replied.
        """
        router = self._links.router
        self.replied -= 1
        router.counters["udp_forward_replies"] = router.counters.get("udp_forward_replies", 1) - 1
        countDrop(router, "send_failed")

    def stopProtocol(self) -> None:
        """
        The port stopped listening: close the link.
        """
        if self.link is not None:
            self.link.close()
