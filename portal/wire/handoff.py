"""
What one worker of a relay (C{--workers}) sends another with a visitor's socket: the payload of
one UNIX datagram whose ancillary data carries the descriptor (L{portal.relay.handoff}).

Three kinds, told apart by the first byte::

    TLS visitor of the public port    its bytes read so far, as they came: a ClientHello, so a
                                      TLS handshake record whose first byte is 22 (0x16)
    TLS visitor, nothing read         0x01 alone: the sending worker only peeked at the
                                      ClientHello, which is still in the socket for the adopting
                                      worker to read (a visitor handed over as it was accepted)
    visitor of a raw TCP lease port   0x00, then the port (2 bytes, big-endian); nothing was read
                                      from the visitor, which sends its bytes to the adopting worker

The first kind is the message workers sent before raw TCP ports were handed over, unchanged, so a
worker of the previous version and one of this version understand each other's TLS visitors. A
payload of any other shape is refused with the reason (L{MalformedHandoff}).
"""

from __future__ import annotations

import struct

import attrs

#: The first byte of a TLS visitor's handoff: the TLS record type of a handshake (its ClientHello).
TLS_KIND = 0x16

#: The first byte of a raw TCP port visitor's handoff.
PORT_KIND = 0x00

#: The whole handoff of a TLS visitor of which nothing was read (its ClientHello is in its socket).
UNREAD_KIND = 0x01

_PORT = struct.Struct("!BH")


class MalformedHandoff(ValueError):
    """
    A handoff payload that is neither kind, with the reason.
    """


@attrs.frozen
class Handoff:
    """
    A visitor handed from one worker to another (its socket travels beside this).

    @ivar prefix: A TLS visitor's bytes read so far (its ClientHello); empty for a raw TCP visitor
        and for a TLS visitor handed over before anything was read.
    @ivar tcpPort: For a visitor of a raw TCP lease port, the port (the adopting worker serves it
        as a visitor of its own listener on that port); L{None} for a TLS visitor.
    """

    prefix: bytes = b""
    tcpPort: int | None = None


def encodeHandoff(handoff: Handoff) -> bytes:
    """
    @return: The datagram payload for C{handoff}.
    @raise ValueError: For a handoff that has no encoding: a TLS visitor whose bytes do not start a
        TLS handshake record, a port out of 1-65535, or a port with bytes read.
    """
    if handoff.tcpPort is not None:
        if not 0 < handoff.tcpPort < 65536:
            raise ValueError(f"no TCP port {handoff.tcpPort}")
        if handoff.prefix:
            raise ValueError("a raw TCP visitor is handed over before any byte is read")
        return _PORT.pack(PORT_KIND, handoff.tcpPort)
    if not handoff.prefix:
        return bytes([UNREAD_KIND])
    if handoff.prefix[:1] != bytes([TLS_KIND]):
        raise ValueError("a TLS visitor's bytes start with a handshake record (0x16)")
    return handoff.prefix


def parseHandoff(payload: bytes) -> Handoff:
    """
    @param payload: A datagram's payload.
    @return: The handoff it holds.
    @raise MalformedHandoff: When it is empty, of an unknown kind, an unread visitor's or a port
        message of the wrong length, or a port message with port 0.
    """
    if not payload:
        raise MalformedHandoff("empty handoff")
    kind = payload[0]
    if kind == TLS_KIND:
        return Handoff(prefix=payload)
    if kind == UNREAD_KIND:
        if len(payload) != 1:
            raise MalformedHandoff(f"an unread TLS visitor's handoff is 1 byte, not {len(payload)}")
        return Handoff()
    if kind != PORT_KIND:
        raise MalformedHandoff(f"unknown handoff kind 0x{kind:02x}")
    if len(payload) != _PORT.size:
        raise MalformedHandoff(f"a raw TCP port handoff is {_PORT.size} bytes, not {len(payload)}")
    _, port = _PORT.unpack(payload)
    if port == 0:
        raise MalformedHandoff("a raw TCP port handoff names port 0")
    return Handoff(tcpPort=port)
