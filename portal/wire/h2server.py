"""
The server side of an HTTP/2 connection (RFC 9113) as pure code: bytes from the client in, events
out, frames to send queued. It replaces the C{h2} package's general state machine on the routed
HTTP path, where that machine cost a third of the tunnel's time per request (per-frame objects,
enum lookups, a log call formatting every frame's C{repr}): frames are parsed in place from one
buffer, streams are small records, and header blocks go through L{portal.wire.headercompression}.

What it does and checks, following RFC 9113:
 - the client preface, then C{SETTINGS} first; frame sizes against the C{SETTINGS_MAX_FRAME_SIZE}
   it advertises (16,384), exact lengths of C{PRIORITY}, C{RST_STREAM}, C{PING}, C{WINDOW_UPDATE}
   and C{SETTINGS} frames, padding;
 - stream ids: odd, increasing; frames on idle streams refused; at most L{MAX_CONCURRENT_STREAMS}
   open (one more is refused with C{REFUSED_STREAM}); trailers must end the stream;
 - header blocks: C{CONTINUATION} right after, at most L{MAX_HEADER_BLOCK} bytes in at most
   L{MAX_CONTINUATIONS} frames (the C{CONTINUATION} floods of 2024), decoded lists at most
   L{MAX_HEADER_LIST_SIZE} bytes; every block is decoded, even one for a stream that is refused,
   so that the decoder's table stays in step;
 - flow control both ways: the client's C{DATA} against the windows it was given (windows are given
   back as the application acknowledges what it consumed, in steps of half a window), the server's
   against the client's windows (a send beyond them is an error of the caller), C{WINDOW_UPDATE}
   and C{SETTINGS_INITIAL_WINDOW_SIZE} overflows;
 - C{content-length} against the C{DATA} that came (the request's other fields are the
   application's to check);
 - C{PING} answered, C{PUSH_PROMISE} from a client refused, unknown frame types ignored.

A violation of the connection's rules raises L{ProtocolError} after a C{GOAWAY} is queued; the
connection is then over. A violation confined to one stream resets that stream (C{RST_STREAM}) and
is reported as L{StreamReset} with C{remote=False}, so the application can count it (the
"MadeYouReset" variant of Rapid Reset). RFC 9113 5.4.1 lets an endpoint treat a stream error as a
connection error: rare ones with no legitimate cause (a stream depending on itself, a malformed
C{PRIORITY}) are.
Frames on closed streams (RFC 9113 5.1; the last L{MAX_CLOSED_STREAMS} are remembered with how they
closed) are ignored after the server's reset, since the client may have sent them before it saw it,
and are a stream error C{STREAM_CLOSED} after the client's own reset and a connection error
C{STREAM_CLOSED} once both sides ended the stream; their C{DATA} gives back its share of the
connection's window. A new stream with an id below the last one is a connection error. The
client's C{GOAWAY} is reported (L{ConnectionTerminated}); the connection goes on for the streams
in flight.

Priorities are not scheduled (RFC 9113 deprecates the scheme); server push is never used.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable

from portal.wire.headercompression import (
    HeaderBlockError,
    HeaderDecoder,
    HeaderEncoder,
    HeaderListTooLarge,
)

#: What a client sends first (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Streams a client may have open at once (advertised as C{SETTINGS_MAX_CONCURRENT_STREAMS}).
MAX_CONCURRENT_STREAMS = 100
#: The decoded size of a request's header list, as RFC 7541 counts it (advertised).
MAX_HEADER_LIST_SIZE = 64 * 1024
#: The encoded size of one header block, all its frames together.
MAX_HEADER_BLOCK = 64 * 1024
#: The C{CONTINUATION} frames one header block may take.
MAX_CONTINUATIONS = 128
#: The largest frame the client may send (the protocol's default, advertised).
MAX_FRAME_SIZE = 16_384
#: The flow-control window each stream of the client starts with (advertised as
#: C{SETTINGS_INITIAL_WINDOW_SIZE}).
INITIAL_WINDOW = 262_144
#: The flow-control window of the whole connection (opened from the protocol's 65,535 by a
#: C{WINDOW_UPDATE} after the server's C{SETTINGS}).
CONNECTION_WINDOW = 1_048_576
#: The largest flow-control window (RFC 9113 6.9.1).
MAX_WINDOW = 2**31 - 1
#: Closed streams remembered with how they closed, the most recent ones (frames on older ones are
#: ignored, as on a stream the server reset).
MAX_CLOSED_STREAMS = 512

# How a remembered stream closed.
_ENDED = 1
_RESET_BY_CLIENT = 2
_RESET_BY_SERVER = 3

# Frame types (RFC 9113 6).
_DATA = 0x0
_HEADERS = 0x1
_PRIORITY = 0x2
_RST_STREAM = 0x3
_SETTINGS = 0x4
_PUSH_PROMISE = 0x5
_PING = 0x6
_GOAWAY = 0x7
_WINDOW_UPDATE = 0x8
_CONTINUATION = 0x9

# Flags.
_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20

# Settings (RFC 9113 6.5.2).
_HEADER_TABLE_SIZE = 0x1
_ENABLE_PUSH = 0x2
_MAX_CONCURRENT_STREAMS = 0x3
_INITIAL_WINDOW_SIZE = 0x4
_MAX_FRAME_SIZE = 0x5
_MAX_HEADER_LIST_SIZE = 0x6

#: A frame header: length (24 bits, as 8 + 16), type, flags, stream id (with its reserved bit).
_FRAME_HEADER = struct.Struct(">BHBBL")
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")
_TWO_U32 = struct.Struct(">LL")


class ErrorCode(enum.IntEnum):
    """
    HTTP/2 error codes (RFC 9113 7).
    """

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class ProtocolError(Exception):
    """
    The client broke the connection's rules: a C{GOAWAY} with L{code} is queued, the connection is
    over.

    @ivar code: The error code sent.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamStateError(Exception):
    """
    The server tried to send on a stream that is closed (or that the client reset), or more than
    the client's flow-control windows allow.
    """


