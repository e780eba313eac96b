"""
Member-to-member links of a relay cluster: a visitor that arrives at this member for a lease another
member holds is forwarded there, still encrypted (docs/cluster.md; framing in
L{portal.wire.memberlink}).

On the receiving member the visitor waits paused while L{MemberLinks.forward} connects to the holding
member's control port and proves this member's identity; the two connections are then joined, in the
kernel where possible. On the holding member, L{MemberVisitor} checks the proof and then serves the
forwarded connection like a visitor of its own public port, with the visitor's real address; a link
that names a UDP port carries datagram frames instead, handed to L{HolderUDPLink}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from portal.forwarding.connlimit import vouchFor
from portal.forwarding.kernelsplice import joinEnds
from portal.forwarding.splice import SpliceProtocol, noDelay, pauseReading
from portal.forwarding.tcpendpoint import tcpEndpoint
from portal.relay.cluster import ClusterDirectory, ICluster, Member
from portal.relay.etcd import EtcdError, EtcdUnavailable
from portal.relay.handoff import HandoffSender
from portal.relay.leaseports import PortLease
from portal.relay.public import VisitorProtocol
from portal.relay.router import Router
from portal.relay.store import ClaimsUnavailable, ILeaseClaims
from portal.relay.udplink import HolderUDPLink
from portal.trust.identity import Identity, identityId
from portal.trust.relayaddress import ConfigError, parseHostPort
from portal.wire.attach import StreamHeader
from portal.wire.clienthello import INTERNAL_ERROR, UNRECOGNIZED_NAME
from portal.wire.handoff import Handoff
from portal.wire.memberlink import (
    ACK,
    MAGIC,
    NONCE_LENGTH,
    MemberHeader,
    MemberLinkError,
    checkMemberHeader,
    encodeMemberHeader,
    pairKey,
    parseMemberHeader,
)


class MemberLinkFailed(Exception):
    """
    The holding member refused the link, or did not answer in time.
    """


class MemberLinkClient(SpliceProtocol, TimeoutMixin):
    """
    The forwarding member's end of a member link: magic, the holder's nonce, the signed header,
    the holder's ACK; then it is spliced to the waiting visitor.

    @ivar attached: Fires with this protocol once the holder acknowledged the header.
    """

    _attachedYet = False

    def __init__(self, links: MemberLinks, member: Member, header: MemberHeader) -> None:
        super().__init__()
        self._links = links
        self._member = member
        self._header = header
        self._buffer = b""
        self._nonce: bytes | None = None
        self.attached: Deferred[MemberLinkClient] = Deferred()
        self.callLater = links.router.clock.callLater  # type: ignore[method-assign, assignment]

    def connectionMade(self) -> None:
        """
        Announce a member link and start the attach timer.
        """
        assert self.transport is not None
        noDelay(self.transport)
        self.transport.write(MAGIC)
        self.setTimeout(self._links.router.limits.attachTimeout)

    def unsplicedDataReceived(self, data: bytes) -> None:
        """
        Read the holder's nonce, answer with the header, then wait for the ACK.
        """
        if self._attachedYet:
            super().unsplicedDataReceived(data)
            return
        self._buffer += data
        if self._nonce is None:
            if len(self._buffer) < NONCE_LENGTH:
                return
            self._nonce, self._buffer = self._buffer[:NONCE_LENGTH], self._buffer[NONCE_LENGTH:]
            key = self._links.keyFor(self._member.publicKey)
            assert self.transport is not None
            self.transport.write(
                encodeMemberHeader(key, self._member.id, self._nonce, self._header)
            )
        if not self._buffer:
            return
        if self._buffer[:1] != ACK:
            self._fail(MemberLinkFailed("the holding member sent no ACK"))
            return
        rest, self._buffer = self._buffer[1:], b""
        self._attachedYet = True
        self.setTimeout(None)
        if rest:
            super().unsplicedDataReceived(rest)
        self.attached.callback(self)

    def _fail(self, reason: Exception) -> None:
        self.setTimeout(None)
        if not self.attached.called:
            self.attached.errback(reason)
        assert self.transport is not None
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """
        The holding member did not answer in time.
        """
        self._fail(MemberLinkFailed("the holding member did not attach in time"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Fail the attach if it was pending.
        """
        self.setTimeout(None)
        if not self.attached.called:
            self.attached.errback(MemberLinkFailed(f"member link closed: {reason.value}"))
        super().connectionLost(reason)


