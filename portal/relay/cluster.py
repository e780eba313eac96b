"""
A relay cluster's shared directory in etcd: which members exist and which member holds each live
lease (docs/cluster.md).

Each member keeps one etcd lease with a short TTL alive; its member record and the names it holds
live are keys attached to that lease, so a member that dies loses its routes within the TTL, with no
other member having to notice. Every member watches the cluster's prefix and keeps a local copy of
the directory, so routing a visitor never waits on etcd, and routes keep working while etcd is away.

Keys, under C{portal/<tunnel-domain>/}::

    members/<member-id>   {"key": HEX, "address": "HOST:PORT", "name": NODE}   (member's etcd lease)
    live/<lease-name>     <member-id>                                           (member's etcd lease)
    owners/<lease-name>   {"owner": ID, "until": UNIX-TIME, "source": SOURCE}    (no etcd lease)
    ports/tcp/<port>      {"owner": ID, "name": NAME, "member": MEMBER-ID,
                           "until": UNIX-TIME or null, "source": SOURCE}         (member's etcd lease)

A C{ports/} record says which lease a raw TCP port is given to, and which member holds it: live
while C{until} is null, reserved for the same lease until C{until} after it ended there.

C{source} is the source address (L{portal.forwarding.sources}) the name or port was registered
from: every member counts, from its copy, what each source and identity holds in the whole
cluster (L{portal.relay.clusterquota}). Records of older members have none, and count for no
source.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from portal.relay.clusterquota import LiveIndex, SourceIndex, recordSource
from portal.relay.etcd import EtcdClient, EtcdError, EtcdUnavailable, Watch, WatchEvent

#: Seconds a member's etcd lease lives without a keep-alive.
DEFAULT_TTL = 10

#: Seconds before a broken watch or a failed keep-alive is tried again.
RETRY_DELAY = 1.0


@attrs.frozen
class Member:
    """
    A member of the cluster as its record says.

    @ivar id: Its key in the cluster: its relay identity id, followed by C{-wN} for worker N of a
        relay started with C{--workers} (the workers of one relay share its identity).
    @ivar publicKey: Its relay identity's compressed secp256k1 public key.
    @ivar address: Where other members reach its control port, C{HOST:PORT}.
    @ivar nodeName: Its C{--node-name}, for humans.
    """

    id: str
    publicKey: bytes
    address: str
    nodeName: str


@attrs.frozen
class PortClaim:
    """
    A raw port given to a lease in the cluster (a C{ports/} record).

    @ivar kind: C{"tcp"}.
    @ivar port: The port number.
    @ivar owner: The identity the lease belongs to.
    @ivar name: The lease name.
    @ivar member: The id of the member whose etcd lease carries the record (the one holding the
        lease live, or that held it last).
    @ivar until: L{None} while the lease is live on C{member}; otherwise when its reservation ends.
    @ivar source: The source address the lease registered from (L{None}: unknown, a record of an
        older member).
    """

    kind: str
    port: int
    owner: str
    name: str
    member: str
    until: float | None = None
    source: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """
        The (identity, name) the port is given to.
        """
        return (self.owner, self.name)

    def heldAt(self, now: float) -> bool:
        """
        @return: Whether the port is still live or reserved at C{now}.
        """
        return self.until is None or now < self.until


def portRecord(claim: PortClaim) -> bytes:
    """
    @return: The value of a C{ports/} record.
    """
    fields: dict[str, object] = {
        "owner": claim.owner,
        "name": claim.name,
        "member": claim.member,
        "until": claim.until,
    }
    if claim.source is not None:
        fields["source"] = claim.source
    return json.dumps(fields, separators=(",", ":")).encode("utf-8")


def parsePortRecord(kind: str, port: int, value: bytes) -> PortClaim | None:
    """
    @return: The claim a C{ports/} record holds, or L{None} when it is malformed.
    """
    try:
        fields = json.loads(value)
        owner, name, member = fields["owner"], fields["name"], fields["member"]
        until = fields.get("until")
        source = recordSource(fields.get("source"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not (isinstance(owner, str) and isinstance(name, str) and isinstance(member, str)):
        return None
    if until is not None and not _isTime(until):
        return None
    return PortClaim(
        kind, port, owner, name, member, None if until is None else float(until), source
    )


def _isTime(value: object) -> bool:
    """
    @return: Whether C{value} (parsed from JSON) is a finite number of seconds.
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@attrs.frozen
class NameClaim:
    """
    The ownership of a lease name in the cluster (an C{owners/} record).

    @ivar owner: The identity that owns it.
    @ivar until: Until when it is reserved for C{owner} (it is held beyond while live somewhere).
    @ivar source: The source address it was registered from (L{None}: unknown).
    """

    owner: str
    until: float
    source: str | None = None