# Events. Plain classes with slots rather than attrs values: several are made per request.


class RequestReceived:
    """
    A request's header block opened stream C{streamID}.

    @ivar streamID: The stream.
    @ivar headers: The decoded fields, names and values as bytes, in order.
    """

    __slots__ = ("streamID", "headers")

    def __init__(self, streamID: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.streamID = streamID
        self.headers = headers


class DataReceived:
    """
    A C{DATA} frame's payload for stream C{streamID}.

    @ivar data: The payload, without padding.
    @ivar flowControlled: What the frame counted against the windows (padding included): to
        give back with L{ServerConnection.acknowledgeReceivedData} once consumed.
    """

    __slots__ = ("streamID", "data", "flowControlled")

    def __init__(self, streamID: int, data: bytes, flowControlled: int) -> None:
        self.streamID = streamID
        self.data = data
        self.flowControlled = flowControlled


class StreamEnded:
    """
    The client ended its side of stream C{streamID} (the request is complete).
    """

    __slots__ = ("streamID",)

    def __init__(self, streamID: int) -> None:
        self.streamID = streamID


class StreamReset:
    """
    Stream C{streamID} is over before its end: reset by the client (C{remote}), or by the server
    for a stream error of the client's (C{remote} false; C{RST_STREAM} is queued).

    @ivar code: The error code.
    @ivar reason: What the client did, for a reset of the server's.
    """

    __slots__ = ("streamID", "code", "remote", "reason")

    def __init__(self, streamID: int, code: int, remote: bool, reason: str = "") -> None:
        self.streamID = streamID
        self.code = code
        self.remote = remote
        self.reason = reason


class WindowUpdated:
    """
    The client gave more window to stream C{streamID}, or to the connection (C{0}).
    """

    __slots__ = ("streamID",)

    def __init__(self, streamID: int) -> None:
        self.streamID = streamID


class WindowsChanged:
    """
    The client changed C{SETTINGS_INITIAL_WINDOW_SIZE}: every stream's window moved. This event and
    L{WindowUpdated} for the connection come at most once, together, per
    L{ServerConnection.receiveData}.
    """

    __slots__ = ()


class ConnectionTerminated:
    """
    The client sent C{GOAWAY}: it opens no more streams; those in flight may finish.

    @ivar code: Its error code.
    """

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


Event = (
    RequestReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | WindowsChanged
    | ConnectionTerminated
)


class _Stream:
    """
    One open stream.

    @ivar inbound: The window the client has left on this stream.
    @ivar unacknowledged: Bytes acknowledged by the application and not yet given back.
    @ivar outbound: The window the server has left on this stream.
    @ivar remoteEnded: Whether the client ended its side.
    @ivar localEnded: Whether the server ended its side.
    @ivar expected: The C{content-length} still to come, if the request gave one.
    """

    __slots__ = ("inbound", "unacknowledged", "outbound", "remoteEnded", "localEnded", "expected")

    def __init__(self, inbound: int, outbound: int) -> None:
        self.inbound = inbound
        self.unacknowledged = 0
        self.outbound = outbound
        self.remoteEnded = False
        self.localEnded = False
        self.expected: int | None = None


def _frame(kind: int, flags: int, streamID: int, payload: bytes = b"") -> bytes:
    """
    One frame, serialized.
    """
    length = len(payload)
    return _FRAME_HEADER.pack(length >> 16, length & 0xFFFF, kind, flags, streamID) + payload


class ServerConnection:
    """
    The state of one HTTP/2 connection, server side: feed it with L{receiveData}, act on the events,
    answer with the C{send} methods, write what L{dataToSend} returns.

    @ivar maxOutboundFrameSize: The largest frame the client accepts.
    @ivar lastStreamID: The highest stream id the client opened.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._out = bytearray()
        self._prefaceSeen = False
        self._settingsSeen = False
        self._over = False
        self._streams: dict[int, _Stream] = {}
        self._closed: dict[int, int] = {}
        #: Streams below this id may have been closed and forgotten.
        self._forgottenBelow = 0
        self.lastStreamID = 0
        self.remoteGoingAway = False
        self.maxOutboundFrameSize = 16_384
        self._remoteInitialWindow = 65_535
        self._outbound = 65_535
        self._inbound = CONNECTION_WINDOW
        self._unacknowledged = 0
        self._allWindowsNoted = False
        # A header block being collected: its stream, fragments, END_STREAM flag, frame count.
        self._blockStream = 0
        self._block: bytearray | None = None
        self._blockEnds = False
        self._blockFrames = 0
        self._decoder = HeaderDecoder(maxListSize=MAX_HEADER_LIST_SIZE)
        self._encoder = HeaderEncoder()
        self._remoteTableSize = 4096

    def initiateConnection(self) -> None:
        """
        Queue the server's preface: its C{SETTINGS}, and the C{WINDOW_UPDATE} that opens the
        connection's window to L{CONNECTION_WINDOW}.
        """
        settings = b"".join(
            _SETTING.pack(code, value)
            for code, value in (
                (_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
                (_INITIAL_WINDOW_SIZE, INITIAL_WINDOW),
                (_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
                (_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
                (_ENABLE_PUSH, 0),
            )
        )
        self._out += _frame(_SETTINGS, 0, 0, settings)
        if CONNECTION_WINDOW > 65_535:
            self._out += _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - 65_535))

    def dataToSend(self) -> bytes:
        """
        Take the frames queued for the client.
        """
        out = self._out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    @property
    def openStreams(self) -> int:
        """
        How many streams are open (either side not yet ended).
        """
        return len(self._streams)

    # Receiving.

    def receiveData(self, data: bytes) -> list[Event]:
        """
        Take bytes from the client: the events of the whole frames among them, in order.

        @raise ProtocolError: The client broke the connection's rules; the C{GOAWAY} is queued.
        """
        if self._over:
            return []
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        self._allWindowsNoted = False
        position = 0
        try:
            if not self._prefaceSeen:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 preface")
                    return events
                if buffer[: len(PREFACE)] != PREFACE:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 preface")
                self._prefaceSeen = True
                position = len(PREFACE)
            size = len(buffer)
            unpack = _FRAME_HEADER.unpack_from
            while size - position >= 9 and not self._over:
                high, low, kind, flags, streamID = unpack(buffer, position)
                length = high << 16 | low
                if length > MAX_FRAME_SIZE:
                    raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                end = position + 9 + length
                if end > size:
                    break
                payload = bytes(buffer[position + 9 : end])
                position = end
                streamID &= 0x7FFFFFFF
                if not self._settingsSeen:
                    if kind != _SETTINGS or flags & _ACK:
                        raise ProtocolError(
                            ErrorCode.PROTOCOL_ERROR, "the preface is not followed by SETTINGS"
                        )
                    self._settingsSeen = True
                if self._block is not None and kind != _CONTINUATION:
                    raise ProtocolError(
                        ErrorCode.PROTOCOL_ERROR, "a header block without its CONTINUATION"
                    )
                if kind == _DATA:
                    self._data(flags, streamID, payload, events)
                elif kind == _HEADERS:
                    self._headers(flags, streamID, payload, events)
                elif kind == _WINDOW_UPDATE:
                    self._windowUpdate(streamID, payload, events)
                elif kind == _RST_STREAM:
                    self._resetByClient(streamID, payload, events)
                elif kind == _SETTINGS:
                    self._settings(flags, streamID, payload, events)
                elif kind == _PING:
                    self._ping(flags, streamID, payload)
                elif kind == _CONTINUATION:
                    self._continuation(flags, streamID, payload, events)
                elif kind == _PRIORITY:
                    self._priority(streamID, payload)
                elif kind == _GOAWAY:
                    self._goAway(streamID, payload, events)
                elif kind == _PUSH_PROMISE:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                # Other frame types are extensions this server does not know: ignored.
        except ProtocolError as e:
            self._goAwayWith(e.code)
            raise
        finally:
            del buffer[:position]
        return events

    def _data(self, flags: int, streamID: int, payload: bytes, events: list[Event]) -> None:
        """
        A C{DATA} frame.
        """
        if not streamID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        flowControlled = len(payload)
        if flags & _PADDED:
            data = _unpad(payload)
        else:
            data = payload
        self._inbound -= flowControlled
        if self._inbound < 0:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        stream = self._streams.get(streamID)
        if stream is None:
            if streamID > self.lastStreamID or not streamID & 1:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            self._giveBack(flowControlled)
            self._onClosed(streamID, "DATA", events)
            return
        if stream.remoteEnded:
            self._giveBack(flowControlled)
            self._streamError(streamID, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM", events)
            return
        stream.inbound -= flowControlled
        if stream.inbound < 0:
            self._giveBack(flowControlled)
            self._streamError(
                streamID, ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the stream's window", events
            )
            return
        expected = stream.expected
        if expected is not None:
            expected -= len(data)
            stream.expected = expected
            if expected < 0:
                self._giveBack(flowControlled)
                self._streamError(
                    streamID, ErrorCode.PROTOCOL_ERROR, "more DATA than content-length", events
                )
                return
        events.append(DataReceived(streamID, data, flowControlled))
        if flags & _END_STREAM:
            self._remoteEnd(streamID, stream, events)

    def _headers(self, flags: int, streamID: int, payload: bytes, events: list[Event]) -> None:
        """
        A C{HEADERS} frame: a request's head, or its trailers; the block is complete here or
        continues in C{CONTINUATION} frames.
        """
        if not streamID or not streamID & 1:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {streamID}")
        start = 0
        end = len(payload)
        if flags & _PADDED:
            if not end:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "a padded frame with no length")
            start = 1
            end -= payload[0]
        if flags & _PRIORITY_FLAG:
            if end - start < 5:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for priority")
            if _U32.unpack_from(payload, start)[0] & 0x7FFFFFFF == streamID:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a stream depends on itself")
            start += 5
        if end < start:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "more padding than payload")
        fragment = payload[start:end] if start or end != len(payload) else payload
        endStream = bool(flags & _END_STREAM)
        if flags & _END_HEADERS:
            self._headerBlock(streamID, fragment, endStream, events)
        else:
            self._block = bytearray(fragment)
            self._blockStream = streamID
            self._blockEnds = endStream
            self._blockFrames = 0
            if len(fragment) > MAX_HEADER_BLOCK:
                raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "a header block too large")

    def _continuation(self, flags: int, streamID: int, payload: bytes, events: list[Event]) -> None:
        """
        A C{CONTINUATION} frame of the header block being collected.
        """
        block = self._block
        if block is None or streamID != self._blockStream:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION out of place")
        block += payload
        self._blockFrames += 1
        if len(block) > MAX_HEADER_BLOCK or self._blockFrames > MAX_CONTINUATIONS:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "a header block too large")
        if flags & _END_HEADERS:
            self._block = None
            self._headerBlock(streamID, bytes(block), self._blockEnds, events)

    def _headerBlock(
        self, streamID: int, block: bytes, endStream: bool, events: list[Event]
    ) -> None:
        """
        A complete header block: decoded (always, to keep the decoder's table in step), then a new
        request, trailers, or nothing (a stream already closed).
        """
        try:
            headers = self._decoder.decode(block)
        except HeaderListTooLarge as e:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "a header list too large") from e
        except HeaderBlockError as e:
            raise ProtocolError(ErrorCode.COMPRESSION_ERROR, f"bad header block: {e}") from e
        stream = self._streams.get(streamID)
        if stream is None:
            if streamID <= self.lastStreamID:
                if streamID not in self._closed and streamID < self._forgottenBelow:
                    return  # Closed long ago: ignored.
                if streamID not in self._closed:
                    raise ProtocolError(
                        ErrorCode.PROTOCOL_ERROR, "a new stream with an id below the last one"
                    )
                self._onClosed(streamID, "HEADERS", events)
                return
            self.lastStreamID = streamID
            if len(self._streams) >= MAX_CONCURRENT_STREAMS:
                self._out += _frame(_RST_STREAM, 0, streamID, _U32.pack(ErrorCode.REFUSED_STREAM))
                self._remember(streamID, _RESET_BY_SERVER)
                events.append(
                    StreamReset(
                        streamID, ErrorCode.REFUSED_STREAM, False, "too many concurrent streams"
                    )
                )
                return
            stream = self._streams[streamID] = _Stream(INITIAL_WINDOW, self._remoteInitialWindow)
            for name, value in headers:
                if name == b"content-length" and value.isdigit():
                    stream.expected = int(value)
            events.append(RequestReceived(streamID, headers))
            if endStream:
                self._remoteEnd(streamID, stream, events)
            return
        if stream.remoteEnded:
            self._streamError(streamID, ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM", events)
        elif not endStream:
            self._streamError(
                streamID, ErrorCode.PROTOCOL_ERROR, "trailers that do not end the stream", events
            )
        else:
            self._remoteEnd(streamID, stream, events)

    def _remoteEnd(self, streamID: int, stream: _Stream, events: list[Event]) -> None:
        """
        The client ended its side: the body must have been as long as it said.
        """
        if stream.expected:
            self._streamError(
                streamID, ErrorCode.PROTOCOL_ERROR, "less DATA than content-length", events
            )
            return
        stream.remoteEnded = True
        events.append(StreamEnded(streamID))
        if stream.localEnded:
            del self._streams[streamID]
            self._remember(streamID, _ENDED)

    def _windowUpdate(self, streamID: int, payload: bytes, events: list[Event]) -> None:
        """
        A C{WINDOW_UPDATE} frame.
        """
        if len(payload) != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not streamID:
            if not increment:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._outbound += increment
            if self._outbound > MAX_WINDOW:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "a window beyond 2^31-1")
            self._noteAllWindows(WindowUpdated(0), events)
            return
        stream = self._streams.get(streamID)
        if stream is None:
            if streamID > self.lastStreamID or not streamID & 1:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if not increment:
            self._streamError(streamID, ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0", events)
            return
        stream.outbound += increment
        if stream.outbound > MAX_WINDOW:
            self._streamError(
                streamID, ErrorCode.FLOW_CONTROL_ERROR, "a window beyond 2^31-1", events
            )
            return
        events.append(WindowUpdated(streamID))

    def _resetByClient(self, streamID: int, payload: bytes, events: list[Event]) -> None:
        """
        An C{RST_STREAM} frame.
        """
        if len(payload) != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        if not streamID or streamID > self.lastStreamID or not streamID & 1:
            # Even ids are the server's, which opens none: always idle.
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        if self._streams.pop(streamID, None) is not None:
            self._remember(streamID, _RESET_BY_CLIENT)
            events.append(StreamReset(streamID, _U32.unpack(payload)[0], True))

    def _settings(self, flags: int, streamID: int, payload: bytes, events: list[Event]) -> None:
        """
        A C{SETTINGS} frame: applied and acknowledged.
        """
        if streamID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & _ACK:
            if payload:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        initialWindow = self._remoteInitialWindow
        for offset in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, offset)
            if code == _INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(
                        ErrorCode.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE beyond 2^31-1"
                    )
                initialWindow = value
            elif code == _MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise ProtocolError(
                        ErrorCode.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE of {value}"
                    )
                self.maxOutboundFrameSize = value
            elif code == _HEADER_TABLE_SIZE:
                if value != self._remoteTableSize:
                    self._remoteTableSize = value
                    self._encoder.tableSizeChanged()
            elif code == _ENABLE_PUSH:
                if value > 1:
                    raise ProtocolError(
                        ErrorCode.PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH of {value}"
                    )
            # SETTINGS_MAX_CONCURRENT_STREAMS bounds pushes (never sent), the header list size
            # is advisory, and unknown settings are ignored (RFC 9113 6.5.2).
        # The streams' windows move once per frame, by the net change, however many times the
        # frame repeats the setting.
        delta = initialWindow - self._remoteInitialWindow
        if delta:
            self._remoteInitialWindow = initialWindow
            for stream in self._streams.values():
                stream.outbound += delta
                if stream.outbound > MAX_WINDOW:
                    raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "a window beyond 2^31-1")
            self._noteAllWindows(WindowsChanged(), events)
        self._out += _frame(_SETTINGS, _ACK, 0)

    def _ping(self, flags: int, streamID: int, payload: bytes) -> None:
        """
        A C{PING} frame: answered unless it is an answer.
        """
        if streamID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING of the wrong size")
        if not flags & _ACK:
            self._out += _frame(_PING, _ACK, 0, payload)

    def _priority(self, streamID: int, payload: bytes) -> None:
        """
        A C{PRIORITY} frame: checked, not acted on.
        """
        if not streamID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PRIORITY of the wrong size")
        if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == streamID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a stream depends on itself")

    def _goAway(self, streamID: int, payload: bytes, events: list[Event]) -> None:
        """
        A C{GOAWAY} frame: the client is leaving. The connection goes on (the streams in flight
        may finish; L{remoteGoingAway} is set).
        """
        if streamID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY too short")
        self.remoteGoingAway = True
        events.append(ConnectionTerminated(_TWO_U32.unpack_from(payload)[1]))

    def _noteAllWindows(self, event: WindowUpdated | WindowsChanged, events: list[Event]) -> None:
        """
        Report that every stream may send more, once per L{receiveData}: the application then
        walks its streams once, however many such frames came.
        """
        if not self._allWindowsNoted:
            self._allWindowsNoted = True
            events.append(event)

    def _streamError(
        self, streamID: int, code: ErrorCode, reason: str, events: list[Event]
    ) -> None:
        """
        Reset a stream for the client's error in it.
        """
        if self._streams.pop(streamID, None) is not None:
            self._remember(streamID, _RESET_BY_SERVER)
        self._out += _frame(_RST_STREAM, 0, streamID, _U32.pack(code))
        events.append(StreamReset(streamID, code, False, reason))

    def _giveBack(self, size: int) -> None:
        """
        Give the connection's window back for bytes no stream will consume.
        """
        if size:
            self._inbound += size
            self._out += _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(size))

    def _goAwayWith(self, code: ErrorCode) -> None:
        """
        Queue C{GOAWAY}; the connection reads nothing more.
        """
        self._over = True
        self._block = None
        self._out += _frame(_GOAWAY, 0, 0, _TWO_U32.pack(self.lastStreamID, code))

    # Acting.

    def acknowledgeReceivedData(self, size: int, streamID: int) -> None:
        """
        The application consumed C{size} flow-controlled bytes of stream C{streamID}: the client
        gets them back as window, in steps of half a window.
        """
        if not size:
            return
        self._unacknowledged += size
        if self._unacknowledged >= CONNECTION_WINDOW // 2:
            self._inbound += self._unacknowledged
            self._out += _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(self._unacknowledged))
            self._unacknowledged = 0
        stream = self._streams.get(streamID)
        if stream is not None and not stream.remoteEnded:
            stream.unacknowledged += size
            if stream.unacknowledged >= INITIAL_WINDOW // 2:
                stream.inbound += stream.unacknowledged
                self._out += _frame(_WINDOW_UPDATE, 0, streamID, _U32.pack(stream.unacknowledged))
                stream.unacknowledged = 0

    def localFlowControlWindow(self, streamID: int) -> int:
        """
        How many bytes of C{DATA} the server may send on C{streamID} now.

        @raise StreamStateError: The stream is closed.
        """
        stream = self._streams.get(streamID)
        if stream is None or stream.localEnded:
            raise StreamStateError(f"stream {streamID} is closed")
        return min(self._outbound, stream.outbound)

    def sendHeaders(
        self, streamID: int, headers: Iterable[tuple[bytes, bytes]], endStream: bool = False
    ) -> None:
        """
        Send a header block (a response head, an interim response, trailers).

        @raise StreamStateError: The stream is closed.
        """
        stream = self._streams.get(streamID)
        if stream is None or stream.localEnded:
            raise StreamStateError(f"stream {streamID} is closed")
        block = self._encoder.encode(headers)
        size = self.maxOutboundFrameSize
        flags = _END_STREAM if endStream else 0
        if len(block) <= size:
            self._out += _frame(_HEADERS, flags | _END_HEADERS, streamID, block)
        else:
            self._out += _frame(_HEADERS, flags, streamID, block[:size])
            for offset in range(size, len(block), size):
                last = offset + size >= len(block)
                self._out += _frame(
                    _CONTINUATION,
                    _END_HEADERS if last else 0,
                    streamID,
                    block[offset : offset + size],
                )
        if endStream:
            self._localEnd(streamID, stream)

    def sendData(self, streamID: int, data: bytes, endStream: bool = False) -> None:
        """
        Send C{data} on C{streamID}, in frames the client accepts.

        @raise StreamStateError: The stream is closed, or C{data} is more than its windows allow.
        """
        stream = self._streams.get(streamID)
        if stream is None or stream.localEnded:
            raise StreamStateError(f"stream {streamID} is closed")
        length = len(data)
        # An empty frame (the end of a stream) takes no window, even one a smaller
        # SETTINGS_INITIAL_WINDOW_SIZE made negative.
        if length and (length > stream.outbound or length > self._outbound):
            raise StreamStateError(f"{length} bytes beyond the window of stream {streamID}")
        stream.outbound -= length
        self._outbound -= length
        size = self.maxOutboundFrameSize
        out = self._out
        if length <= size:
            out += _frame(_DATA, _END_STREAM if endStream else 0, streamID, data)
        else:
            for offset in range(0, length, size):
                last = offset + size >= length
                out += _frame(
                    _DATA,
                    _END_STREAM if endStream and last else 0,
                    streamID,
                    data[offset : offset + size],
                )
        if endStream:
            self._localEnd(streamID, stream)

    def endStream(self, streamID: int) -> None:
        """
        End the server's side of C{streamID} with an empty C{DATA} frame.

        @raise StreamStateError: The stream is closed.
        """
        self.sendData(streamID, b"", endStream=True)

    def resetStream(self, streamID: int, code: ErrorCode) -> None:
        """
        Reset C{streamID}.

        @raise StreamStateError: The stream is closed both ways already.
        """
        if self._streams.pop(streamID, None) is None:
            raise StreamStateError(f"stream {streamID} is closed")
        self._remember(streamID, _RESET_BY_SERVER)
        self._out += _frame(_RST_STREAM, 0, streamID, _U32.pack(code))

    def closeConnection(self, code: ErrorCode) -> None:
        """
        Queue C{GOAWAY} with C{code}; nothing more is read.
        """
        self._goAwayWith(code)

    def _localEnd(self, streamID: int, stream: _Stream) -> None:
        """
        The server ended its side.
        """
        stream.localEnded = True
        if stream.remoteEnded:
            del self._streams[streamID]
            self._remember(streamID, _ENDED)

    def _remember(self, streamID: int, how: int) -> None:
        """
        Keep how a stream closed, for the frames that may still come on it (RFC 9113 5.1); the
        oldest record goes when L{MAX_CLOSED_STREAMS} are kept.
        """
        closed = self._closed
        closed[streamID] = how
        if len(closed) > MAX_CLOSED_STREAMS:
            oldest = next(iter(closed))
            del closed[oldest]
            self._forgottenBelow = max(self._forgottenBelow, oldest + 1)

    def _onClosed(self, streamID: int, kind: str, events: list[Event]) -> None:
        """
        C{DATA} or C{HEADERS} on a closed stream (RFC 9113 5.1): ignored after the server's reset
        (the client may have sent it before it saw the reset) or on a stream closed long ago; a
        stream error C{STREAM_CLOSED} after the client's own reset; a connection error
        C{STREAM_CLOSED} after both sides ended it.
        """
        how = self._closed.get(streamID)
        if how == _ENDED:
            raise ProtocolError(ErrorCode.STREAM_CLOSED, f"{kind} on a closed stream")
        if how == _RESET_BY_CLIENT:
            self._out += _frame(_RST_STREAM, 0, streamID, _U32.pack(ErrorCode.STREAM_CLOSED))
            events.append(
                StreamReset(streamID, ErrorCode.STREAM_CLOSED, False, f"{kind} after RST_STREAM")
            )


def _unpad(payload: bytes) -> bytes:
    """
    The data of a padded frame.

    @raise ProtocolError: The padding is longer than the frame.
    """
    if not payload:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "a padded frame with no length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "more padding than payload")
    return payload[1 : len(payload) - pad]