class MemberVisitor(VisitorProtocol):
    """
    The holding member's end of a member link: a visitor forwarded by another member, served like a
    visitor of this member's public port once the link's proof checks.
    """

    mayForward = False
    _portLease: PortLease | None = None
    _udpLink: HolderUDPLink | None = None
    _log = Logger()

    def __init__(self, router: Router, links: MemberLinks) -> None:
        super().__init__(router, Factory())
        self._links = links
        self._nonce = links.nonce()
        self._linkBuffer = b""
        self._header: MemberHeader | None = None

    def connectionMade(self) -> None:
        """
        Send the nonce the forwarding member must prove its identity over.
        """
        super().connectionMade()
        assert self.transport is not None
        self.transport.write(self._nonce)

    def unsplicedDataReceived(self, data: bytes) -> None:
        """
        Read and check the member header, then treat the rest as a visitor's bytes (or, on a UDP
        link, as frames).
        """
        if self._udpLink is not None:
            self._udpLink.dataReceived(data)
            return
        if self._header is not None:
            super().unsplicedDataReceived(data)
            return
        self._linkBuffer += data
        if len(self._linkBuffer) < len(MAGIC):
            return
        try:
            if not self._linkBuffer.startswith(MAGIC):
                raise MemberLinkError("bad member link magic")
            parsed = parseMemberHeader(self._linkBuffer[len(MAGIC) :])
            if parsed is None:
                return
            header, body, tag, used = parsed
            self._links.check(header, self._nonce, body, tag)
        except MemberLinkError as e:
            self._linkFailed(str(e))
            return
        rest = self._linkBuffer[len(MAGIC) + used :]
        self._linkBuffer = b""
        self._header = header
        assert self.transport is not None
        # Another member's authenticated link no longer counts against its address's cap.
        vouchFor(self.transport)
        self.transport.write(ACK)
        if header.tcpPort is not None:
            # A raw TCP visitor: no ClientHello to read, its bytes go to the lease as they are.
            self._decided = True
            if rest:
                super().unsplicedDataReceived(rest)
            self._routePort(header.tcpPort)
            return
        if header.udpPort is not None:
            self._decided = True
            self._routeUDP(header.udpPort, rest)
            return
        if rest:
            super().unsplicedDataReceived(rest)

    def _routePort(self, port: int) -> None:
        """
        Route a forwarded raw TCP visitor to the data pool of the lease live here on C{port}, as
        L{portal.relay.rawtcp.RawVisitor} does for a visitor of this member's own port.

        @param port: The lease's public port, as the header named it.
        """
        assert self._header is not None and self.transport is not None
        self.setTimeout(None)
        router = self._router
        lease = None
        if router.tcp is not None:
            lease = next((p for p in router.tcp.leases.values() if p.port == port), None)
        if lease is None or lease.hostname != self._header.hostname:
            self._refuseRaw(
                "member_link", f"member link for TCP port {port}: no such lease live here"
            )
            return
        pool = lease.livePool()
        if pool is None:
            self._refuseRaw("lease_not_live", f"lease {lease.name} on TCP port {port} is not live")
            return
        router.counters["tcp_visitors"] += 1
        self._portLease = lease
        lease.visitors.add(self)
        peerHost, peerPort = self.visitorAddress()
        header = StreamHeader(
            streamId=router.nextStreamId(),
            hostname=lease.hostname,
            peerHost=peerHost,
            peerPort=peerPort,
        )
        self.pool = pool
        if not pool.route(self, header):
            self.pool = None
            router.counters["refused"] += 1
            self._refuseRaw("visitors_waiting", f"too many visitors waiting on TCP port {port}")

    def _routeUDP(self, port: int, rest: bytes) -> None:
        """
        Serve a UDP link: its frames become datagrams into the public port of the UDP lease live
        here on C{port}, and the tunnel's replies to them go back over it.

        @param port: The lease's public UDP port, as the header named it.
        @param rest: The link's bytes after the header (its first frames).
        """
        assert self._header is not None and self.transport is not None
        self.setTimeout(None)
        udp = self._router.udp
        lease = None
        if udp is not None:
            lease = next((p for p in udp.ports.leases.values() if p.port == port), None)
        if lease is None or lease.hostname != self._header.hostname:
            self._refuseRaw(
                "member_link", f"member link for UDP port {port}: no such lease live here", "UDP"
            )
            return
        session = getattr(lease.holder, "udpSession", None)
        public = getattr(session, "public", None)
        if not lease.live() or public is None or public.stopped:
            self._refuseRaw(
                "lease_not_live", f"lease {lease.name} on UDP port {port} is not live", "UDP"
            )
            return
        member = self._links.directory.member(self._header.fromId)
        name = member.nodeName if member is not None else self._header.fromId[:12]
        self._udpLink = HolderUDPLink(self._router, self.transport, public, name)
        # Like the lease's own port, the link carries datagrams until the port closes, and
        # closes with it: it is not a visitor connection a graceful shutdown waits for.
        self._router.visitors.discard(self)
        self._portLease = lease
        lease.visitors.add(self)
        self._log.info(
            "member {member} forwards the UDP visitors of port {port} ({name}) here",
            member=name,
            port=port,
            name=lease.name,
        )
        if rest:
            self._udpLink.dataReceived(rest)

    def _refuseRaw(self, label: str, why: str, kind: str = "TCP") -> None:
        """
        Count and log the refusal of a raw TCP visitor or a UDP link and close (no TLS alert: not
        a TLS client).
        """
        assert self.transport is not None
        self._router.refusals.refuse(
            label,
            "refused forwarded {kind} visitor {peer}: {reason}",
            kind=kind,
            peer=self.visitorAddress()[0],
            reason=why,
        )
        self._pending = []
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Leave the raw TCP lease's visitors, if it joined them; end a UDP link.
        """
        if self._udpLink is not None:
            self._udpLink.connectionLost()
        if self._portLease is not None:
            self._portLease.visitors.discard(self)
            self._portLease = None
        super().connectionLost(reason)

    def _linkFailed(self, reason: str) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        self._router.counters["member_links_refused"] = (
            self._router.counters.get("member_links_refused", 0) + 1
        )
        self._log.warn(
            "refused member link from {peer}: {reason}",
            peer=getattr(peer, "host", str(peer)),
            reason=reason,
        )
        self.setTimeout(None)
        self.transport.loseConnection()

    def visitorAddress(self) -> tuple[str, int]:
        """
        @return: The visitor's address as the forwarding member saw it.
        """
        assert self._header is not None
        return self._header.peerHost, self._header.peerPort

    def _dispatch(self, serverName: str | None) -> None:
        """
        Serve only the lease the link was opened for, and never the relay's own site.
        """
        assert self._header is not None
        if serverName != self._header.hostname:
            self._refuse(
                "member_link",
                f"member link for {self._header.hostname!r} carried {serverName!r}",
                UNRECOGNIZED_NAME,
            )
            return
        if serverName == self._router.relayDomain:
            self._refuse(
                "member_link",
                "the relay's own site is not served over member links",
                INTERNAL_ERROR,
            )
            return
        super()._dispatch(serverName)


@implementer(ICluster, ILeaseClaims)
class MemberLinks:
    """
    This member's side of the cluster's member links.

    @ivar router: The relay's routing state.
    @ivar directory: The cluster directory.
    """

    _log = Logger()

    def __init__(
        self, router: Router, directory: ClusterDirectory, identity: Identity, reactor: Any
    ) -> None:
        """
        @param router: The relay's routing state.
        @param directory: The cluster directory (members and live routes).
        @param identity: This member's relay identity.
        @param reactor: To connect to other members.
        """
        self.router = router
        self.directory = directory
        self._identity = identity
        self._reactor = reactor
        self._keys: dict[bytes, bytes] = {}
        self._announced: dict[str, str] = {}
        #: With C{--workers}: hands visitors to the other workers of this relay by their socket.
        self.handoff: HandoffSender | None = None

    def nonce(self) -> bytes:
        """
        @return: A fresh nonce for an incoming link.
        """
        return os.urandom(NONCE_LENGTH)

    def keyFor(self, publicKey: bytes) -> bytes:
        """
        @return: The pair key shared with the member of C{publicKey} (computed once per member).
        """
        key = self._keys.get(publicKey)
        if key is None:
            key = self._keys[publicKey] = pairKey(self._identity.privateKey, publicKey)
        return key

    def check(self, header: MemberHeader, nonce: bytes, body: bytes, tag: bytes) -> None:
        """
        Check an incoming link's header: a known member, its own key, a valid proof for this link.

        @raise MemberLinkError: When any check fails.
        """
        if identityId(header.fromKey) != header.fromId:
            raise MemberLinkError(f"{header.fromId[:12]} sent a key that is not its own")
        if not any(m.publicKey == header.fromKey for m in self.directory.members()):
            raise MemberLinkError(f"{header.fromId[:12]} is not a member of the cluster")
        key = self.keyFor(header.fromKey)
        if not checkMemberHeader(key, self.directory.me.id, nonce, body, tag):
            raise MemberLinkError(f"{header.fromId[:12]}: the link's proof does not check")

    def holderElsewhere(self, hostname: str) -> Member | None:
        """
        @return: The other member holding the lease of C{hostname} live, or L{None}.
        """
        name = self.router.labelOf(hostname)
        if name is None:
            return None
        holder = self.directory.holderOf(name)
        return holder if holder is not None and holder.id != self.directory.me.id else None

    def mayRegister(self) -> str | None:
        """
        @return: L{None} while etcd answers, else why registrations are refused.
        """
        return None if self.directory.available else "cluster store unavailable"

    def claim(
        self, names: list[str], owner: str, source: str | None = None
    ) -> Deferred[str | None]:
        """
        Claim C{names} for C{owner} in etcd, one compare-and-set each, recording C{source} with
        each for the quotas per source.

        @return: A L{Deferred} firing with L{None}, or the first name another identity holds; it
            fails with L{ClaimsUnavailable} when etcd cannot be reached or answers with an error.
        """

        async def claimAll() -> str | None:
            for name in names:
                try:
                    other = await self.directory.claimOwnership(
                        name,
                        owner,
                        self.router.leases.ttl + self.router.leases.reservation,
                        source,
                    )
                except (EtcdUnavailable, EtcdError) as e:
                    raise ClaimsUnavailable(f"cluster store unavailable: {e}") from e
                if other is not None:
                    return name
            return None

        return Deferred.fromCoroutine(claimAll())

    def liveHere(self) -> dict[str, str]:
        """
        @return: Each lease name live on this member, with its owner.
        """
        live: dict[str, str] = {}
        for control in self.router.controls:
            owner = getattr(control, "owner", None)
            for name in getattr(control, "names", ()):
                lease = self.router.leases.route(name)
                if owner is not None and lease is not None and lease.holder is control:
                    live[name] = owner
        return live

    def sync(self) -> None:
        """
        Announce the leases that became live here and release those that ended.
        """
        live = self.liveHere()
        for name in list(self._announced):
            # Another member that held the route too has gone (its key went with its etcd lease):
            # publish again that this member holds it.
            if name in live and self.directory.holderOf(name) is None:
                del self._announced[name]
        for name in sorted(set(live) - self._announced.keys()):
            self._announced[name] = live[name]
            self.directory.announce(name).addErrback(self._syncFailed, name)
        for name in sorted(self._announced.keys() - set(live)):
            owner = self._announced.pop(name)
            hold = self.router.leases.reservation
            Deferred.fromCoroutine(self.directory.release(name, owner, hold)).addErrback(
                self._syncFailed, name
            )

    def _syncFailed(self, failure: Failure, name: str) -> None:
        failure.trap(EtcdUnavailable, EtcdError)
        self._log.warn(
            "could not publish lease {name} to the cluster: {error}",
            name=name,
            error=failure.getErrorMessage(),
        )
        # Published again by the next sync.
        self._announced.pop(name, None)

    def endpointFor(self, member: Member) -> IStreamClientEndpoint:
        """
        @return: The endpoint of C{member}'s control port, where member links go.
        @raise ConfigError: When the member's address is not C{HOST:PORT}.
        """
        host, port = parseHostPort(member.address, "member address")
        timeout = self.router.limits.attachTimeout
        return tcpEndpoint(self._reactor, host, port, timeout)

    def forward(self, visitor: Any, member: Member, header: Any) -> None:
        """
        Forward a visitor to the member that holds its lease, over a new member link.

        @param visitor: The L{VisitorProtocol}, with its ClientHello buffered.
        @param member: The holding member.
        @param header: The visitor's L{StreamHeader}.
        """
        assert isinstance(header, StreamHeader)
        handoff = self.handoff
        if handoff is not None and visitor.handOff(
            lambda fd, prefix: handoff.send(member.id, fd, Handoff(prefix=prefix))
        ):
            # Another worker of this relay, on this machine: it gets the socket itself.
            self.router.counters["handed_off"] = self.router.counters.get("handed_off", 0) + 1
            self._log.debug(
                "handed a visitor for {hostname} to worker {member}",
                hostname=header.hostname,
                member=member.nodeName,
            )
            return
        link = MemberHeader(
            self._identity.id,
            self._identity.publicKey,
            header.hostname,
            header.peerHost,
            header.peerPort,
        )
        self.forwardOver(visitor, member, link)

    def forwardPort(
        self, visitor: Any, member: Member, port: int, hostname: str, peer: tuple[str, int]
    ) -> None:
        """
        Forward a raw TCP visitor of C{port} to the member holding the port's lease.

        @param visitor: The visitor's splice protocol (with C{refuse(reason)}).
        @param member: The holding member.
        @param port: The lease's public port.
        @param hostname: The lease's hostname.
        @param peer: The visitor's address and port.
        """
        link = MemberHeader(
            self._identity.id, self._identity.publicKey, hostname, peer[0], peer[1], port
        )
        self.forwardOver(visitor, member, link)

    def forwardOver(self, visitor: Any, member: Member, link: MemberHeader) -> None:
        """
        Open a member link to C{member} for C{link} and join it to the paused visitor.

        @param visitor: A splice protocol with C{refuse(reason)} and C{setTimeout}.
        @param member: The holding member.
        @param link: The header to send.
        """
        assert visitor.transport is not None
        pauseReading(visitor.transport)
        header = link
        client = MemberLinkClient(self, member, link)
        try:
            endpoint = self.endpointFor(member)
        except ConfigError as e:
            visitor.refuse(f"member {member.nodeName} has a bad address: {e}")
            return
        connecting = connectProtocol(endpoint, client)
        connecting.addTimeout(self.router.limits.attachTimeout, self.router.clock)
        connecting.addCallback(lambda _: client.attached)

        def joined(_: object) -> None:
            if visitor._lost or visitor.transport is None:
                assert client.transport is not None
                client.transport.loseConnection()
                return
            visitor.setTimeout(None)
            self._log.debug(
                "forwarded a visitor for {hostname} to member {member}",
                hostname=header.hostname,
                member=member.nodeName,
            )
            if joinEnds(self._reactor, visitor, client):
                self.router.counters["kernel_spliced"] = (
                    self.router.counters.get("kernel_spliced", 0) + 1
                )

        def failed(failure: Failure) -> None:
            self._log.warn(
                "could not forward a visitor for {hostname} to member {member}: {error}",
                hostname=header.hostname,
                member=member.nodeName,
                error=failure.getErrorMessage(),
            )
            if client.transport is not None:
                client.transport.loseConnection()
            if not visitor._lost:
                visitor.refuse(f"member {member.nodeName} unreachable for {header.hostname!r}")

        connecting.addCallbacks(joined, failed)
