"""
Frames of a UDP member link (docs/cluster.md): after the attach of L{portal.wire.memberlink} with
a C{udpPort}, both members send length-prefixed frames, each carrying one datagram and the address
of the visitor it came from (forwarding member to holder) or goes to (holder to forwarding member)::

    length   4 bytes, big-endian: the bytes that follow in this frame
    family   1 byte: 4 (IPv4) or 6 (IPv6)
    address  4 or 16 bytes
    port     2 bytes, big-endian, never 0
    payload  the datagram, at most L{MAX_DATAGRAM} bytes (may be empty)

A pure codec, like L{portal.wire.clienthello}: L{encodeFrame} builds a frame, L{FrameReader} cuts
a byte stream into frames and refuses, with a reason, anything that is not one. A length over the
limit is refused as soon as its four bytes are read, so a reader never buffers more than one
frame's worth.
"""

from __future__ import annotations

import socket
import struct

import attrs

#: The largest datagram a frame carries: the C{maxPacketSize} the relay reads UDP ports with
#: (L{portal.relay.udp.MAX_PACKET_SIZE}).
MAX_DATAGRAM = 65535

_LENGTH = struct.Struct("!I")
_PORT = struct.Struct("!H")
_FAMILIES = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}
#: The smallest frame body: family, an IPv4 address and a port.
_MIN_BODY = 1 + 4 + _PORT.size
#: The largest frame body: family, an IPv6 address, a port and the largest datagram.
MAX_BODY = 1 + 16 + _PORT.size + MAX_DATAGRAM


class FrameError(Exception):
    """
    Bytes on a UDP member link that are not a valid frame.

    @ivar reason: Why, in a few words (for the log event).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class Frame:
    """
    One datagram on a UDP member link.

    @ivar host: The visitor's address, as an IP literal (IPv6 without brackets).
    @ivar port: The visitor's port.
    @ivar payload: The datagram.
    """

    host: str
    port: int
    payload: bytes


def encodeFrame(host: str, port: int, payload: bytes) -> bytes:
    """
    Encode one datagram and its visitor's address as a frame.

    @param host: An IPv4 or IPv6 literal (an IPv6 scope, C{%eth0}, is not carried).
    @param port: The visitor's port, 1-65535.
    @param payload: The datagram.
    @return: The frame.
    @raise FrameError: For a host that is not an IP literal, a port out of range or a payload
        over L{MAX_DATAGRAM}.
    """
    if len(payload) > MAX_DATAGRAM:
        raise FrameError(f"datagram of {len(payload)} bytes is over {MAX_DATAGRAM}")
    if not 0 < port < 65536:
        raise FrameError(f"port {port} out of range")
    try:
        if ":" in host:
            family, packed = 6, socket.inet_pton(socket.AF_INET6, host)
        else:
            family, packed = 4, socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        raise FrameError(f"{host!r} is not an IP address") from None
    body = bytes([family]) + packed + _PORT.pack(port)
    return _LENGTH.pack(len(body) + len(payload)) + body + payload


def parseFrame(data: bytes | bytearray, offset: int = 0) -> tuple[Frame, int] | None:
    """
    Parse the frame at C{offset} of C{data}.

    @return: L{None} while incomplete; otherwise the frame and the offset just after it.
    @raise FrameError: When the bytes cannot be a frame.
    """
    if len(data) - offset < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack_from(data, offset)
    if length > MAX_BODY:
        raise FrameError(f"frame of {length} bytes is over {MAX_BODY}")
    if length < _MIN_BODY:
        raise FrameError(f"frame of {length} bytes is too short for an address")
    start = offset + _LENGTH.size
    end = start + length
    if len(data) < end:
        return None
    familyByte = data[start]
    if familyByte not in _FAMILIES:
        raise FrameError(f"unknown address family {familyByte}")
    family, size = _FAMILIES[familyByte]
    if length < 1 + size + _PORT.size:
        raise FrameError(f"frame of {length} bytes is too short for an IPv{familyByte} address")
    if length - 1 - size - _PORT.size > MAX_DATAGRAM:
        raise FrameError(f"IPv{familyByte} frame carries more than {MAX_DATAGRAM} bytes")
    host = socket.inet_ntop(family, bytes(data[start + 1 : start + 1 + size]))
    (port,) = _PORT.unpack_from(data, start + 1 + size)
    if port == 0:
        raise FrameError("port 0")
    payload = bytes(data[start + 1 + size + _PORT.size : end])
    return Frame(host, port, payload), end


class FrameReader:
    """
    Cuts the bytes of a UDP member link into frames.

    It holds at most one incomplete frame (at most L{MAX_BODY} and its length).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """
        Take bytes read from the link.

        @param data: The bytes.
        @return: The frames completed by them, in order.
        @raise FrameError: At the first bytes that are not a frame; the reader must not be fed
            again (the link is to be closed).
        """
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        while True:
            parsed = parseFrame(buffer, offset)
            if parsed is None:
                break
            frame, offset = parsed
            frames.append(frame)
        if offset:
            del buffer[:offset]
        return frames

    @property
    def buffered(self) -> int:
        """
        Bytes held for a frame not yet complete.
        """
        return len(self._buffer)