def ownerRecord(claim: NameClaim) -> bytes:
    """
    @return: The value of an C{owners/} record.
    """
    fields: dict[str, object] = {"owner": claim.owner, "until": claim.until}
    if claim.source is not None:
        fields["source"] = claim.source
    return json.dumps(fields, separators=(",", ":")).encode("utf-8")


def parseOwnerRecord(value: bytes) -> NameClaim | None:
    """
    @return: The ownership an C{owners/} record holds, or L{None} when it is malformed (a
        malformed C{until} reads as 0, a reservation that has ended; a malformed C{source} as
        unknown).
    """
    try:
        fields = json.loads(value)
        owner = fields["owner"]
        until = fields.get("until")
        source = recordSource(fields.get("source"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(owner, str):
        return None
    return NameClaim(owner, float(until) if _isTime(until) else 0.0, source)


def _ownerOf(value: bytes) -> str | None:
    """
    @return: The owner in an C{owners/} record, or L{None} when malformed.
    """
    claim = parseOwnerRecord(value)
    return None if claim is None else claim.owner


def _untilOf(value: bytes) -> float:
    """
    @return: Until when an C{owners/} record reserves its name (0 when malformed).
    """
    claim = parseOwnerRecord(value)
    return 0.0 if claim is None else claim.until


def memberRecord(member: Member) -> bytes:
    """
    @return: The value of a member's record.
    """
    return json.dumps(
        {"key": member.publicKey.hex(), "address": member.address, "name": member.nodeName},
        separators=(",", ":"),
    ).encode("utf-8")


def parseMemberRecord(memberId: str, value: bytes) -> Member | None:
    """
    @return: The member a record describes, or L{None} when the record is malformed.
    """
    try:
        fields = json.loads(value)
        return Member(memberId, bytes.fromhex(fields["key"]), fields["address"], fields["name"])
    except (ValueError, KeyError, TypeError):
        return None


class ICluster(Interface):
    """
    What the relay's public listener asks of the cluster: where a lease this member does not hold
    lives, and to forward a visitor there (implemented by L{portal.relay.memberlink.MemberLinks},
    which is also the cluster's L{ILeaseClaims<portal.relay.store.ILeaseClaims>}).
    """

    def holderElsewhere(hostname: str) -> Member | None:
        """
        @return: The other member holding the lease of C{hostname} live, or L{None}.
        """

    def forward(visitor: Any, member: Member, header: Any) -> None:
        """
        Forward C{visitor} (a paused public connection with its ClientHello buffered) to C{member}
        over a member link; on failure the visitor is refused with a TLS alert.
        """


class ClusterDirectory:
    """
    This member's view of the cluster, kept from etcd, and its own entries in it.

    @ivar available: Whether etcd answered the last keep-alive; while not, the copy of the
        directory still routes, and the relay refuses new registrations.
    """

    _log = Logger()

    def __init__(
        self,
        client: EtcdClient,
        clock: IReactorTime,
        tunnelDomain: str,
        me: Member,
        ttl: int = DEFAULT_TTL,
    ) -> None:
        """
        @param client: The etcd client.
        @param clock: For keep-alives and retries.
        @param tunnelDomain: The domain the cluster serves (its keys' prefix).
        @param me: This member.
        @param ttl: Seconds this member's entries outlive it.
        """
        self._client = client
        self._clock = clock
        self.me = me
        self._ttl = ttl
        self._prefix = f"portal/{tunnelDomain}/".encode()
        self._members: dict[str, Member] = {}
        self._live: dict[str, str] = {}
        self._mine: set[str] = set()
        self._ports: dict[tuple[str, int], PortClaim] = {}
        # This member's own port records, written again when it rejoins after its etcd lease lapsed
        # (the watch deleted them from the copy above).
        self._minePorts: dict[tuple[str, int], PortClaim] = {}
        #: Called after a C{ports/} record changed in the local copy.
        self.onPortsChanged: Callable[[], None] | None = None
        #: The lease names each source holds in the cluster, as C{(identity, name)}.
        self.nameQuota: SourceIndex[str, tuple[str, str]] = SourceIndex(self._nameHeld)
        #: The lease names each identity holds in the cluster (for C{--max-leases-per-identity}).
        self.ownerNames: SourceIndex[str, str] = SourceIndex(self._nameHeld)
        #: The ports each source holds in the cluster, as C{(kind, identity, name)}.
        self.portQuota: SourceIndex[tuple[str, int], tuple[str, str, str]] = SourceIndex(
            self._portHeld
        )
        #: The ports live in the cluster for each identity.
        self.livePorts = LiveIndex()
        self._lease = 0
        self._watch: Watch | None = None
        self._revision = 0
        self._timer: IDelayedCall | None = None
        self._stopped = False
        self.available = False

    def _key(self, kind: str, name: str) -> bytes:
        return self._prefix + f"{kind}/{name}".encode()

    def _nameHeld(self, name: str, until: float | None) -> bool:
        """
        @return: Whether lease name C{name}, reserved until C{until}, is still held: live on a
            member, or reserved.
        """
        return name in self._live or (until is not None and self._clock.seconds() < until)

    def _portHeld(self, key: tuple[str, int], until: float | None) -> bool:
        """
        @return: Whether a port record, reserved until C{until}, is still held: live, or
            reserved.
        """
        return until is None or self._clock.seconds() < until

    def livePortsElsewhere(self, kind: str, owner: str, name: str) -> int:
        """
        @return: How many C{kind} ports C{owner} holds live on other members, not counting the
            lease C{name} (whose port follows it here).
        """
        return self.livePorts.liveElsewhere(kind, owner, name, self.me.id)

    def holderOf(self, name: str) -> Member | None:
        """
        @return: The member that holds lease C{name} live (possibly this one), or L{None}.
        """
        holder = self._live.get(name)
        return None if holder is None else self._members.get(holder)

    def member(self, memberId: str) -> Member | None:
        """
        @return: The member with this identity id, or L{None} when it is not in the cluster.
        """
        return self._members.get(memberId)

    def members(self) -> list[Member]:
        """
        @return: Every member the directory knows, this one included.
        """
        return list(self._members.values())

    def start(self) -> Deferred[None]:
        """
        Join: grant this member's etcd lease, write its record, read the directory and watch it.

        @return: A L{Deferred} that fires once joined; it fails with L{EtcdUnavailable} when etcd
            cannot be reached (the relay then refuses to start: a member that cannot join serves
            nobody).
        """
        return ensureDeferred(self._join())

    async def _join(self) -> None:
        self._lease = await self._client.grant(self._ttl)
        await self._client.put(self._key("members", self.me.id), memberRecord(self.me), self._lease)
        for name in sorted(self._mine):
            await self._client.put(self._key("live", name), self.me.id.encode(), self._lease)
        for claim in list(self._minePorts.values()):
            # Ports this member held before its etcd lease lapsed: back, unless taken meanwhile.
            key = self._key("ports", f"{claim.kind}/{claim.port}")
            created, _ = await self._client.create(key, portRecord(claim), self._lease)
            if not created:
                self._minePorts.pop((claim.kind, claim.port), None)
        await self._resync()
        self.available = True
        self._schedule(self._ttl / 3)

    async def _resync(self) -> None:
        kvs, revision = await self._client.getPrefix(self._prefix)
        self._members.clear()
        self._live.clear()
        self._ports.clear()
        self.nameQuota.clear()
        self.ownerNames.clear()
        self.portQuota.clear()
        self.livePorts.clear()
        for kv in kvs:
            self._apply(WatchEvent("put", kv.key, kv.value, kv.modRevision))
        self._revision = revision
        self._startWatch()
        self._portsChanged()

    def _startWatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        watch = self._client.watchPrefix(self._prefix, self._revision + 1, self._apply)
        self._watch = watch

        def ended(_: object) -> None:
            if self._watch is watch and not self._stopped:
                self._log.warn("cluster watch ended; reading the directory again")
                self._watch = None
                self._schedule(RETRY_DELAY)

        watch.done.addBoth(ended)

    def _apply(self, event: WatchEvent) -> None:
        """
        Apply one change to the local copy.
        """
        self._revision = max(self._revision, event.modRevision)
        relative = event.key[len(self._prefix) :].decode("utf-8", "replace")
        kind, _, name = relative.partition("/")
        if kind == "members":
            if event.kind == "delete":
                self._members.pop(name, None)
            else:
                member = parseMemberRecord(name, event.value)
                if member is not None:
                    self._members[name] = member
        elif kind == "live":
            if event.kind == "delete":
                self._live.pop(name, None)
            else:
                self._live[name] = event.value.decode("ascii", "replace")
        elif kind == "ports":
            portKind, _, number = name.partition("/")
            if not number.isdigit():
                return
            key = (portKind, int(number))
            claim = None if event.kind == "delete" else parsePortRecord(*key, event.value)
            if claim is None and event.kind != "delete":
                self._log.warn("ignored a malformed cluster record {key}", key=relative[:120])
            self._storePort(key, claim)
            if claim is not None and claim.member != self.me.id:
                self._minePorts.pop(key, None)
            self._portsChanged()
        elif kind == "owners":
            owner = None if event.kind == "delete" else parseOwnerRecord(event.value)
            if owner is None and event.kind != "delete":
                self._log.warn("ignored a malformed cluster record {key}", key=relative[:120])
            if owner is None:
                self.nameQuota.drop(name)
                self.ownerNames.drop(name)
            else:
                self.nameQuota.put(name, owner.source, (owner.owner, name), owner.until)
                self.ownerNames.put(name, owner.owner, name, owner.until)

    def _storePort(self, key: tuple[str, int], claim: PortClaim | None) -> None:
        """
        Put a port record into the local copy and the quota indexes, or (L{None}) take it out.
        """
        if claim is None:
            self._ports.pop(key, None)
            self.portQuota.drop(key)
            self.livePorts.drop(*key)
            return
        self._ports[key] = claim
        self.portQuota.put(key, claim.source, (claim.kind, claim.owner, claim.name), claim.until)
        self.livePorts.put(
            claim.kind, claim.port, claim.owner, claim.name, claim.member, claim.until is None
        )

    def _portsChanged(self) -> None:
        """
        Tell L{onPortsChanged} that the port records changed.
        """
        if self.onPortsChanged is not None:
            self.onPortsChanged()

    def portClaim(self, kind: str, port: int) -> PortClaim | None:
        """
        @return: The record of C{port} in the local copy, or L{None}.
        """
        return self._ports.get((kind, port))

    def portClaims(self, kind: str) -> list[PortClaim]:
        """
        @return: Every C{kind} port record in the local copy.
        """
        return [claim for (k, _), claim in self._ports.items() if k == kind]

    async def claimPort(
        self, kind: str, port: int, owner: str, name: str, source: str | None = None
    ) -> PortClaim | None:
        """
        Give C{port} to the lease C{name} of C{owner}, held live by this member, with one
        compare-and-set: when the port has no record, when its record is the same lease's (live on
        another member or reserved for it), when its record's reservation has ended, or when it is
        a reservation of this member's (whose allocator decides about its own reservations).

        The record lives on this member's etcd lease: if this member dies, the port frees with its
        routes. It names C{source}, the address the lease registered from, for the quotas.

        @return: L{None} when the port is this member's for the lease, else the record that holds
            it for another lease.
        @raise EtcdUnavailable: When etcd is away.
        """
        key = self._key("ports", f"{kind}/{port}")
        mine = PortClaim(kind, port, owner, name, self.me.id, source=source)
        value = portRecord(mine)
        for _ in range(3):
            created, current = await self._client.create(key, value, self._lease)
            if created:
                self._setPort(mine)
                return None
            if current is None:
                continue
            other = parsePortRecord(kind, port, current.value)
            if other is not None:
                self._setPort(other)
                ownReservation = other.member == self.me.id and other.until is not None
                if (
                    other.key != mine.key
                    and other.heldAt(self._clock.seconds())
                    and not ownReservation
                ):
                    return other
            replaced, _ = await self._client.replace(key, current.modRevision, value, self._lease)
            if replaced:
                self._setPort(mine)
                return None
        claim = self.portClaim(kind, port)
        return claim if claim is not None else mine

    async def releasePort(
        self, kind: str, port: int, owner: str, name: str, until: float | None
    ) -> None:
        """
        The lease C{name} of C{owner} ended on this member: keep its port reserved for it until
        C{until}, or (L{None}) free the port, if this member's record still holds it.

        @raise EtcdUnavailable: When etcd is away.
        """
        key = self._key("ports", f"{kind}/{port}")
        current = await self._client.get(key)
        if current is None:
            return
        claim = parsePortRecord(kind, port, current.value)
        if claim is None or claim.key != (owner, name) or claim.member != self.me.id:
            return
        if until is None:
            if await self._client.deleteIf(key, current.modRevision):
                self._storePort((kind, port), None)
                self._minePorts.pop((kind, port), None)
                self._portsChanged()
            return
        reserved = attrs.evolve(claim, until=until)
        replaced, _ = await self._client.replace(
            key, current.modRevision, portRecord(reserved), self._lease
        )
        if replaced:
            self._setPort(reserved)

    def _setPort(self, claim: PortClaim) -> None:
        """
        Put a record into the local copy ahead of the watch (which brings the same value).
        """
        if claim.member == self.me.id:
            self._minePorts[(claim.kind, claim.port)] = claim
        else:
            self._minePorts.pop((claim.kind, claim.port), None)
        if self._ports.get((claim.kind, claim.port)) != claim:
            self._storePort((claim.kind, claim.port), claim)
            self._portsChanged()

    def _schedule(self, delay: float) -> None:
        if self._stopped:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> Deferred[None]:
        return ensureDeferred(self._keepAlive())

    async def _keepAlive(self) -> None:
        """
        Renew this member's etcd lease; rejoin when it lapsed, restart a broken watch.
        """
        try:
            ttl = await self._client.keepAlive(self._lease)
            if ttl == 0:
                self._log.warn("cluster lease lapsed; joining again")
                await self._join()
                return
            if self._watch is None:
                await self._resync()
        except (EtcdUnavailable, EtcdError) as e:
            if self.available:
                self._log.error("cluster store unavailable: {error}", error=str(e))
            self.available = False
            self._schedule(RETRY_DELAY)
            return
        except Exception:
            # Whatever went wrong, keep renewing: a keep-alive loop that stops would leave the
            # member refusing registrations for good.
            self._log.failure("cluster keep-alive failed")
            self.available = False
            self._schedule(RETRY_DELAY)
            return
        if not self.available:
            self._log.info("cluster store available again")
        self.available = True
        self._schedule(self._ttl / 3)

    async def claimOwnership(
        self, name: str, owner: str, hold: float, source: str | None = None
    ) -> str | None:
        """
        Make C{owner} the owner of lease name C{name} in etcd, unless another identity holds it:
        live on some member, or reserved until a time not yet reached.

        @param hold: Seconds from now the ownership is reserved at least (refreshed when the lease
            ends on this member, see L{release}).
        @param source: The source address the name is registered from, for the quotas.
        @return: L{None} when C{owner} owns the name, else the other owner's id.
        """
        key = self._key("owners", name)
        now = self._clock.seconds()
        claim = NameClaim(owner, now + hold, source)
        value = ownerRecord(claim)
        for _ in range(3):
            created, current = await self._client.create(key, value)
            if created:
                self.nameQuota.put(name, source, (owner, name), claim.until)
                self.ownerNames.put(name, owner, name, claim.until)
                return None
            if current is None:
                continue
            other = _ownerOf(current.value)
            if other != owner:
                holder = self.holderOf(name)
                if holder is not None and holder.id != self.me.id:
                    return other or "unknown"
                if other is not None and _untilOf(current.value) > now:
                    return other
            replaced, latest = await self._client.replace(key, current.modRevision, value)
            if replaced:
                self.nameQuota.put(name, source, (owner, name), claim.until)
                self.ownerNames.put(name, owner, name, claim.until)
                return None
        return "unknown"

    async def release(self, name: str, owner: str, hold: float) -> None:
        """
        The lease C{name} ended on this member: withdraw its route and keep it reserved for
        C{owner} for C{hold} seconds from now.
        """
        await self.withdraw(name)
        key = self._key("owners", name)
        current = await self._client.get(key)
        claim = None if current is None else parseOwnerRecord(current.value)
        if current is not None and claim is not None and claim.owner == owner:
            # The source stays: the reserved name still counts for the address that registered it.
            value = ownerRecord(attrs.evolve(claim, until=self._clock.seconds() + hold))
            await self._client.replace(key, current.modRevision, value)

    def announce(self, name: str) -> Deferred[None]:
        """
        Tell the cluster that this member holds lease C{name} live.

        @return: A L{Deferred} that fails with L{EtcdUnavailable} when etcd is away.
        """
        self._mine.add(name)
        self._live[name] = self.me.id
        return ensureDeferred(
            self._client.put(self._key("live", name), self.me.id.encode(), self._lease)
        ).addCallback(lambda _: None)

    def withdraw(self, name: str) -> Deferred[None]:
        """
        Tell the cluster that this member no longer holds lease C{name}.
        """
        self._mine.discard(name)
        if self._live.get(name) == self.me.id:
            del self._live[name]
        return ensureDeferred(self._client.delete(self._key("live", name)))

    def mine(self) -> Iterable[str]:
        """
        @return: The names this member announced.
        """
        return set(self._mine)

    def stop(self) -> Deferred[None]:
        """
        Leave: stop renewing and watching, and revoke this member's etcd lease so that its routes go
        at once.
        """
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        lease, self._lease = self._lease, 0
        if not lease:
            return succeed(None)

        def unreachable(failure: Failure) -> None:
            failure.trap(EtcdUnavailable, EtcdError)
            self._log.warn("could not revoke the cluster lease: {error}", error=failure.value)

        return ensureDeferred(self._client.revoke(lease)).addErrback(unreachable)
