"""
The control protocol between a tunnel and a relay: Twisted AMP over TLS.

Specified in C{docs/protocol.md}. The tunnel speaks first with L{Hello}; both sides agree on a protocol
version and a set of capabilities, and the relay proves its secp256k1 identity by signing the session's TLS
exporter value (a channel binding, RFC 9266 style). Everything after that is only sent when the capability
that introduces it was negotiated, so neighbouring versions interoperate.
"""

from __future__ import annotations

from twisted.protocols import amp

#: Protocol versions this code speaks.
MIN_VERSION = 1
MAX_VERSION = 1

#: Capabilities this code knows. C{stream}: the default HTTPS stream mode with plain-TCP data sessions.
#: C{tcp}: raw TCP mode (L{Register} with mode C{"tcp"}, a public port per lease).
#: C{sealed-tcp}: raw TCP mode's data sessions are plain TCP with their stream sealed
#: (L{portal.wire.streamseal}, keys from L{EXPORTER_TCP_KEY}); both sides need it for raw TCP mode.
#: C{udp}: UDP mode (modes with C{+udp}, sealed datagrams, L{Datagram}, L{FlowOpened}, L{FlowClosed}).
#: C{heartbeat}: the tunnel sends L{Heartbeat} and the relay answers it.
#: C{goaway}: the relay sends L{GoingAway} before it shuts down.
#: C{hop}: multi-hop chains (L{Challenge} with purpose C{"hop"}, L{Hop}).
#: C{pow}: proof of work on registration (L{Challenge}'s C{work}, L{Register}'s C{proof}).
#: C{takeover}: L{Register}'s C{takeover} argument and its L{NameInUse} error.
CAPABILITIES = (
    "stream",
    "tcp",
    "sealed-tcp",
    "udp",
    "heartbeat",
    "goaway",
    "hop",
    "pow",
    "takeover",
)

#: Modes a registration may ask for (L{Register}'s C{mode}): C{stream} (HTTPS stream and routed
#: HTTP), C{tcp}, C{udp}, and a TCP mode together with UDP on the same lease.
MODES = ("stream", "tcp", "udp", "stream+udp", "tcp+udp")

#: TLS exporter label whose value the relay signs in L{Hello}.
EXPORTER_HELLO = b"EXPORTER-portal-relay-hello"
#: TLS exporter label of the key that authenticates data sessions of this control session.
EXPORTER_DATA_KEY = b"EXPORTER-portal-data-key"
#: TLS exporter label of a TLS data session's own channel binding (data sessions inside a chain of hops):
#: the attach proof covers it, so a data session cannot be relayed by someone who terminates its TLS.
EXPORTER_DATA_SESSION = b"EXPORTER-portal-data-session"
#: TLS exporter label of the secret raw TCP mode's stream keys are derived from (L{portal.wire.streamseal}).
EXPORTER_TCP_KEY = b"EXPORTER-portal-tcp-key"
#: TLS exporter label of the secret UDP mode's datagram keys are derived from (L{portal.wire.udpseal}).
EXPORTER_UDP_KEY = b"EXPORTER-portal-udp-key"
#: Length of exported values.
EXPORTER_LENGTH = 32
#: Domain separation prefix of the relay's L{Hello} signature.
HELLO_SIGNATURE_PREFIX = b"portal-relay-hello-v1\0"


class UnsupportedVersion(Exception):
    """
    The two sides share no protocol version.
    """


class NotAuthenticated(Exception):
    """
    A command that needs a registered identity came before L{Register}.
    """


class RegistrationRefused(Exception):
    """
    The relay refused a registration: wrong signature, stale or replayed challenge, invalid or taken name,
    or a limit. The message says which.
    """


class TryAgain(Exception):
    """
    A refusal that may succeed later: the challenge was unknown or expired (challenges are bounded and
    short-lived), or the name is live on another control session of the same identity. The tunnel
    retries with backoff instead of stopping.
    """


class NameInUse(Exception):
    """
    With the C{takeover} capability: a name is live on another control session of the same identity
    (another tunnel, or this one started twice). The tunnel stops and says so, or registers again
    with C{takeover} to move the lease to itself.
    """


class LeaseUnknown(Exception):
    """
    A renew or unregister named a lease this session does not hold.
    """


class HopRefused(Exception):
    """
    The relay will not forward this hop, now or later: it forwards no hops, the destination is not on
    its allow list, or the signature is wrong. The message says which.
    """


