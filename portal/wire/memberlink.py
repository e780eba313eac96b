"""
Framing of member-to-member links in a relay cluster (docs/cluster.md): plain TCP with an
authenticated attach, like a data session (L{portal.wire.attach}).

A visitor that arrives at member B for a lease held by member A is forwarded, still encrypted, over a
TCP connection from B to A's control port::

    B -> A   MAGIC                                              (5 bytes, never 0x16: not TLS)
    A -> B   nonce                                              (16 random bytes, fresh per link)
    B -> A   length + header + HMAC(pairKey, "member" A B nonce header)
    A -> B   ACK                                                (1 byte)
    both     the visitor's bytes, starting with the ClientHello B already read (stream mode),
             or from the first byte (raw TCP mode: the header names the lease's port),
             or datagram frames (UDP mode: the header names the lease's UDP port; framing in
             L{portal.wire.udpframes})

C{pairKey} comes from a static ECDH between the two members' secp256k1 relay identities
(L{pairKey}): each member computes it from its own private key and the other's public key, so the
HMAC proves that the link comes from the member it names, to the member it is addressed to, and A's
fresh nonce makes every proof single-use. Nothing secret crosses the link, and the payload is the
visitor's TLS, so the link itself needs no encryption: the relays splice it in the kernel on both hops.
A raw TCP visitor's bytes are opaque to the link in the same way: the holding member seals them
towards the tunnel, as for a visitor of its own port. A UDP link carries the datagrams of every
visitor of one UDP port, each frame naming the visitor's address, in both directions; UDP payload
is the tenant's own, sealed by the holding member towards the tunnel.

A member that predates C{udpPort} ignores the field and takes the link for a TLS visitor: it
refuses the first frame as a malformed ClientHello (a TLS alert), which the forwarding member reads
as a bad frame and closes the link on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import attrs
import coincurve

MAGIC = b"PTLM\x01"
NONCE_LENGTH = 16
MAC_LENGTH = 32
ACK = b"\x01"
#: Largest encoded header accepted.
MAX_HEADER_LENGTH = 2048
_LENGTH = struct.Struct("!H")
_LABEL = b"portal-member-v1"


class MemberLinkError(Exception):
    """
    A member link sent something that is not a valid header, or a proof that does not check.
    """


@attrs.frozen
class MemberHeader:
    """
    What the receiving member B tells the holding member A about a forwarded visitor.

    @ivar fromId: B's relay identity id.
    @ivar fromKey: B's compressed public key (it must hash to C{fromId}).
    @ivar hostname: The SNI hostname the visitor asked for.
    @ivar peerHost: The visitor's address.
    @ivar peerPort: The visitor's port.
    @ivar tcpPort: In raw TCP mode, the lease's public port the visitor connected to (then
        C{hostname} is the lease's hostname); L{None} for a TLS visitor routed by its SNI.
    @ivar udpPort: In UDP mode, the lease's public UDP port whose datagrams the link carries (then
        C{hostname} is the lease's hostname and C{peerHost}/C{peerPort} are the forwarding
        member's first visitor, for logs: every frame names its own visitor); never set together
        with C{tcpPort}.
    """

    fromId: str
    fromKey: bytes
    hostname: str
    peerHost: str
    peerPort: int
    tcpPort: int | None = None
    udpPort: int | None = None


def pairKey(ownKey: coincurve.PrivateKey, otherPublicKey: bytes) -> bytes:
    """
    The key two members share: SHA-256 of their static ECDH secret, under a label.

    @param ownKey: This member's private key.
    @param otherPublicKey: The other member's compressed public key.
    @return: 32 bytes, the same on both sides.
    @raise MemberLinkError: When C{otherPublicKey} is not a valid secp256k1 point.
    """
    try:
        secret = ownKey.ecdh(otherPublicKey)
    except ValueError as e:
        raise MemberLinkError(f"not a secp256k1 public key: {e}") from None
    return hashlib.sha256(_LABEL + secret).digest()


def _mac(key: bytes, toId: str, nonce: bytes, header: bytes) -> bytes:
    """
    The HMAC that binds a header to the addressed member and the link's nonce.
    """
    message = b"\0".join([_LABEL, toId.encode("ascii"), nonce, header])
    return hmac.new(key, message, hashlib.sha256).digest()


def encodeMemberHeader(key: bytes, toId: str, nonce: bytes, header: MemberHeader) -> bytes:
    """
    Encode and authenticate a header for the member C{toId}.

    @param key: The L{pairKey} of the two members.
    @param toId: The receiving member's identity id.
    @param nonce: The receiving member's nonce for this link.
    @param header: What to send.
    @return: Length, header and HMAC, ready to write.
    """
    fields: dict[str, object] = {
        "from": header.fromId,
        "key": header.fromKey.hex(),
        "hostname": header.hostname,
        "peer": [header.peerHost, header.peerPort],
    }
    if header.tcpPort is not None and header.udpPort is not None:
        raise MemberLinkError("a member link carries a TCP visitor or UDP datagrams, not both")
    if header.tcpPort is not None:
        fields["tcpPort"] = header.tcpPort
    if header.udpPort is not None:
        fields["udpPort"] = header.udpPort
    body = json.dumps(fields, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_HEADER_LENGTH:
        raise MemberLinkError("member header too long")
    return _LENGTH.pack(len(body)) + body + _mac(key, toId, nonce, body)


def parseMemberHeader(data: bytes) -> tuple[MemberHeader, bytes, bytes, int] | None:
    """
    Parse, without checking the HMAC, a header received on a member link.

    The receiving member needs the sender's public key from the header to compute the pair key, so
    parsing and checking are two steps: L{checkMemberHeader} must follow.

    @param data: The bytes received after the nonce was sent.
    @return: L{None} while incomplete; otherwise the header, its raw bytes, the received HMAC and the
        number of bytes consumed.
    @raise MemberLinkError: When malformed.
    """
    if len(data) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack_from(data)
    if length == 0 or length > MAX_HEADER_LENGTH:
        raise MemberLinkError(f"member header length {length} out of range")
    end = _LENGTH.size + length + MAC_LENGTH
    if len(data) < end:
        return None
    body = data[_LENGTH.size : _LENGTH.size + length]
    tag = data[_LENGTH.size + length : end]
    try:
        fields = json.loads(body)
        fromId = fields["from"]
        fromKey = bytes.fromhex(fields["key"])
        hostname = fields["hostname"]
        peerHost, peerPort = fields["peer"]
        tcpPort = fields.get("tcpPort")
        udpPort = fields.get("udpPort")
    except (ValueError, KeyError, TypeError) as e:
        raise MemberLinkError(f"malformed member header: {e}") from None
    if not (
        isinstance(fromId, str)
        and isinstance(hostname, str)
        and isinstance(peerHost, str)
        and isinstance(peerPort, int)
        and not isinstance(peerPort, bool)
        and 0 <= peerPort < 65536
        and (tcpPort is None or _isPort(tcpPort))
        and (udpPort is None or _isPort(udpPort))
    ):
        raise MemberLinkError("malformed member header: wrong field types")
    if tcpPort is not None and udpPort is not None:
        raise MemberLinkError("malformed member header: both tcpPort and udpPort")
    header = MemberHeader(fromId, fromKey, hostname, peerHost, peerPort, tcpPort, udpPort)
    return header, body, tag, end


def _isPort(value: object) -> bool:
    """
    @return: Whether C{value} is a port number a lease can have (1-65535).
    """
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def checkMemberHeader(key: bytes, toId: str, nonce: bytes, body: bytes, tag: bytes) -> bool:
    """
    Check a header's HMAC, in constant time.

    @param key: The L{pairKey} computed with the key the header names.
    @param toId: This member's identity id.
    @param nonce: The nonce this member sent on the link.
    @param body: The header's raw bytes.
    @param tag: The HMAC received.
    @return: Whether the header is authentic.
    """
    return hmac.compare_digest(_mac(key, toId, nonce, body), tag)