class HopLimit(Exception):
    """
    The identity has as many hops open through this relay as it may; one may be opened once another
    closes.
    """


class HopUnreachable(Exception):
    """
    The relay could not connect to the hop's destination (refused, unresolvable, or no answer in time).
    """


class Hello(amp.Command):
    """
    First command of a control session, sent by the tunnel.

    The relay answers with the chosen version, the shared capabilities, its identity's public key and a
    signature over L{HELLO_SIGNATURE_PREFIX} + the TLS exporter value for L{EXPORTER_HELLO}.
    """

    arguments = [
        (b"minVersion", amp.Integer()),
        (b"maxVersion", amp.Integer()),
        (b"capabilities", amp.ListOf(amp.Unicode())),
        (b"software", amp.Unicode()),
    ]
    response = [
        (b"version", amp.Integer()),
        (b"capabilities", amp.ListOf(amp.Unicode())),
        (b"relayKey", amp.String()),
        (b"signature", amp.String()),
        (b"sessionId", amp.String()),
        (b"tunnelDomain", amp.Unicode()),
        (b"publicPort", amp.Integer()),
        (b"leaseTTL", amp.Float()),
        (b"software", amp.Unicode()),
    ]
    errors = {UnsupportedVersion: b"UNSUPPORTED_VERSION", TryAgain: b"TRY_AGAIN"}


class Challenge(amp.Command):
    """
    Ask for a single-use, short-lived challenge bound to the relay: for registering C{names}
    (C{purpose} C{"register"}, the default), or for a L{Hop} (C{"hop"}, no names; capability C{hop}).
    See L{portal.trust.challenge}.

    With capability C{pow}, C{work} is the proof-of-work difficulty in bits the registration must
    meet (L{portal.trust.proofofwork}; 0 or absent: none). C{TRY_AGAIN} when a rate limit is hit.
    """

    arguments = [
        (b"names", amp.ListOf(amp.Unicode())),
        (b"purpose", amp.Unicode(optional=True)),
    ]
    response = [
        (b"nonce", amp.String()),
        (b"expiresIn", amp.Float()),
        (b"work", amp.Integer(optional=True)),
    ]
    errors = {RegistrationRefused: b"REGISTRATION_REFUSED", TryAgain: b"TRY_AGAIN"}


class Register(amp.Command):
    """
    Register leases on C{names} by signing the challenge with the identity whose key is C{publicKey}.

    C{mode} is one of L{MODES}. In C{tcp} mode exactly one name is registered, its data sessions must be
    TLS, and the relay answers with the public TCP port it opened for the lease (C{tcpPort}) and the
    host visitors reach it at (C{publicHost}).

    With capability C{pow}, C{proof} is the solution to the challenge's proof of work, when it asked
    for one.
    """

    arguments = [
        (b"publicKey", amp.String()),
        (b"names", amp.ListOf(amp.Unicode())),
        (b"nonce", amp.String()),
        (b"signature", amp.String()),
        (b"mode", amp.Unicode()),
        (b"proof", amp.String(optional=True)),
        (b"takeover", amp.Boolean(optional=True)),
    ]
    response = [
        (b"hostnames", amp.ListOf(amp.Unicode())),
        (b"expiresIn", amp.Float()),
        (b"tcpPort", amp.Integer(optional=True)),
        (b"publicHost", amp.Unicode(optional=True)),
        (b"udpPort", amp.Integer(optional=True)),
        (b"udpSession", amp.String(optional=True)),
    ]
    errors = {
        RegistrationRefused: b"REGISTRATION_REFUSED",
        TryAgain: b"TRY_AGAIN",
        NameInUse: b"NAME_IN_USE",
    }


class Renew(amp.Command):
    """
    Extend the leases on C{names} held by this session.
    """

    arguments = [(b"names", amp.ListOf(amp.Unicode()))]
    response = [(b"expiresIn", amp.Float())]
    errors = {NotAuthenticated: b"NOT_AUTHENTICATED", LeaseUnknown: b"LEASE_UNKNOWN"}


class Unregister(amp.Command):
    """
    End the leases on C{names} now; the names stay reserved for their owner for the reservation period.
    """

    arguments = [(b"names", amp.ListOf(amp.Unicode()))]
    response = []
    errors = {NotAuthenticated: b"NOT_AUTHENTICATED", LeaseUnknown: b"LEASE_UNKNOWN"}


class RequestData(amp.Command):
    """
    Sent by the relay: visitors are waiting and the idle data sessions ran out; open C{count} more.
    """

    arguments = [(b"count", amp.Integer())]
    response = []
    requiresAnswer = False


class Datagram(amp.Command):
    """
    One datagram of flow C{flowId}, either way, over the control session: when UDP between tunnel and
    relay does not get through, or the datagram is too large to seal into one.
    """

    arguments = [(b"flowId", amp.Integer()), (b"payload", amp.String())]
    response = []
    requiresAnswer = False


class FlowOpened(amp.Command):
    """
    Sent by the relay: a new visitor address sends to the lease's UDP port as flow C{flowId}.
    """

    arguments = [(b"flowId", amp.Integer()), (b"host", amp.Unicode()), (b"port", amp.Integer())]
    response = []
    requiresAnswer = False


class FlowClosed(amp.Command):
    """
    Either way: the sender forgot flow C{flowId} (idle, or a limit).
    """

    arguments = [(b"flowId", amp.Integer())]
    response = []
    requiresAnswer = False


class Heartbeat(amp.Command):
    """
    Sent by the tunnel at a fixed interval: the relay answers at once, so each side knows that the
    path between them still carries data (a dead path is torn down and redialled).
    """

    arguments = []
    response = []


class GoingAway(amp.Command):
    """
    Sent by the relay when it shuts down: it accepts no new visitors or sessions, lets open
    connections finish for up to C{deadline} seconds, then closes them. The tunnel should expect this
    control session to end and reconnect (or move) with backoff.
    """

    arguments = [(b"deadline", amp.Float())]
    response = []
    requiresAnswer = False


class Hop(amp.ProtocolSwitchCommand):
    """
    Ask the relay to connect to C{host}:C{port} and to forward this connection there (capability
    C{hop}).

    The tunnel signs L{portal.trust.challenge.hopMessage} over a L{Challenge} of purpose C{"hop"}. On
    success the answer is the last AMP box of the connection: from then on its bytes (inside the
    relay's TLS) are spliced to the outbound TCP connection, both ways.
    """

    arguments = [
        (b"host", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"publicKey", amp.String()),
        (b"nonce", amp.String()),
        (b"signature", amp.String()),
    ]
    response = []
    errors = {
        HopRefused: b"HOP_REFUSED",
        HopLimit: b"HOP_LIMIT",
        HopUnreachable: b"HOP_UNREACHABLE",
        TryAgain: b"TRY_AGAIN",
    }


def modeParts(mode: str) -> frozenset[str]:
    """
    The parts of a registration mode: C{"tcp+udp"} is C{{"tcp", "udp"}}.

    @param mode: One of L{MODES}.
    """
    return frozenset(mode.split("+"))


def negotiateVersion(theirMin: int, theirMax: int) -> int:
    """
    Pick the highest protocol version both sides speak.

    @param theirMin: The lowest version the peer speaks.
    @param theirMax: The highest version the peer speaks.
    @return: The chosen version.
    @raise UnsupportedVersion: When the ranges do not overlap.
    """
    version = min(theirMax, MAX_VERSION)
    if version < max(theirMin, MIN_VERSION):
        raise UnsupportedVersion(
            f"no common protocol version: peer speaks {theirMin}..{theirMax}, "
            f"this relay {MIN_VERSION}..{MAX_VERSION}"
        )
    return version


def helloSignatureMessage(exporterValue: bytes) -> bytes:
    """
    The bytes the relay signs to prove its identity on one TLS session.

    @param exporterValue: The session's exported keying material for L{EXPORTER_HELLO}.
    @return: The message to sign.
    """
    return HELLO_SIGNATURE_PREFIX + exporterValue


def exportKeyingMaterial(transport: object, label: bytes) -> bytes:
    """
    Export keying material (RFC 5705 / RFC 8446 section 7.5) from the TLS session under C{transport}.

    @param transport: A L{twisted.protocols.tls.TLSMemoryBIOProtocol} whose handshake has finished.
    @param label: The exporter label.
    @return: L{EXPORTER_LENGTH} bytes, equal on both ends of the session.
    """
    connection = transport.getHandle()  # type: ignore[attr-defined]
    return bytes(connection.export_keying_material(label, EXPORTER_LENGTH))
