"""
Tests for L{portal.wire.h2server}: the server side of an HTTP/2 connection (RFC 9113), bytes in,
events out, entirely in memory.

Conforming traffic comes from the C{h2} package's client state machine: its bytes go into a
L{ServerConnection}, the server's bytes go back into it, and the events on both sides are checked.
Traffic that breaks the protocol's rules is built by hand, frame by frame, after the client preface
and an empty C{SETTINGS} frame, with header blocks from an C{hpack} encoder.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from h2 import events as h2events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portal.wire.h2server import (
    CONNECTION_WINDOW,
    INITIAL_WINDOW,
    MAX_CLOSED_STREAMS,
    MAX_CONCURRENT_STREAMS,
    MAX_CONTINUATIONS,
    MAX_HEADER_BLOCK,
    MAX_HEADER_LIST_SIZE,
    PREFACE,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    ProtocolError,
    RequestReceived,
    ServerConnection,
    StreamEnded,
    StreamReset,
    StreamStateError,
    WindowsChanged,
    WindowUpdated,
)

# Frame types (RFC 9113 6).
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9
#: A frame type no RFC defines.
UNKNOWN = 0xFA

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings (RFC 9113 6.5.2).
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5

#: The protocol's default windows: the client's, which the server sends within (the server gives
#: its own clients larger ones: INITIAL_WINDOW, CONNECTION_WINDOW).
WINDOW = 65_535
#: The largest frame a client may send this server.
FRAME = 16_384

#: A request without a body.
GET: list[tuple[bytes, bytes]] = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":path", b"/"),
    (b":authority", b"example.com"),
]
#: A request with a body (of unsaid length).
POST: list[tuple[bytes, bytes]] = [(b":method", b"POST"), *GET[1:]]

#: Deterministic hypothesis runs: the same examples every time, nothing stored between runs.
deterministic = settings(max_examples=300, derandomize=True, database=None, deadline=None)


def frame(kind: int, flags: int, streamID: int, payload: bytes = b"") -> bytes:
    """
    @return: One frame, serialized: the 9-byte header (24-bit length, type, flags, stream id), then
        C{payload}.
    """
    return len(payload).to_bytes(3, "big") + struct.pack(">BBL", kind, flags, streamID) + payload


def setting(code: int, value: int) -> bytes:
    """
    @return: One setting of a C{SETTINGS} frame's payload.
    """
    return struct.pack(">HL", code, value)


def u32(value: int) -> bytes:
    """
    @return: C{value} as 4 bytes, network order (an error code, a window increment).
    """
    return struct.pack(">L", value)


class Frame(NamedTuple):
    """
    One frame the server sent.
    """

    kind: int
    flags: int
    streamID: int
    payload: bytes


def parseFrames(data: bytes) -> list[Frame]:
    """
    @return: The frames serialized in C{data}, which holds whole frames only.
    """
    frames = []
    position = 0
    while position < len(data):
        length = int.from_bytes(data[position : position + 3], "big")
        kind, flags, streamID = struct.unpack_from(">BBL", data, position + 3)
        end = position + 9 + length
        assert end <= len(data), "a truncated frame"
        frames.append(Frame(kind, flags, streamID & 0x7FFFFFFF, data[position + 9 : end]))
        position = end
    return frames


def goAway(lastStreamID: int, code: int) -> Frame:
    """
    @return: The C{GOAWAY} frame the server sends, with no debug data.
    """
    return Frame(GOAWAY, 0, 0, struct.pack(">LL", lastStreamID, code))


def reset(streamID: int, code: int) -> Frame:
    """
    @return: The C{RST_STREAM} frame the server sends.
    """
    return Frame(RST_STREAM, 0, streamID, u32(code))


def windowUpdate(streamID: int, increment: int) -> Frame:
    """
    @return: The C{WINDOW_UPDATE} frame the server sends.
    """
    return Frame(WINDOW_UPDATE, 0, streamID, u32(increment))


#: The summaries of the events that say every stream's window may have moved, reported at most once
#: per L{ServerConnection.receiveData} call.
ALL_WINDOWS: list[tuple[object, ...]] = [("window", 0), ("windows",)]


def summarize(events: list[Event]) -> list[tuple[object, ...]]:
    """
    @return: The server's events as plain tuples, to compare: C{("request", id, headers)},
        C{("data", id, data, flowControlled)}, C{("ended", id)}, C{("reset", id, code, remote)},
        C{("window", id)}, C{("windows",)}, C{("terminated", code)}.
    """
    summary: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, RequestReceived):
            summary.append(("request", event.streamID, [tuple(h) for h in event.headers]))
        elif isinstance(event, DataReceived):
            summary.append(("data", event.streamID, event.data, event.flowControlled))
        elif isinstance(event, StreamEnded):
            summary.append(("ended", event.streamID))
        elif isinstance(event, StreamReset):
            summary.append(("reset", event.streamID, event.code, event.remote))
        elif isinstance(event, WindowUpdated):
            summary.append(("window", event.streamID))
        elif isinstance(event, WindowsChanged):
            summary.append(("windows",))
        else:
            assert isinstance(event, ConnectionTerminated)
            summary.append(("terminated", event.code))
    return summary


class RawClient:
    """
    A client driven by hand: it has sent the preface and an empty C{SETTINGS} frame, and encodes
    header blocks with one HPACK encoder, as a real client would.

    @ivar server: The connection under test, its preface and C{SETTINGS} acknowledgement taken.
    @ivar encoder: The client's HPACK encoder; blocks must reach the server in encoding order.
    @ivar events: The server's events of the last L{send}.
    """

    def __init__(self) -> None:
        self.server = ServerConnection()
        self.server.initiateConnection()
        self.encoder = Encoder()
        self.events: list[Event] = self.server.receiveData(PREFACE + frame(SETTINGS, 0, 0))
        self.server.dataToSend()

    def send(self, *frames: bytes) -> list[tuple[object, ...]]:
        """
        @return: The server's events for C{frames}, fed in one call, summarized.
        """
        self.events = self.server.receiveData(b"".join(frames))
        return summarize(self.events)

    def block(self, fields: list[tuple[bytes, bytes]]) -> bytes:
        """
        @return: C{fields} as a header block of the client's encoder.
        """
        return self.encoder.encode(fields)

    def headers(
        self,
        streamID: int,
        fields: list[tuple[bytes, bytes]] = GET,
        flags: int = END_HEADERS | END_STREAM,
    ) -> bytes:
        """
        @return: A C{HEADERS} frame with C{fields} as its whole block.
        """
        return frame(HEADERS, flags, streamID, self.block(fields))

    def sent(self) -> list[Frame]:
        """
        @return: The frames the server queued since the last call.
        """
        return parseFrames(self.server.dataToSend())


class Pair:
    """
    An C{h2} client and a L{ServerConnection} whose prefaces were exchanged.

    @ivar client: The client's state machine.
    @ivar server: The connection under test.
    @ivar serverEvents: The server's events for the client's preface, summarized.
    @ivar clientEvents: The client's events for the server's preface.
    """

    def __init__(self) -> None:
        self.client = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.server = ServerConnection()
        self.server.initiateConnection()
        self.serverEvents = self.toServer()
        self.clientEvents = self.toClient()
        self.toServer()

    def toServer(self) -> list[tuple[object, ...]]:
        """
        @return: The server's events for what the client sent since the last call, summarized.
        """
        return summarize(self.server.receiveData(self.client.data_to_send()))

    def toClient(self) -> list[h2events.Event]:
        """
        @return: The client's events for what the server sent since the last call.
        """
        return self.client.receive_data(self.server.dataToSend())

    def request(
        self,
        streamID: int = 1,
        fields: list[tuple[bytes, bytes]] = GET,
        endStream: bool = True,
    ) -> list[tuple[object, ...]]:
        """
        Have the client send a request head.

        @return: The server's events, summarized.
        """
        self.client.send_headers(streamID, fields, end_stream=endStream)
        return self.toServer()


class ServerTestCase(SynchronousTestCase):
    """
    Assertions shared by the tests of L{ServerConnection}.
    """

    def assertConnectionError(
        self, server: ServerConnection, data: bytes, code: ErrorCode, lastStreamID: int = 0
    ) -> None:
        """
        Feeding C{data} to C{server} raises L{ProtocolError} with C{code} after queueing a C{GOAWAY}
        with C{code} and C{lastStreamID} (the last frame queued); the connection then reads nothing
        more and queues nothing more.
        """
        error = self.assertRaises(ProtocolError, server.receiveData, data)
        self.assertEqual(error.code, code)
        sent = parseFrames(server.dataToSend())
        self.assertTrue(sent, "no GOAWAY queued")
        self.assertEqual(sent[-1], goAway(lastStreamID, code))
        self.assertEqual([f for f in sent if f.kind == GOAWAY], [sent[-1]])
        self.assertEqual(server.lastStreamID, lastStreamID)
        self.assertEqual(server.receiveData(frame(PING, 0, 0, b"12345678")), [])
        self.assertEqual(server.receiveData(PREFACE + frame(SETTINGS, 0, 0)), [])
        self.assertEqual(server.dataToSend(), b"")

    def assertStreamError(self, client: RawClient, streamID: int, code: ErrorCode) -> None:
        """
        The last frames sent to C{client}'s server reset stream C{streamID} with C{code}: a
        L{StreamReset} of the server's, with a reason, was the last event, and C{RST_STREAM} with
        C{code} is queued.
        """
        self.assertTrue(client.events, "no events")
        event = client.events[-1]
        assert isinstance(event, StreamReset), event
        self.assertEqual((event.streamID, event.code, event.remote), (streamID, code, False))
        self.assertTrue(event.reason)
        self.assertIn(reset(streamID, code), client.sent())


class HandshakeTests(ServerTestCase):
    """
    The prefaces: the client's checked, the server's C{SETTINGS}, C{SETTINGS} and C{PING}
    acknowledged.
    """

    def test_serverSettings(self) -> None:
        """
        The server's preface advertises 100 concurrent streams, a header list of at most 65,536
        bytes, stream windows of L{INITIAL_WINDOW} bytes, frames of 16,384 bytes and no server
        push, and opens the connection's window to L{CONNECTION_WINDOW}.
        """
        pair = Pair()
        remote = pair.client.remote_settings
        self.assertEqual(remote.max_concurrent_streams, 100)
        self.assertEqual(remote.max_header_list_size, 65_536)
        self.assertEqual(remote.initial_window_size, INITIAL_WINDOW)
        self.assertEqual(remote.max_frame_size, FRAME)
        self.assertEqual(remote.enable_push, 0)
        self.assertEqual(pair.client.outbound_flow_control_window, CONNECTION_WINDOW)
        self.assertEqual(MAX_CONCURRENT_STREAMS, 100)
        self.assertEqual(MAX_HEADER_LIST_SIZE, 65_536)
        self.assertEqual((INITIAL_WINDOW, CONNECTION_WINDOW), (262_144, 1_048_576))

    def test_settingsFirst(self) -> None:
        """
        L{ServerConnection.initiateConnection} queues a C{SETTINGS} frame on stream 0 that is no
        acknowledgement, with the settings the server advertises, then a C{WINDOW_UPDATE} that
        opens the connection's window from the protocol's 65,535 bytes to L{CONNECTION_WINDOW}.
        """
        server = ServerConnection()
        self.assertEqual(server.dataToSend(), b"")
        server.initiateConnection()
        settingsFrame, opening = parseFrames(server.dataToSend())
        self.assertEqual(settingsFrame[:3], (SETTINGS, 0, 0))
        payload = settingsFrame.payload
        self.assertEqual(len(payload) % 6, 0)
        advertised = dict(struct.iter_unpack(">HL", payload))
        self.assertEqual(
            advertised,
            {
                0x3: MAX_CONCURRENT_STREAMS,
                INITIAL_WINDOW_SIZE: INITIAL_WINDOW,
                MAX_FRAME_SIZE: FRAME,
                0x6: MAX_HEADER_LIST_SIZE,
                ENABLE_PUSH: 0,
            },
        )
        self.assertEqual(opening, windowUpdate(0, CONNECTION_WINDOW - WINDOW))
        self.assertEqual(server.dataToSend(), b"")

    def test_clientSettingsAcknowledged(self) -> None:
        """
        The client's C{SETTINGS} frames are acknowledged: the C{h2} client sees its own settings
        acknowledged, at the preface and later.
        """
        pair = Pair()
        self.assertEqual(pair.serverEvents, [])
        acknowledged = [
            e for e in pair.clientEvents if isinstance(e, h2events.SettingsAcknowledged)
        ]
        self.assertEqual(len(acknowledged), 1)
        pair.client.update_settings({SettingCodes.MAX_HEADER_LIST_SIZE: 1000})
        self.assertEqual(pair.toServer(), [])
        [event] = pair.toClient()
        self.assertIsInstance(event, h2events.SettingsAcknowledged)
        self.assertEqual(pair.client.local_settings.max_header_list_size, 1000)

    def test_rawSettingsAcknowledged(self) -> None:
        """
        A C{SETTINGS} frame, even one with unknown settings, is answered by an empty C{SETTINGS}
        frame with the C{ACK} flag; an acknowledgement is not answered.
        """
        client = RawClient()
        self.assertEqual(client.send(frame(SETTINGS, 0, 0, setting(0x99, 7))), [])
        self.assertEqual(client.sent(), [Frame(SETTINGS, ACK, 0, b"")])
        self.assertEqual(client.send(frame(SETTINGS, ACK, 0)), [])
        self.assertEqual(client.sent(), [])

    def test_pingAnswered(self) -> None:
        """
        A C{PING} is answered with a C{PING} with the C{ACK} flag and the same payload.
        """
        pair = Pair()
        pair.client.ping(b"\x00opaque\xff")
        self.assertEqual(pair.toServer(), [])
        [event] = pair.toClient()
        assert isinstance(event, h2events.PingAckReceived)
        self.assertEqual(event.ping_data, b"\x00opaque\xff")

    def test_pingAckNotAnswered(self) -> None:
        """
        A C{PING} with the C{ACK} flag (an answer) is not answered.
        """
        client = RawClient()
        self.assertEqual(client.send(frame(PING, ACK, 0, b"12345678")), [])
        self.assertEqual(client.sent(), [])

    def test_prefaceInPieces(self) -> None:
        """
        The preface and the first C{SETTINGS} frame may come one byte at a time.
        """
        server = ServerConnection()
        for byte in PREFACE + frame(SETTINGS, 0, 0, setting(ENABLE_PUSH, 0)):
            self.assertEqual(server.receiveData(bytes([byte])), [])
        self.assertEqual(parseFrames(server.dataToSend()), [Frame(SETTINGS, ACK, 0, b"")])

    def test_badPreface(self) -> None:
        """
        Bytes that are not the HTTP/2 preface (an HTTP/1.1 request) are a connection error of type
        C{PROTOCOL_ERROR}.
        """
        self.assertConnectionError(
            ServerConnection(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", ErrorCode.PROTOCOL_ERROR
        )

    def test_badPrefaceStart(self) -> None:
        """
        A preface is refused as soon as its first bytes differ, before 24 bytes came.
        """
        self.assertConnectionError(ServerConnection(), b"PRI * HTTP/1.1", ErrorCode.PROTOCOL_ERROR)

    def test_firstFrameNotSettings(self) -> None:
        """
        A first frame other than C{SETTINGS} (a C{PING}) is a connection error of type
        C{PROTOCOL_ERROR}.
        """
        self.assertConnectionError(
            ServerConnection(), PREFACE + frame(PING, 0, 0, b"12345678"), ErrorCode.PROTOCOL_ERROR
        )

    def test_firstFrameSettingsAck(self) -> None:
        """
        A first frame that acknowledges C{SETTINGS} is not the client's C{SETTINGS}: a connection
        error of type C{PROTOCOL_ERROR}.
        """
        self.assertConnectionError(
            ServerConnection(), PREFACE + frame(SETTINGS, ACK, 0), ErrorCode.PROTOCOL_ERROR
        )


class RequestTests(ServerTestCase):
    """
    Requests and responses that follow the rules.
    """

    def test_get(self) -> None:
        """
        A C{HEADERS} frame with C{END_STREAM} is a request, its fields as bytes pairs in order, and
        the end of the client's side of the stream.
        """
        pair = Pair()
        fields = [*GET, (b"accept", b"*/*"), (b"x-b", b"1"), (b"x-a", b"2")]
        self.assertEqual(pair.request(1, fields), [("request", 1, fields), ("ended", 1)])
        self.assertEqual(pair.server.lastStreamID, 1)
        self.assertEqual(pair.server.openStreams, 1)

    def test_headersAreBytes(self) -> None:
        """
        L{RequestReceived.headers} holds names and values as C{bytes}.
        """
        client = RawClient()
        client.send(client.headers(1))
        [request, _] = client.events
        assert isinstance(request, RequestReceived)
        self.assertEqual(request.headers, GET)
        for name, value in request.headers:
            self.assertIsInstance(name, bytes)
            self.assertIsInstance(value, bytes)

    def test_response(self) -> None:
        """
        A response sent with L{ServerConnection.sendHeaders} and L{ServerConnection.sendData}
        reaches the client intact, and the stream is forgotten once both sides ended it.
        """
        pair = Pair()
        pair.request()
        pair.server.sendHeaders(1, [(b":status", b"200"), (b"content-type", b"text/plain")])
        self.assertEqual(pair.server.openStreams, 1)
        pair.server.sendData(1, b"hello, world", endStream=True)
        self.assertEqual(pair.server.openStreams, 0)
        events = pair.toClient()
        self.assertEqual(
            [type(e) for e in events],
            [h2events.ResponseReceived, h2events.DataReceived, h2events.StreamEnded],
        )
        response, data, _ = events
        assert isinstance(response, h2events.ResponseReceived)
        assert isinstance(data, h2events.DataReceived)
        self.assertEqual(response.headers, [(b":status", b"200"), (b"content-type", b"text/plain")])
        self.assertEqual(data.data, b"hello, world")
        self.assertEqual(data.stream_id, 1)

    def test_forgottenWhenClientEndsLast(self) -> None:
        """
        A stream the server ended first stays open until the client ends its side too.
        """
        pair = Pair()
        pair.request(1, POST, endStream=False)
        pair.server.sendHeaders(1, [(b":status", b"204")], endStream=True)
        self.assertEqual(pair.server.openStreams, 1)
        pair.toClient()
        pair.client.send_data(1, b"late", end_stream=True)
        self.assertEqual(pair.toServer(), [("data", 1, b"late", 4), ("ended", 1)])
        self.assertEqual(pair.server.openStreams, 0)

    def test_post(self) -> None:
        """
        A request body comes as L{DataReceived} events whose C{flowControlled} is the frames'
        length, then L{StreamEnded}.
        """
        pair = Pair()
        self.assertEqual(pair.request(1, POST, endStream=False), [("request", 1, POST)])
        pair.client.send_data(1, b"abc")
        pair.client.send_data(1, b"defgh", end_stream=True)
        self.assertEqual(
            pair.toServer(), [("data", 1, b"abc", 3), ("data", 1, b"defgh", 5), ("ended", 1)]
        )

    def test_postPadded(self) -> None:
        """
        A padded C{DATA} frame delivers its data without the padding, and counts the padding (and
        its length byte) as flow-controlled.
        """
        pair = Pair()
        pair.request(1, POST, endStream=False)
        pair.client.send_data(1, b"abc", end_stream=True, pad_length=10)
        self.assertEqual(pair.toServer(), [("data", 1, b"abc", 14), ("ended", 1)])

    def test_rawPadded(self) -> None:
        """
        Padding that fills the whole frame but its length byte leaves empty data; the padding still
        counts against the windows.
        """
        client = RawClient()
        client.send(client.headers(1, POST, END_HEADERS))
        self.assertEqual(
            client.send(frame(DATA, PADDED, 1, b"\x03xy\x00\x00\x00")), [("data", 1, b"xy", 6)]
        )
        self.assertEqual(
            client.send(frame(DATA, PADDED | END_STREAM, 1, b"\x04\x00\x00\x00\x00")),
            [("data", 1, b"", 5), ("ended", 1)],
        )

    def test_trailers(self) -> None:
        """
        Trailers (a C{HEADERS} frame with C{END_STREAM} after the body) end the stream: only
        L{StreamEnded} is reported.
        """
        pair = Pair()
        pair.request(1, POST, endStream=False)
        pair.client.send_data(1, b"body")
        pair.client.send_headers(1, [(b"x-checksum", b"1234")], end_stream=True)
        self.assertEqual(pair.toServer(), [("data", 1, b"body", 4), ("ended", 1)])

    def test_continuation(self) -> None:
        """
        A header block split across C{HEADERS} and C{CONTINUATION} frames is one request.
        """
        client = RawClient()
        block = client.block([*GET, (b"x-long", b"v" * 40)])
        events = client.send(
            frame(HEADERS, END_STREAM, 1, block[:5]),
            frame(CONTINUATION, 0, 1, block[5:20]),
            frame(CONTINUATION, 0, 1, b""),
            frame(CONTINUATION, END_HEADERS, 1, block[20:]),
        )
        self.assertEqual(events, [("request", 1, [*GET, (b"x-long", b"v" * 40)]), ("ended", 1)])

    def test_continuationLimit(self) -> None:
        """
        A header block may take L{MAX_CONTINUATIONS} C{CONTINUATION} frames.
        """
        client = RawClient()
        block = client.block(GET)
        frames = [frame(HEADERS, END_STREAM, 1, block[:1])]
        frames += [frame(CONTINUATION, 0, 1, b"")] * (MAX_CONTINUATIONS - 1)
        frames.append(frame(CONTINUATION, END_HEADERS, 1, block[1:]))
        self.assertEqual(client.send(*frames), [("request", 1, GET), ("ended", 1)])

    def test_paddedHeaders(self) -> None:
        """
        The padding of a C{HEADERS} frame is not part of its header block.
        """
        client = RawClient()
        block = client.block(GET)
        events = client.send(
            frame(HEADERS, PADDED | END_HEADERS | END_STREAM, 1, b"\x05" + block + b"\x00" * 5)
        )
        self.assertEqual(events, [("request", 1, GET), ("ended", 1)])

    def test_headersWithPriority(self) -> None:
        """
        The priority fields of a C{HEADERS} frame (with padding too) are not part of its header
        block, and are not acted on.
        """
        client = RawClient()
        block = client.block(GET)
        priority = u32(0x80000000 | 5) + b"\x10"
        events = client.send(
            frame(HEADERS, PRIORITY_FLAG | END_HEADERS | END_STREAM, 1, priority + block),
        )
        self.assertEqual(events, [("request", 1, GET), ("ended", 1)])
        block = client.block(GET)
        events = client.send(
            frame(
                HEADERS,
                PADDED | PRIORITY_FLAG | END_HEADERS | END_STREAM,
                3,
                b"\x02" + priority + block + b"\x00\x00",
            ),
        )
        self.assertEqual(events, [("request", 3, GET), ("ended", 3)])

    def test_priorityIgnored(self) -> None:
        """
        A well-formed C{PRIORITY} frame, even for an idle stream, produces nothing.
        """
        client = RawClient()
        self.assertEqual(client.send(frame(PRIORITY, 0, 7, u32(1) + b"\x20")), [])
        self.assertEqual(client.sent(), [])
        self.assertEqual(client.send(client.headers(9)), [("request", 9, GET), ("ended", 9)])

    def test_unknownFrameIgnored(self) -> None:
        """
        Frames of unknown types are ignored, on any stream, whatever their flags.
        """
        client = RawClient()
        client.send(client.headers(1, POST, END_HEADERS))
        self.assertEqual(
            client.send(
                frame(UNKNOWN, 0xFF, 0, b"whatever"),
                frame(UNKNOWN, 0, 1, b""),
                frame(UNKNOWN, 0, 99, b"x" * 100),
                frame(DATA, END_STREAM, 1, b"ok"),
            ),
            [("data", 1, b"ok", 2), ("ended", 1)],
        )
        self.assertEqual(client.sent(), [])

    def test_lowerStreamRefused(self) -> None:
        """
        A new stream with an id lower than the last one opened (RFC 9113 5.1.1) is a connection
        error C{PROTOCOL_ERROR}.
        """
        client = RawClient()
        client.send(client.headers(5))
        client.sent()
        self.assertConnectionError(
            client.server, client.headers(3), ErrorCode.PROTOCOL_ERROR, lastStreamID=5
        )

    def test_headersAfterServerResetIgnored(self) -> None:
        """
        C{HEADERS} on a stream the server reset is ignored (the client may have sent them before it
        saw the reset), but its block is decoded: the next request, whose block refers to the fields
        the ignored one added to the HPACK table, decodes right.
        """
        client = RawClient()
        client.send(client.headers(1, POST, END_HEADERS))
        client.server.resetStream(1, ErrorCode.CANCEL)
        client.sent()
        trailers = [(b"x-secret", b"added to the table")]
        self.assertEqual(client.send(client.headers(1, trailers)), [])
        self.assertEqual(client.sent(), [])
        block = client.block(trailers)
        self.assertLess(len(block), 3)  # Indexed from the dynamic table.
        self.assertEqual(
            client.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, client.block(GET) + block)),
            [("request", 3, [*GET, *trailers]), ("ended", 3)],
        )

    def test_closedStreamFrames(self) -> None:
        """
        On a stream both sides ended, C{WINDOW_UPDATE}, C{RST_STREAM} and C{PRIORITY} are ignored
        (RFC 9113 5.1), but C{DATA} or C{HEADERS} is a connection error C{STREAM_CLOSED}.
        """
        for late in (lambda c: frame(DATA, 0, 1, b"x"), lambda c: c.headers(1)):
            client = RawClient()
            client.send(client.headers(1))
            client.server.sendHeaders(1, [(b":status", b"204")], endStream=True)
            client.sent()
            self.assertEqual(client.server.openStreams, 0)
            self.assertEqual(
                client.send(
                    frame(WINDOW_UPDATE, 0, 1, u32(10)),
                    frame(RST_STREAM, 0, 1, u32(0)),
                    frame(PRIORITY, 0, 1, u32(3) + b"\x10"),
                ),
                [],
            )
            self.assertEqual(client.sent(), [])
            self.assertConnectionError(
                client.server, late(client), ErrorCode.STREAM_CLOSED, lastStreamID=1
            )

    def test_forgottenStreamsIgnored(self) -> None:
        """
        Only the last L{MAX_CLOSED_STREAMS} closed streams are remembered: C{DATA} or C{HEADERS} on
        an older one is ignored (its window given back), as after a reset of the server's.
        """
        client = RawClient()
        for streamID in range(1, 2 * MAX_CLOSED_STREAMS + 4, 2):
            client.send(client.headers(streamID))
            client.server.sendHeaders(streamID, [(b":status", b"204")], endStream=True)
        client.sent()
        self.assertEqual(client.send(frame(DATA, 0, 1, b"x"), client.headers(1)), [])
        self.assertEqual(client.sent(), [windowUpdate(0, 1)])
        self.assertConnectionError(
            client.server,
            frame(DATA, 0, 2 * MAX_CLOSED_STREAMS + 1, b"x"),
            ErrorCode.STREAM_CLOSED,
            lastStreamID=2 * MAX_CLOSED_STREAMS + 3,
        )

    def test_evenStreamsIdle(self) -> None:
        """
        Even stream ids belong to the server, which opens none: C{DATA}, C{WINDOW_UPDATE} or
        C{RST_STREAM} on one is a frame on an idle stream, a connection error C{PROTOCOL_ERROR},
        even below the last stream the client opened.
        """
        for late in (
            frame(DATA, 0, 2, b"x"),
            frame(WINDOW_UPDATE, 0, 2, u32(1)),
            frame(RST_STREAM, 0, 2, u32(0)),
        ):
            client = RawClient()
            client.send(client.headers(3))
            client.sent()
            self.assertConnectionError(
                client.server, late, ErrorCode.PROTOCOL_ERROR, lastStreamID=3
            )

    def test_contentLengthMatched(self) -> None:
        """
        A body as long as C{content-length} says ends the stream without a reset, in one frame or
        several; C{content-length: 0} with no body too.
        """
        client = RawClient()
        client.send(client.headers(1, [*POST, (b"content-length", b"5")], END_HEADERS))
        self.assertEqual(
            client.send(frame(DATA, 0, 1, b"ab"), frame(DATA, END_STREAM, 1, b"cde")),
            [("data", 1, b"ab", 2), ("data", 1, b"cde", 3), ("ended", 1)],
        )
        fields = [*POST, (b"content-length", b"0")]
        self.assertEqual(
            client.send(client.headers(3, fields)), [("request", 3, fields), ("ended", 3)]
        )
        self.assertEqual(client.sent(), [])

    def test_clientReset(self) -> None:
        """
        C{RST_STREAM} from the client is L{StreamReset} with C{remote} and its code; the stream is
        forgotten. C{DATA} on it afterwards is a stream error C{STREAM_CLOSED} (RFC 9113 5.1), its
        window given back to the connection; C{RST_STREAM} and C{WINDOW_UPDATE} are ignored; the
        other streams go on.
        """
        pair = Pair()
        pair.request(1, POST, endStream=False)
        pair.request(3, POST, endStream=False)
        pair.client.reset_stream(1, ErrorCodes.CANCEL)
        events = pair.server.receiveData(pair.client.data_to_send())
        self.assertEqual(summarize(events), [("reset", 1, ErrorCode.CANCEL, True)])
        self.assertEqual(pair.server.openStreams, 1)
        server = pair.server
        self.assertRaises(StreamStateError, server.sendHeaders, 1, [(b":status", b"200")])
        self.assertEqual(
            summarize(server.receiveData(frame(DATA, END_STREAM, 1, b"x" * 50))),
            [("reset", 1, ErrorCode.STREAM_CLOSED, False)],
        )
        self.assertEqual(
            parseFrames(server.dataToSend()),
            [windowUpdate(0, 50), reset(1, ErrorCode.STREAM_CLOSED)],
        )
        self.assertEqual(server.receiveData(frame(RST_STREAM, 0, 1, u32(0))), [])
        self.assertEqual(server.receiveData(frame(WINDOW_UPDATE, 0, 1, u32(10))), [])
        self.assertEqual(server.dataToSend(), b"")
        pair.client.send_data(3, b"on", end_stream=True)
        self.assertEqual(pair.toServer(), [("data", 3, b"on", 2), ("ended", 3)])

    def test_clientGoAway(self) -> None:
        """
        C{GOAWAY} from the client is L{ConnectionTerminated} with its code and sets
        C{remoteGoingAway}; the connection goes on for the streams in flight (a PING after it is
        answered, a request body still arrives).
        """
        client = RawClient()
        events = client.send(
            client.headers(1, POST, END_HEADERS),
            frame(GOAWAY, 0, 0, struct.pack(">LL", 0, ErrorCode.ENHANCE_YOUR_CALM) + b"debug"),
            frame(PING, 0, 0, b"12345678"),
        )
        self.assertEqual(
            events,
            [("request", 1, POST), ("terminated", ErrorCode.ENHANCE_YOUR_CALM)],
        )
        self.assertTrue(client.server.remoteGoingAway)
        self.assertEqual(client.sent(), [Frame(PING, ACK, 0, b"12345678")])
        self.assertEqual(
            client.send(frame(DATA, END_STREAM, 1, b"body")),
            [("data", 1, b"body", 4), ("ended", 1)],
        )

    def test_clientGoAwayFromH2(self) -> None:
        """
        The C{h2} client's C{GOAWAY} is read as L{ConnectionTerminated}.
        """
        pair = Pair()
        pair.client.close_connection(ErrorCodes.NO_ERROR)
        self.assertEqual(pair.toServer(), [("terminated", ErrorCode.NO_ERROR)])

    def test_byteByByte(self) -> None:
        """
        Frames fed one byte at a time give the same events, and the same answers, as fed in one
        call (with one connection-wide window event, which is reported once per call).
        """

        def conversation() -> bytes:
            encoder = Encoder()
            get = encoder.encode(GET)
            post = encoder.encode([*POST, (b"x-new", b"field")])
            return b"".join(
                [
                    PREFACE,
                    frame(SETTINGS, 0, 0, setting(ENABLE_PUSH, 0)),
                    frame(HEADERS, END_HEADERS | END_STREAM, 1, get),
                    frame(HEADERS, 0, 3, post[:3]),
                    frame(CONTINUATION, END_HEADERS, 3, post[3:]),
                    frame(PING, 0, 0, b"abcdefgh"),
                    frame(DATA, PADDED, 3, b"\x02body\x00\x00"),
                    frame(WINDOW_UPDATE, 0, 3, u32(5)),
                    frame(WINDOW_UPDATE, 0, 0, u32(7)),
                    frame(UNKNOWN, 0, 0, b"?"),
                    frame(DATA, END_STREAM, 3, b"end"),
                    frame(RST_STREAM, 0, 1, u32(ErrorCode.CANCEL)),
                ]
            )

        whole = ServerConnection()
        expected = summarize(whole.receiveData(conversation()))
        self.assertEqual(
            expected,
            [
                ("request", 1, GET),
                ("ended", 1),
                ("request", 3, [*POST, (b"x-new", b"field")]),
                ("data", 3, b"body", 7),
                ("window", 3),
                ("window", 0),
                ("data", 3, b"end", 3),
                ("ended", 3),
                ("reset", 1, ErrorCode.CANCEL, True),
            ],
        )
        pieces = ServerConnection()
        events: list[Event] = []
        for byte in conversation():
            events += pieces.receiveData(bytes([byte]))
        self.assertEqual(summarize(events), expected)
        self.assertEqual(pieces.dataToSend(), whole.dataToSend())
        self.assertEqual(pieces.openStreams, whole.openStreams)

    def test_requestRepresentations(self) -> None:
        """
        Header blocks in every HPACK representation decode: plain and Huffman-coded literals,
        fields never indexed, fields indexed from a dynamic table whose oldest entries were
        evicted (in step with the client's encoder), and table size updates at a block's start.
        """
        client = RawClient()
        encoder = client.encoder
        secret = [*GET, (b"authorization", b"Bearer abc")]
        block = encoder.encode([*GET, (b"authorization", b"Bearer abc", True)], huffman=False)
        events = client.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        self.assertEqual(events, [("request", 1, secret), ("ended", 1)])
        streamID = 3
        sent: list[list[tuple[bytes, bytes]]] = []
        for i in range(20):  # Fields of about 342 bytes: a table of 4,096 holds 11.
            fields = [*GET, (b"x-filler-%d" % i, b"%03d" % i * 100)]
            sent.append(fields)
            self.assertEqual(client.send(client.headers(streamID, fields))[0][2], fields)
            streamID += 2
        for fields in [sent[-1], sent[-3], secret, sent[0]]:
            block = client.block(fields)
            events = client.send(frame(HEADERS, END_HEADERS | END_STREAM, streamID, block))
            self.assertEqual(events, [("request", streamID, fields), ("ended", streamID)])
            streamID += 2
        for size in [256, 0, 4096]:
            encoder.header_table_size = size
            fields = [*GET, (b"x-size", b"%d" % size)]
            block = client.block(fields)
            self.assertEqual(block[0] & 0xE0, 0x20)  # A table size update.
            events = client.send(frame(HEADERS, END_HEADERS | END_STREAM, streamID, block))
            self.assertEqual(events, [("request", streamID, fields), ("ended", streamID)])
            streamID += 2

    def test_headerTableSize(self) -> None:
        """
        A client's C{SETTINGS_HEADER_TABLE_SIZE} bounds the server's encoder: its next block starts
        with a dynamic table size update to that size.
        """
        pair = Pair()
        pair.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 0})
        pair.toServer()
        pair.toClient()
        pair.request()
        pair.server.sendHeaders(1, [(b":status", b"200"), (b"x-a", b"b")], endStream=True)
        data = pair.server.dataToSend()
        [headersFrame] = parseFrames(data)
        self.assertEqual(headersFrame.payload[:1], b"\x20")
        [response, _] = pair.client.receive_data(data)
        assert isinstance(response, h2events.ResponseReceived)
        self.assertEqual(response.headers, [(b":status", b"200"), (b"x-a", b"b")])


class FlowControlTests(ServerTestCase):
    """
    Flow control, both ways.
    """

    def test_sendBeyondStreamWindow(self) -> None:
        """
        Sending more than the stream's window raises L{StreamStateError} and sends nothing; the
        whole window can be sent.
        """
        pair = Pair()
        pair.request()
        pair.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100})
        pair.toServer()
        pair.server.dataToSend()
        pair.server.sendHeaders(1, [(b":status", b"200")])
        pair.toClient()
        self.assertEqual(pair.server.localFlowControlWindow(1), 100)
        self.assertRaises(StreamStateError, pair.server.sendData, 1, b"x" * 101)
        self.assertEqual(pair.server.dataToSend(), b"")
        pair.server.sendData(1, b"x" * 100)
        self.assertEqual(pair.server.localFlowControlWindow(1), 0)
        self.assertRaises(StreamStateError, pair.server.sendData, 1, b"x")
        [event] = pair.toClient()
        assert isinstance(event, h2events.DataReceived)
        self.assertEqual(event.data, b"x" * 100)

    def test_sendBeyondConnectionWindow(self) -> None:
        """
        Sending more than the connection's window raises L{StreamStateError} even when the stream's
        window is larger, and the connection's window is shared by the streams.
        """
        pair = Pair()
        pair.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1_000_000})
        pair.toServer()
        pair.request(1)
        pair.request(3)
        pair.server.sendHeaders(1, [(b":status", b"200")])
        pair.server.sendHeaders(3, [(b":status", b"200")])
        self.assertEqual(pair.server.localFlowControlWindow(1), WINDOW)
        self.assertRaises(StreamStateError, pair.server.sendData, 1, b"x" * (WINDOW + 1))
        pair.server.sendData(1, b"x" * 60_000)
        self.assertEqual(pair.server.localFlowControlWindow(3), WINDOW - 60_000)
        self.assertRaises(StreamStateError, pair.server.sendData, 3, b"x" * (WINDOW - 59_999))
        pair.server.sendData(3, b"x" * (WINDOW - 60_000))
        self.assertEqual(pair.server.localFlowControlWindow(1), 0)
        self.assertEqual(pair.server.localFlowControlWindow(3), 0)
        pair.server.endStream(1)
        events = pair.toClient()
        self.assertEqual(
            sum(len(e.data or b"") for e in events if isinstance(e, h2events.DataReceived)), WINDOW
        )

    def test_windowUpdates(self) -> None:
        """
        L{ServerConnection.localFlowControlWindow} is the smaller of the connection's and the
        stream's windows, which C{WINDOW_UPDATE} frames enlarge (reported as L{WindowUpdated}) and
        C{DATA} shrinks.
        """
        pair = Pair()
        pair.request()
        pair.client.increment_flow_control_window(1000)
        self.assertEqual(pair.toServer(), [("window", 0)])
        self.assertEqual(pair.server.localFlowControlWindow(1), WINDOW)
        pair.client.increment_flow_control_window(500, stream_id=1)
        self.assertEqual(pair.toServer(), [("window", 1)])
        self.assertEqual(pair.server.localFlowControlWindow(1), WINDOW + 500)
        pair.server.sendHeaders(1, [(b":status", b"200")])
        pair.server.sendData(1, b"x" * 600)
        self.assertEqual(pair.server.localFlowControlWindow(1), WINDOW - 100)
        pair.client.increment_flow_control_window(2000, stream_id=1)
        pair.toServer()
        self.assertEqual(pair.server.localFlowControlWindow(1), WINDOW + 400)
        pair.server.sendData(1, b"x" * (WINDOW + 400), endStream=True)
        events = pair.toClient()
        self.assertEqual(
            sum(len(e.data or b"") for e in events if isinstance(e, h2events.DataReceived)),
            WINDOW + 1000,
        )

    def test_initialWindowSizeChanged(self) -> None:
        """
        A change of C{SETTINGS_INITIAL_WINDOW_SIZE} moves every open stream's window by the
        difference (to below zero even) and is reported as L{WindowsChanged}; new streams start with
        the new size.
        """
        pair = Pair()
        pair.request(1)
        pair.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100})
        self.assertEqual(pair.toServer(), [("windows",)])
        self.assertEqual(pair.server.localFlowControlWindow(1), 100)
        pair.server.sendData(1, b"x" * 60)
        pair.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 50})
        self.assertEqual(pair.toServer(), [("windows",)])
        self.assertEqual(pair.server.localFlowControlWindow(1), -10)
        self.assertRaises(StreamStateError, pair.server.sendData, 1, b"x")
        pair.request(3)
        self.assertEqual(pair.server.localFlowControlWindow(3), 50)
        pair.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        self.assertEqual(pair.toServer(), [("windows",)])
        self.assertEqual(pair.server.localFlowControlWindow(1), 940)
        self.assertEqual(pair.server.localFlowControlWindow(3), 1000)

    def test_connectionWindowEventOncePerCall(self) -> None:
        """
        Several C{WINDOW_UPDATE} frames for the connection in one call are one L{WindowUpdated}
        (every stream may send more: the application walks them once), though all count; in
        separate calls, one each. Updates of streams are reported each.
        """
        client = RawClient()
        client.send(client.headers(1), client.headers(3))
        update = frame(WINDOW_UPDATE, 0, 0, u32(100))
        self.assertEqual(
            client.send(update, frame(WINDOW_UPDATE, 0, 1, u32(1)), update, update),
            [("window", 0), ("window", 1)],
        )
        self.assertEqual(
            client.send(frame(WINDOW_UPDATE, 0, 3, u32(1000)), update),
            [("window", 3), ("window", 0)],
        )
        self.assertEqual(client.send(update), [("window", 0)])
        self.assertEqual(client.server.localFlowControlWindow(3), WINDOW + 500)
        self.assertEqual(client.sent(), [])

    def test_allWindowsEventOncePerCall(self) -> None:
        """
        A change of C{SETTINGS_INITIAL_WINDOW_SIZE} and a connection C{WINDOW_UPDATE} in one call
        are reported once, by the first: both mean that every stream's window moved.
        """
        client = RawClient()
        client.send(client.headers(1))
        self.assertEqual(
            client.send(
                frame(SETTINGS, 0, 0, setting(INITIAL_WINDOW_SIZE, WINDOW + 10)),
                frame(WINDOW_UPDATE, 0, 0, u32(100)),
                frame(SETTINGS, 0, 0, setting(INITIAL_WINDOW_SIZE, WINDOW + 20)),
            ),
            [("windows",)],
        )
        self.assertEqual(client.server.localFlowControlWindow(1), WINDOW + 20)
        self.assertEqual(
            client.send(
                frame(WINDOW_UPDATE, 0, 0, u32(100)),
                frame(SETTINGS, 0, 0, setting(INITIAL_WINDOW_SIZE, WINDOW + 30)),
            ),
            [("window", 0)],
        )
        self.assertEqual(client.server.localFlowControlWindow(1), WINDOW + 30)

    def test_initialWindowSizeRepeated(self) -> None:
        """
        A C{SETTINGS} frame that repeats C{SETTINGS_INITIAL_WINDOW_SIZE} moves the streams' windows
        once, to the last value; one whose values come back to the current one moves nothing and
        reports nothing.
        """
        client = RawClient()
        client.send(client.headers(1))
        repeated = setting(INITIAL_WINDOW_SIZE, 100) + setting(INITIAL_WINDOW_SIZE, 300)
        self.assertEqual(client.send(frame(SETTINGS, 0, 0, repeated)), [("windows",)])
        self.assertEqual(client.server.localFlowControlWindow(1), 300)
        back = setting(INITIAL_WINDOW_SIZE, 7) + setting(INITIAL_WINDOW_SIZE, 300)
        self.assertEqual(client.send(frame(SETTINGS, 0, 0, back)), [])
        self.assertEqual(client.server.localFlowControlWindow(1), 300)
        self.assertEqual(client.sent(), [Frame(SETTINGS, ACK, 0, b"")] * 2)

    def test_initialWindowSizeUnchanged(self) -> None:
        """
        C{SETTINGS_INITIAL_WINDOW_SIZE} of the current value is no L{WindowsChanged}.
        """
        client = RawClient()
        self.assertEqual(
            client.send(frame(SETTINGS, 0, 0, setting(INITIAL_WINDOW_SIZE, WINDOW))), []
        )
        self.assertEqual(client.sent(), [Frame(SETTINGS, ACK, 0, b"")])

    def test_dataSplit(self) -> None:
        """
        Data longer than L{ServerConnection.maxOutboundFrameSize} is sent in frames of that size,
        C{END_STREAM} on the last only, which the client reads as the whole.
        """
        pair = Pair()
        pair.request()
        self.assertEqual(pair.server.maxOutboundFrameSize, FRAME)
        pair.server.sendHeaders(1, [(b":status", b"200")])
        pair.toClient()
        body = bytes(range(256)) * 160
        pair.server.sendData(1, body, endStream=True)
        data = pair.server.dataToSend()
        frames = parseFrames(data)
        self.assertEqual([len(f.payload) for f in frames], [FRAME, FRAME, len(body) - 2 * FRAME])
        self.assertEqual([f.flags for f in frames], [0, 0, END_STREAM])
        self.assertEqual(b"".join(f.payload for f in frames), body)
        events = pair.client.receive_data(data)
        received = b"".join(e.data or b"" for e in events if isinstance(e, h2events.DataReceived))
        self.assertEqual(received, body)
        self.assertIsInstance(events[-1], h2events.StreamEnded)

    def test_largerFrames(self) -> None:
        """
        Once the client raised C{SETTINGS_MAX_FRAME_SIZE}, data goes in frames of that size, which
        the client accepts.
        """
        pair = Pair()
        pair.client.update_settings(
            {SettingCodes.MAX_FRAME_SIZE: 100_000, SettingCodes.INITIAL_WINDOW_SIZE: 300_000}
        )
        pair.client.increment_flow_control_window(300_000)
        pair.toServer()
        pair.toClient()
        self.assertEqual(pair.server.maxOutboundFrameSize, 100_000)
        pair.request()
        pair.server.sendHeaders(1, [(b":status", b"200")])
        body = b"0123456789" * 25_000
        pair.server.sendData(1, body, endStream=True)
        data = pair.server.dataToSend()
        sizes = [len(f.payload) for f in parseFrames(data) if f.kind == DATA]
        self.assertEqual(sizes, [100_000, 100_000, 50_000])
        events = pair.client.receive_data(data)
        received = b"".join(e.data or b"" for e in events if isinstance(e, h2events.DataReceived))
        self.assertEqual(received, body)

    def test_acknowledgeGivesWindowBack(self) -> None:
        """
        Acknowledged data is given back to the client's windows once half of that window was
        acknowledged, not before: a stream's at half of L{INITIAL_WINDOW}, the connection's at half
        of L{CONNECTION_WINDOW}, which takes several streams.
        """
        pair = Pair()
        half = INITIAL_WINDOW // 2
        for streamID in (1, 3, 5, 7, 9):
            pair.request(streamID, POST, endStream=False)
            for offset in range(0, half - 1000, FRAME):
                pair.client.send_data(streamID, b"x" * min(FRAME, half - 1000 - offset))
        pair.toServer()
        self.assertEqual(pair.client.local_flow_control_window(1), INITIAL_WINDOW - half + 1000)
        pair.server.acknowledgeReceivedData(half - 1001, 1)
        self.assertEqual(pair.server.dataToSend(), b"")
        pair.client.send_data(1, b"x" * 1000)
        pair.toServer()
        pair.server.acknowledgeReceivedData(1, 1)
        self.assertEqual(pair.server.dataToSend(), b"")
        pair.server.acknowledgeReceivedData(1000, 1)
        data = pair.server.dataToSend()
        self.assertEqual(parseFrames(data), [windowUpdate(1, half)])
        pair.client.receive_data(data)
        self.assertEqual(pair.client.local_flow_control_window(1), INITIAL_WINDOW)
        # The connection's: 5 x (half - 1000) + 1000 received; half of its window is crossed on
        # the fifth stream's acknowledgement.
        for streamID in (3, 5, 7):
            pair.server.acknowledgeReceivedData(half - 1000, streamID)
        self.assertEqual(pair.server.dataToSend(), b"")
        pair.server.acknowledgeReceivedData(half - 1000, 9)
        received = 5 * (half - 1000) + 1000
        self.assertEqual(parseFrames(pair.server.dataToSend()), [windowUpdate(0, received)])

    def test_acknowledgeAfterEnd(self) -> None:
        """
        Data acknowledged after the client ended the stream gives back window to the connection
        only: the stream will carry nothing more.
        """
        pair = Pair()
        pair.request(1, POST, endStream=False)
        pair.client.send_data(1, b"x" * 16_000)
        pair.client.send_data(1, b"x" * 16_000)
        pair.client.send_data(1, b"x" * 8_000, end_stream=True)
        pair.toServer()
        pair.server.acknowledgeReceivedData(40_000, 1)
        self.assertEqual(pair.server.dataToSend(), b"")
        pair.server.acknowledgeReceivedData(0, 1)
        self.assertEqual(pair.server.dataToSend(), b"")
        # Other streams take the connection past half its window: one update for all of it.
        rest = CONNECTION_WINDOW // 2 - 40_000 + 3  # Divisible by 3.
        for streamID in (3, 5, 7):
            pair.request(streamID, POST, endStream=False)
            for offset in range(0, rest // 3, FRAME):
                pair.client.send_data(streamID, b"x" * min(FRAME, rest // 3 - offset))
        pair.toServer()
        for streamID in (3, 5, 7):
            pair.server.acknowledgeReceivedData(rest // 3, streamID)
        frames = parseFrames(pair.server.dataToSend())
        self.assertIn(windowUpdate(0, 40_000 + 3 * (rest // 3)), frames)
        self.assertEqual([f for f in frames if f.streamID == 1], [])

    def test_connectionWindowOverflowByClient(self) -> None:
        """
        C{DATA} beyond the connection's window is a connection error of type
        C{FLOW_CONTROL_ERROR}: here L{CONNECTION_WINDOW} bytes and one more on five streams, none
        of which had its own window exceeded.
        """
        client = RawClient()
        chunk = b"x" * FRAME
        perStream = CONNECTION_WINDOW // 4
        for streamID in (1, 3, 5, 7):
            client.send(client.headers(streamID, POST, END_HEADERS))
            events = client.send(*[frame(DATA, 0, streamID, chunk)] * (perStream // FRAME))
            self.assertEqual(len(events), perStream // FRAME)
        client.send(client.headers(9, POST, END_HEADERS))
        self.assertEqual(client.sent(), [])
        self.assertConnectionError(
            client.server, frame(DATA, 0, 9, b"x"), ErrorCode.FLOW_CONTROL_ERROR, 9
        )

    def test_connectionAndStreamWindowOverflow(self) -> None:
        """
        When one frame exceeds both the stream's window and the connection's, the connection's is
        checked first: a connection error of type C{FLOW_CONTROL_ERROR}. Four streams filled to
        their windows fill the connection's too; one more byte on the last one exceeds both.
        """
        client = RawClient()
        chunk = b"x" * FRAME
        for streamID in (1, 3, 5, 7):
            client.send(client.headers(streamID, POST, END_HEADERS))
            client.send(*[frame(DATA, 0, streamID, chunk)] * (INITIAL_WINDOW // FRAME))
        self.assertEqual(4 * INITIAL_WINDOW, CONNECTION_WINDOW)
        self.assertConnectionError(
            client.server, frame(DATA, 0, 7, b"x"), ErrorCode.FLOW_CONTROL_ERROR, 7
        )

    def test_streamWindowOverflowByClient(self) -> None:
        """
        C{DATA} beyond a stream's window (L{INITIAL_WINDOW}, smaller than the connection's) resets
        that stream with C{FLOW_CONTROL_ERROR} and gives back the frame's share of the connection's
        window; other streams go on.
        """
        client = RawClient()
        client.send(client.headers(1, POST, END_HEADERS), client.headers(3, POST, END_HEADERS))
        chunk = b"x" * FRAME
        events = client.send(*[frame(DATA, 0, 1, chunk)] * (INITIAL_WINDOW // FRAME))
        self.assertEqual(events, [("data", 1, chunk, FRAME)] * (INITIAL_WINDOW // FRAME))
        self.assertEqual(
            client.send(frame(DATA, 0, 1, b"x")),
            [
                ("reset", 1, ErrorCode.FLOW_CONTROL_ERROR, False),
            ],
        )
        event = client.events[-1]
        assert isinstance(event, StreamReset)
        self.assertTrue(event.reason)
        self.assertEqual(
            client.sent(), [windowUpdate(0, 1), reset(1, ErrorCode.FLOW_CONTROL_ERROR)]
        )
        self.assertEqual(client.server.openStreams, 1)  # Stream 3.
        self.assertEqual(client.send(client.headers(5)), [("request", 5, GET), ("ended", 5)])

    def test_connectionWindowUpdateOverflow(self) -> None:
        """
        A C{WINDOW_UPDATE} that takes the connection's window to 2^31-1 is accepted; beyond it, it is
        a connection error of type C{FLOW_CONTROL_ERROR}.
        """
        client = RawClient()
        client.send(client.headers(1))
        self.assertEqual(
            client.send(frame(WINDOW_UPDATE, 0, 0, u32(2**31 - 1 - WINDOW))), [("window", 0)]
        )
        self.assertConnectionError(
            client.server, frame(WINDOW_UPDATE, 0, 0, u32(1)), ErrorCode.FLOW_CONTROL_ERROR, 1
        )

    def test_streamWindowUpdateOverflow(self) -> None:
        """
        A C{WINDOW_UPDATE} that takes a stream's window beyond 2^31-1 resets the stream with
        C{FLOW_CONTROL_ERROR}; the connection goes on.
        """
        client = RawClient()
        client.send(client.headers(1), client.headers(3))
        self.assertEqual(
            client.send(frame(WINDOW_UPDATE, 0, 1, u32(2**31 - 1 - WINDOW))), [("window", 1)]
        )
        client.send(frame(WINDOW_UPDATE, 0, 1, u32(1)))
        self.assertStreamError(client, 1, ErrorCode.FLOW_CONTROL_ERROR)
        self.assertRaises(StreamStateError, client.server.localFlowControlWindow, 1)
        self.assertEqual(client.server.localFlowControlWindow(3), WINDOW)

    def test_connectionWindowUpdateZero(self) -> None:
        """
        A C{WINDOW_UPDATE} of 0 for the connection is a connection error of type
        C{PROTOCOL_ERROR}.
        """
        client = RawClient()
        self.assertConnectionError(
            client.server, frame(WINDOW_UPDATE, 0, 0, u32(0)), ErrorCode.PROTOCOL_ERROR
        )

    def test_connectionWindowUpdateReservedBit(self) -> None:
        """
        The reserved bit of a C{WINDOW_UPDATE} increment is ignored: with it alone, the increment
        is 0.
        """
        client = RawClient()
        self.assertEqual(client.send(frame(WINDOW_UPDATE, 0, 0, u32(0x80000001))), [("window", 0)])
        self.assertConnectionError(
            client.server, frame(WINDOW_UPDATE, 0, 0, u32(0x80000000)), ErrorCode.PROTOCOL_ERROR
        )

    def test_streamWindowUpdateZero(self) -> None:
        """
        A C{WINDOW_UPDATE} of 0 for a stream resets that stream with C{PROTOCOL_ERROR}.
        """
        client = RawClient()
        client.send(client.headers(1), client.headers(3))
        client.send(frame(WINDOW_UPDATE, 0, 3, u32(0)))
        self.assertStreamError(client, 3, ErrorCode.PROTOCOL_ERROR)
        self.assertEqual(client.server.openStreams, 1)

    def test_initialWindowSizeOverflow(self) -> None:
        """
        A C{SETTINGS_INITIAL_WINDOW_SIZE} that takes an open stream's window beyond 2^31-1 (it was
        enlarged by C{WINDOW_UPDATE}) is a connection error of type C{FLOW_CONTROL_ERROR}.
        """
        client = RawClient()
        client.send(client.headers(1))
        client.send(frame(WINDOW_UPDATE, 0, 1, u32(10)))
        self.assertConnectionError(
            client.server,
            frame(SETTINGS, 0, 0, setting(INITIAL_WINDOW_SIZE, 2**31 - 1)),
            ErrorCode.FLOW_CONTROL_ERROR,
            1,
        )


class ConnectionErrorTests(ServerTestCase):
    """
    Violations of the connection's rules: L{ProtocolError} with the right code, a C{GOAWAY} with it
    queued, and nothing read after.
    """

    def assertRefused(self, code: ErrorCode, *frames: bytes, opened: int = 0) -> None:
        """
        After the preface, C{SETTINGS}, and C{opened} requests (streams 1, 3, ...) with bodies to
        come, C{frames} are a connection error with C{code}.
        """
        client = RawClient()
        for streamID in range(1, 2 * opened, 2):
            client.send(client.headers(streamID, POST, END_HEADERS))
        client.sent()
        self.assertConnectionError(client.server, b"".join(frames), code, max(0, 2 * opened - 1))

    def test_frameTooLarge(self) -> None:
        """
        A frame longer than 16,384 bytes is a connection error of type C{FRAME_SIZE_ERROR}, seen as
        soon as its header came; 16,384 bytes is fine.
        """
        client = RawClient()
        client.send(client.headers(1, POST, END_HEADERS))
        self.assertEqual(
            client.send(frame(DATA, 0, 1, b"x" * FRAME)), [("data", 1, b"x" * FRAME, FRAME)]
        )
        self.assertConnectionError(
            client.server, frame(DATA, 0, 1, b"x" * (FRAME + 1))[:9], ErrorCode.FRAME_SIZE_ERROR, 1
        )

    def test_unknownFrameTooLarge(self) -> None:
        """
        The frame size limit holds for frames of unknown types too.
        """
        self.assertRefused(ErrorCode.FRAME_SIZE_ERROR, frame(UNKNOWN, 0, 0, b"x" * (FRAME + 1)))

    def test_streamZero(self) -> None:
        """
        C{DATA}, C{HEADERS} and C{PRIORITY} on stream 0 are connection errors of type
        C{PROTOCOL_ERROR}.
        """
        block = Encoder().encode(GET)
        for name, bad in [
            ("DATA", frame(DATA, 0, 0, b"x")),
            ("HEADERS", frame(HEADERS, END_HEADERS, 0, block)),
            ("PRIORITY", frame(PRIORITY, 0, 0, u32(1) + b"\x01")),
        ]:
            with self.subTest(name):
                self.assertRefused(ErrorCode.PROTOCOL_ERROR, bad, opened=1)

    def test_headersOnEvenStream(self) -> None:
        """
        C{HEADERS} on an even stream (one the server would open) is a connection error of type
        C{PROTOCOL_ERROR}.
        """
        block = Encoder().encode(GET)
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(HEADERS, END_HEADERS, 2, block))

    def test_dataOnIdleStream(self) -> None:
        """
        C{DATA} on a stream the client has not opened is a connection error of type
        C{PROTOCOL_ERROR}.
        """
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(DATA, 0, 1, b"x"))
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(DATA, 0, 5, b"x"), opened=2)

    def test_resetOnIdleStream(self) -> None:
        """
        C{RST_STREAM} on a stream the client has not opened, or on stream 0, is a connection error
        of type C{PROTOCOL_ERROR}.
        """
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(RST_STREAM, 0, 3, u32(8)), opened=1)
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(RST_STREAM, 0, 0, u32(8)), opened=1)

    def test_windowUpdateOnIdleStream(self) -> None:
        """
        C{WINDOW_UPDATE} on a stream the client has not opened is a connection error of type
        C{PROTOCOL_ERROR}.
        """
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(WINDOW_UPDATE, 0, 3, u32(8)), opened=1)

    def test_wrongLengths(self) -> None:
        """
        C{PING}, C{RST_STREAM}, C{WINDOW_UPDATE} and C{PRIORITY} frames not of their exact lengths,
        C{SETTINGS} not a multiple of 6 bytes, and C{SETTINGS} acknowledgements with a payload are
        connection errors of type C{FRAME_SIZE_ERROR}.
        """
        cases = {
            "PING 7": frame(PING, 0, 0, b"x" * 7),
            "PING 9": frame(PING, 0, 0, b"x" * 9),
            "PING ACK 0": frame(PING, ACK, 0),
            "RST_STREAM 3": frame(RST_STREAM, 0, 1, b"x" * 3),
            "RST_STREAM 5": frame(RST_STREAM, 0, 1, b"x" * 5),
            "WINDOW_UPDATE 3": frame(WINDOW_UPDATE, 0, 1, b"x" * 3),
            "WINDOW_UPDATE 5": frame(WINDOW_UPDATE, 0, 0, u32(1) + b"x"),
            "PRIORITY 4": frame(PRIORITY, 0, 1, u32(0)),
            "PRIORITY 6": frame(PRIORITY, 0, 1, u32(0) + b"xx"),
            "SETTINGS 5": frame(SETTINGS, 0, 0, b"x" * 5),
            "SETTINGS 7": frame(SETTINGS, 0, 0, setting(ENABLE_PUSH, 0) + b"x"),
            "SETTINGS ACK 6": frame(SETTINGS, ACK, 0, setting(ENABLE_PUSH, 0)),
            "GOAWAY 7": frame(GOAWAY, 0, 0, b"x" * 7),
        }
        for name, bad in cases.items():
            with self.subTest(name):
                self.assertRefused(ErrorCode.FRAME_SIZE_ERROR, bad, opened=1)

    def test_connectionFramesOnStream(self) -> None:
        """
        C{PING}, C{SETTINGS} and C{GOAWAY} on a stream are connection errors of type
        C{PROTOCOL_ERROR}.
        """
        cases = {
            "PING": frame(PING, 0, 1, b"12345678"),
            "SETTINGS": frame(SETTINGS, 0, 1),
            "GOAWAY": frame(GOAWAY, 0, 1, b"\x00" * 8),
        }
        for name, bad in cases.items():
            with self.subTest(name):
                self.assertRefused(ErrorCode.PROTOCOL_ERROR, bad, opened=1)

    def test_pushPromise(self) -> None:
        """
        C{PUSH_PROMISE} from a client is a connection error of type C{PROTOCOL_ERROR}.
        """
        block = Encoder().encode(GET)
        self.assertRefused(
            ErrorCode.PROTOCOL_ERROR, frame(PUSH_PROMISE, END_HEADERS, 1, u32(2) + block), opened=1
        )

    def test_continuationWithoutHeaders(self) -> None:
        """
        C{CONTINUATION} with no header block being collected, even after a complete one, is a
        connection error of type C{PROTOCOL_ERROR}.
        """
        block = Encoder().encode(GET)
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(CONTINUATION, END_HEADERS, 1, block))
        client = RawClient()
        client.send(client.headers(1))
        self.assertConnectionError(
            client.server, frame(CONTINUATION, END_HEADERS, 1, b""), ErrorCode.PROTOCOL_ERROR, 1
        )

    def test_frameInsideHeaderBlock(self) -> None:
        """
        Any frame but C{CONTINUATION} in the middle of a header block (even one of an unknown type)
        is a connection error of type C{PROTOCOL_ERROR}.
        """
        block = Encoder().encode(GET)
        for name, bad in [
            ("PING", frame(PING, 0, 0, b"12345678")),
            ("DATA", frame(DATA, 0, 1, b"x")),
            ("HEADERS", frame(HEADERS, END_HEADERS, 3, block)),
            ("unknown", frame(UNKNOWN, 0, 0, b"")),
        ]:
            with self.subTest(name):
                self.assertRefused(
                    ErrorCode.PROTOCOL_ERROR,
                    frame(HEADERS, 0, 1, block[:2]),
                    bad,
                    frame(CONTINUATION, END_HEADERS, 1, block[2:]),
                )

    def test_continuationOnOtherStream(self) -> None:
        """
        C{CONTINUATION} on another stream than the header block's is a connection error of type
        C{PROTOCOL_ERROR}.
        """
        block = Encoder().encode(GET)
        self.assertRefused(
            ErrorCode.PROTOCOL_ERROR,
            frame(HEADERS, 0, 1, block[:2]),
            frame(CONTINUATION, END_HEADERS, 3, block[2:]),
        )

    def test_headerBlockTooLarge(self) -> None:
        """
        A header block of more than L{MAX_HEADER_BLOCK} (64 KiB) bytes is a connection error of
        type C{ENHANCE_YOUR_CALM}, raised before the block ends.
        """
        self.assertEqual(MAX_HEADER_BLOCK, 65_536)
        chunk = b"\x00" * FRAME
        self.assertRefused(
            ErrorCode.ENHANCE_YOUR_CALM,
            frame(HEADERS, 0, 1, chunk),
            *[frame(CONTINUATION, 0, 1, chunk)] * 3,
            frame(CONTINUATION, 0, 1, b"\x00"),
        )

    def test_tooManyContinuations(self) -> None:
        """
        A header block in more than L{MAX_CONTINUATIONS} (128) C{CONTINUATION} frames, even empty
        ones, is a connection error of type C{ENHANCE_YOUR_CALM}.
        """
        self.assertEqual(MAX_CONTINUATIONS, 128)
        self.assertRefused(
            ErrorCode.ENHANCE_YOUR_CALM,
            frame(HEADERS, 0, 1, b""),
            *[frame(CONTINUATION, 0, 1, b"")] * (MAX_CONTINUATIONS + 1),
        )

    def test_headerListTooLarge(self) -> None:
        """
        A header list of more than 65,536 bytes once decoded (as RFC 7541 counts: names, values, 32
        per field), from a small block that repeats an indexed field, is a connection error of type
        C{ENHANCE_YOUR_CALM}; a list within the limit is fine.
        """
        field = (b"x-big", b"v" * 4000)
        size = len(field[0]) + len(field[1]) + 32
        under = (MAX_HEADER_LIST_SIZE - 200) // size
        client = RawClient()
        fields = [*GET, *[field] * under]
        self.assertEqual(client.send(client.headers(1, fields))[0], ("request", 1, fields))
        block = client.block([*GET, *[field] * (under + 1)])
        self.assertLess(len(block), FRAME)
        self.assertConnectionError(
            client.server,
            frame(HEADERS, END_HEADERS | END_STREAM, 3, block),
            ErrorCode.ENHANCE_YOUR_CALM,
            1,
        )

    def test_garbageHeaderBlock(self) -> None:
        """
        A header block HPACK cannot decode (index 0 or beyond both tables, a truncated or overlong
        integer, a string past the block, bad Huffman, a table size update after a field or above
        4,096) is a connection error of type C{COMPRESSION_ERROR}.
        """
        cases = {
            "index 0": b"\x80",
            "index": b"\xff\xff\xff\x7f",
            "long integer": b"\xff\x80\x80\x80\x80\x01",
            "literal name index 70": b"\x0f\x37\x01a",
            "string past the block": b"\x00\x05ab",
            "size update after a field": b"\x82\x20",
            "index 70": b"\xc6",
            "truncated": b"\xff",
            "huffman": b"\x00\x85\xff\xff\xff\xff\xff\x01a",
            "table size": b"\x3f\xe1\xff\x03",
        }
        for name, block in cases.items():
            with self.subTest(name):
                self.assertRefused(
                    ErrorCode.COMPRESSION_ERROR, frame(HEADERS, END_HEADERS, 1, block)
                )

    def test_dataPaddingTooLong(self) -> None:
        """
        C{DATA} whose padding length is the payload's length or more is a connection error of type
        C{PROTOCOL_ERROR}; a padded C{DATA} with no payload at all, of type C{FRAME_SIZE_ERROR}.
        """
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(DATA, PADDED, 1, b"\x03ab"), opened=1)
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(DATA, PADDED, 1, b"\x01"), opened=1)
        self.assertRefused(ErrorCode.FRAME_SIZE_ERROR, frame(DATA, PADDED, 1), opened=1)

    def test_headersPaddingTooLong(self) -> None:
        """
        C{HEADERS} whose padding is longer than what follows the padding length is a connection
        error of type C{PROTOCOL_ERROR}; a padded C{HEADERS} with no payload, of type
        C{FRAME_SIZE_ERROR}.
        """
        block = Encoder().encode(GET)
        self.assertRefused(
            ErrorCode.PROTOCOL_ERROR,
            frame(HEADERS, PADDED | END_HEADERS, 1, bytes([len(block) + 1]) + block),
        )
        self.assertRefused(ErrorCode.FRAME_SIZE_ERROR, frame(HEADERS, PADDED | END_HEADERS, 1))

    def test_headersPriorityTooShort(self) -> None:
        """
        C{HEADERS} with the C{PRIORITY} flag and fewer than 5 bytes for it is a connection error of
        type C{FRAME_SIZE_ERROR}.
        """
        self.assertRefused(
            ErrorCode.FRAME_SIZE_ERROR, frame(HEADERS, PRIORITY_FLAG | END_HEADERS, 1, b"\x00" * 4)
        )

    def test_dependsOnItself(self) -> None:
        """
        A stream depending on itself, in C{HEADERS} (the reserved bit aside) or in C{PRIORITY}, is a
        connection error of type C{PROTOCOL_ERROR}.
        """
        block = Encoder().encode(GET)
        self.assertRefused(
            ErrorCode.PROTOCOL_ERROR,
            frame(HEADERS, PRIORITY_FLAG | END_HEADERS, 1, u32(0x80000001) + b"\x10" + block),
        )
        self.assertRefused(ErrorCode.PROTOCOL_ERROR, frame(PRIORITY, 0, 3, u32(3) + b"\x10"))

    def test_badSettings(self) -> None:
        """
        C{SETTINGS_ENABLE_PUSH} other than 0 or 1 and C{SETTINGS_MAX_FRAME_SIZE} outside
        16,384..2^24-1 are connection errors of type C{PROTOCOL_ERROR};
        C{SETTINGS_INITIAL_WINDOW_SIZE} beyond 2^31-1, of type C{FLOW_CONTROL_ERROR}.
        """
        cases = [
            ("push 2", setting(ENABLE_PUSH, 2), ErrorCode.PROTOCOL_ERROR),
            ("frame 16383", setting(MAX_FRAME_SIZE, 16_383), ErrorCode.PROTOCOL_ERROR),
            ("frame 2^24", setting(MAX_FRAME_SIZE, 2**24), ErrorCode.PROTOCOL_ERROR),
            ("window 2^31", setting(INITIAL_WINDOW_SIZE, 2**31), ErrorCode.FLOW_CONTROL_ERROR),
        ]
        for name, payload, code in cases:
            with self.subTest(name):
                self.assertRefused(code, frame(SETTINGS, 0, 0, payload))
                server = ServerConnection()
                self.assertConnectionError(server, PREFACE + frame(SETTINGS, 0, 0, payload), code)

    def test_goodSettingsBounds(self) -> None:
        """
        The bounds of the settings' ranges are accepted: C{SETTINGS_ENABLE_PUSH} 0 and 1,
        C{SETTINGS_MAX_FRAME_SIZE} 16,384 and 2^24-1, C{SETTINGS_INITIAL_WINDOW_SIZE} 2^31-1.
        """
        client = RawClient()
        for payload in [
            setting(ENABLE_PUSH, 1),
            setting(ENABLE_PUSH, 0),
            setting(MAX_FRAME_SIZE, 2**24 - 1),
            setting(MAX_FRAME_SIZE, 16_384),
            setting(INITIAL_WINDOW_SIZE, 2**31 - 1),
        ]:
            client.send(frame(SETTINGS, 0, 0, payload))
            self.assertEqual(client.sent(), [Frame(SETTINGS, ACK, 0, b"")])
        self.assertEqual(client.server.maxOutboundFrameSize, 16_384)

    def test_lastStreamID(self) -> None:
        """
        The C{GOAWAY} of an error carries the highest stream id the client opened, refused or
        closed ones included.
        """
        client = RawClient()
        client.send(client.headers(1), client.headers(7))
        self.assertEqual(client.server.lastStreamID, 7)
        self.assertConnectionError(
            client.server, frame(PUSH_PROMISE, 0, 1), ErrorCode.PROTOCOL_ERROR, 7
        )

    def test_eventsBeforeError(self) -> None:
        """
        Frames before the violation, in the same call, were acted on: their answers are queued
        before the C{GOAWAY}.
        """
        client = RawClient()
        self.assertRaises(
            ProtocolError,
            client.server.receiveData,
            frame(PING, 0, 0, b"abcdefgh") + client.headers(1) + frame(DATA, 0, 0, b""),
        )
        self.assertEqual(
            client.sent(),
            [Frame(PING, ACK, 0, b"abcdefgh"), goAway(1, ErrorCode.PROTOCOL_ERROR)],
        )

    def test_closeConnection(self) -> None:
        """
        L{ServerConnection.closeConnection} queues C{GOAWAY} with its code and the last stream id,
        which the client reads; nothing is read after it.
        """
        pair = Pair()
        pair.request(1)
        pair.request(3, POST, endStream=False)
        pair.server.closeConnection(ErrorCode.ENHANCE_YOUR_CALM)
        data = pair.server.dataToSend()
        self.assertEqual(parseFrames(data), [goAway(3, ErrorCode.ENHANCE_YOUR_CALM)])
        [event] = pair.client.receive_data(data)
        assert isinstance(event, h2events.ConnectionTerminated)
        self.assertEqual(event.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(event.last_stream_id, 3)
        self.assertEqual(pair.server.receiveData(frame(DATA, END_STREAM, 3, b"x")), [])
        self.assertEqual(pair.server.dataToSend(), b"")

    def test_errorReachesClient(self) -> None:
        """
        The C{GOAWAY} of a connection error is read by the C{h2} client as L{ConnectionTerminated}
        with the code.
        """
        pair = Pair()
        pair.request()
        self.assertRaises(ProtocolError, pair.server.receiveData, frame(PING, 0, 1, b"12345678"))
        [event] = pair.toClient()
        assert isinstance(event, h2events.ConnectionTerminated)
        self.assertEqual(event.error_code, ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(event.last_stream_id, 1)


class StreamErrorTests(ServerTestCase):
    """
    Violations confined to one stream: that stream is reset (L{StreamReset} of the server's,
    C{RST_STREAM} queued), the others go on.
    """

    def test_dataAfterEndStream(self) -> None:
        """
        C{DATA} on a stream the client ended (and the server has not) resets it with
        C{STREAM_CLOSED}, its window given back to the connection.
        """
        client = RawClient()
        client.send(client.headers(1), client.headers(3, POST, END_HEADERS))
        self.assertEqual(
            client.send(frame(DATA, 0, 1, b"late")),
            [("reset", 1, ErrorCode.STREAM_CLOSED, False)],
        )
        self.assertStreamError(client, 1, ErrorCode.STREAM_CLOSED)
        self.assertEqual(client.server.openStreams, 1)
        self.assertEqual(client.send(frame(DATA, 0, 1, b"later")), [])
        self.assertEqual(client.sent(), [windowUpdate(0, 5)])
        self.assertEqual(
            client.send(frame(DATA, END_STREAM, 3, b"ok")), [("data", 3, b"ok", 2), ("ended", 3)]
        )

    def test_dataAfterEndStreamGivesBack(self) -> None:
        """
        The C{DATA} that broke the rule has its share of the connection's window given back, before
        the reset.
        """
        client = RawClient()
        client.send(client.headers(1))
        client.send(frame(DATA, 0, 1, b"late"))
        self.assertEqual(client.sent(), [windowUpdate(0, 4), reset(1, ErrorCode.STREAM_CLOSED)])

    def test_trailersWithoutEndStream(self) -> None:
        """
        A second header block (trailers) without C{END_STREAM} resets the stream with
        C{PROTOCOL_ERROR}; other streams go on.
        """
        client = RawClient()
        client.send(client.headers(1, POST, END_HEADERS), client.headers(3, POST, END_HEADERS))
        client.send(client.headers(1, [(b"x-trailer", b"1")], END_HEADERS))
        self.assertStreamError(client, 1, ErrorCode.PROTOCOL_ERROR)
        self.assertEqual(client.server.openStreams, 1)
        self.assertEqual(client.send(client.headers(3, [(b"x-trailer", b"1")])), [("ended", 3)])

    def test_headersAfterEndStream(self) -> None:
        """
        A header block on a stream the client ended resets it with C{STREAM_CLOSED}.
        """
        client = RawClient()
        client.send(client.headers(1), client.headers(3, POST, END_HEADERS))
        client.send(client.headers(1, [(b"x-trailer", b"1")]))
        self.assertStreamError(client, 1, ErrorCode.STREAM_CLOSED)
        self.assertEqual(
            client.send(frame(DATA, END_STREAM, 3, b"")), [("data", 3, b"", 0), ("ended", 3)]
        )

    def test_bodyLongerThanContentLength(self) -> None:
        """
        A body longer than C{content-length} resets the stream with C{PROTOCOL_ERROR} at the frame
        with the first byte too many, which is not delivered; its window is given back.
        """
        client = RawClient()
        client.send(client.headers(1, [*POST, (b"content-length", b"5")], END_HEADERS))
        self.assertEqual(client.send(frame(DATA, 0, 1, b"abc")), [("data", 1, b"abc", 3)])
        self.assertEqual(
            client.send(frame(DATA, 0, 1, b"def")),
            [("reset", 1, ErrorCode.PROTOCOL_ERROR, False)],
        )
        self.assertStreamError(client, 1, ErrorCode.PROTOCOL_ERROR)

    def test_bodyLongerGivesBack(self) -> None:
        """
        The frame with more bytes than C{content-length} allows has its share of the connection's
        window given back.
        """
        client = RawClient()
        client.send(client.headers(1, [*POST, (b"content-length", b"2")], END_HEADERS))
        client.send(frame(DATA, END_STREAM, 1, b"abc"))
        self.assertEqual(client.sent(), [windowUpdate(0, 3), reset(1, ErrorCode.PROTOCOL_ERROR)])

    def test_bodyShorterThanContentLength(self) -> None:
        """
        A body shorter than C{content-length} resets the stream with C{PROTOCOL_ERROR} at its end
        (no L{StreamEnded}), whether it ends with C{DATA}, with trailers, or with the head.
        """
        client = RawClient()
        fields = [*POST, (b"content-length", b"5")]
        client.send(client.headers(1, fields, END_HEADERS))
        self.assertEqual(
            client.send(frame(DATA, END_STREAM, 1, b"abcd")),
            [("data", 1, b"abcd", 4), ("reset", 1, ErrorCode.PROTOCOL_ERROR, False)],
        )
        client.send(client.headers(3, fields, END_HEADERS))
        client.sent()
        client.send(frame(DATA, 0, 3, b"abcd"), client.headers(3, [(b"x-trailer", b"1")]))
        self.assertStreamError(client, 3, ErrorCode.PROTOCOL_ERROR)
        self.assertEqual(
            client.send(client.headers(5, fields)),
            [("request", 5, fields), ("reset", 5, ErrorCode.PROTOCOL_ERROR, False)],
        )
        self.assertEqual(client.server.openStreams, 0)

    def test_refusedStream(self) -> None:
        """
        The stream beyond L{MAX_CONCURRENT_STREAMS} open ones is refused with C{REFUSED_STREAM};
        its header block is decoded all the same, so that once a stream closed, the next request,
        whose block refers to the fields the refused one added to the HPACK table, decodes right.
        """
        client = RawClient()
        frames = [
            client.headers(2 * i + 1, POST, END_HEADERS) for i in range(MAX_CONCURRENT_STREAMS)
        ]
        client.send(*frames)
        self.assertEqual(client.server.openStreams, MAX_CONCURRENT_STREAMS)
        refused = [*GET, (b"x-token", b"only in the refused block")]
        streamID = 2 * MAX_CONCURRENT_STREAMS + 1
        self.assertEqual(
            client.send(client.headers(streamID, refused)),
            [("reset", streamID, ErrorCode.REFUSED_STREAM, False)],
        )
        self.assertEqual(client.sent(), [reset(streamID, ErrorCode.REFUSED_STREAM)])
        self.assertEqual(client.server.lastStreamID, streamID)
        self.assertEqual(client.server.openStreams, MAX_CONCURRENT_STREAMS)
        client.send(frame(RST_STREAM, 0, 1, u32(ErrorCode.CANCEL)))
        block = client.block(refused)
        self.assertLess(len(block), 10)  # Indexed from the dynamic table.
        self.assertEqual(
            client.send(frame(HEADERS, END_HEADERS | END_STREAM, streamID + 2, block)),
            [("request", streamID + 2, refused), ("ended", streamID + 2)],
        )

    def test_dataOnRefusedStream(self) -> None:
        """
        C{DATA} on a refused stream produces no event; its share of the connection's window is
        given back at once.
        """
        client = RawClient()
        client.send(*[client.headers(2 * i + 1) for i in range(MAX_CONCURRENT_STREAMS)])
        streamID = 2 * MAX_CONCURRENT_STREAMS + 1
        client.send(client.headers(streamID, POST, END_HEADERS))
        client.sent()
        self.assertEqual(
            client.send(frame(DATA, PADDED | END_STREAM, streamID, b"\x02abc\x00\x00")), []
        )
        self.assertEqual(client.sent(), [windowUpdate(0, 6)])

    def test_dataOnResetStream(self) -> None:
        """
        C{DATA} on a stream the server reset produces no event; its share of the connection's
        window is given back, so that a client may keep sending on the connection.
        """
        client = RawClient()
        client.send(client.headers(1, POST, END_HEADERS), client.headers(3, POST, END_HEADERS))
        client.server.resetStream(1, ErrorCode.CANCEL)
        self.assertEqual(client.sent(), [reset(1, ErrorCode.CANCEL)])
        chunk = b"x" * FRAME
        for _ in range(8):
            self.assertEqual(client.send(frame(DATA, 0, 1, chunk)), [])
            self.assertEqual(client.sent(), [windowUpdate(0, FRAME)])
        self.assertEqual(client.send(frame(DATA, 0, 3, chunk)), [("data", 3, chunk, FRAME)])


class SendingTests(ServerTestCase):
    """
    The server's side: what it may send, and how.
    """

    def test_unknownStream(self) -> None:
        """
        Sending on, resetting, or asking the window of a stream the client never opened raises
        L{StreamStateError}.
        """
        pair = Pair()
        server = pair.server
        self.assertRaises(StreamStateError, server.sendHeaders, 1, [(b":status", b"200")])
        self.assertRaises(StreamStateError, server.sendData, 1, b"x")
        self.assertRaises(StreamStateError, server.endStream, 1)
        self.assertRaises(StreamStateError, server.localFlowControlWindow, 1)
        self.assertRaises(StreamStateError, server.resetStream, 1, ErrorCode.CANCEL)
        self.assertEqual(server.dataToSend(), b"")

    def test_locallyEndedStream(self) -> None:
        """
        Sending on, or asking the window of, a stream the server ended (the client has not) raises
        L{StreamStateError}; resetting it is still possible.
        """
        pair = Pair()
        pair.request(1, POST, endStream=False)
        server = pair.server
        server.sendHeaders(1, [(b":status", b"200")])
        server.endStream(1)
        server.dataToSend()
        self.assertEqual(server.openStreams, 1)
        self.assertRaises(StreamStateError, server.sendHeaders, 1, [(b"x-trailer", b"1")])
        self.assertRaises(StreamStateError, server.sendData, 1, b"x")
        self.assertRaises(StreamStateError, server.endStream, 1)
        self.assertRaises(StreamStateError, server.localFlowControlWindow, 1)
        self.assertEqual(server.dataToSend(), b"")
        server.resetStream(1, ErrorCode.NO_ERROR)
        self.assertEqual(parseFrames(server.dataToSend()), [reset(1, ErrorCode.NO_ERROR)])

    def test_closedStream(self) -> None:
        """
        A stream both sides ended is forgotten: sending on it or resetting it raises
        L{StreamStateError}.
        """
        pair = Pair()
        pair.request()
        pair.server.sendHeaders(1, [(b":status", b"200")], endStream=True)
        self.assertEqual(pair.server.openStreams, 0)
        self.assertRaises(StreamStateError, pair.server.sendData, 1, b"")
        self.assertRaises(StreamStateError, pair.server.resetStream, 1, ErrorCode.CANCEL)

    def test_endStream(self) -> None:
        """
        L{ServerConnection.endStream} sends an empty C{DATA} frame with C{END_STREAM}, even when
        the windows are spent.
        """
        pair = Pair()
        pair.request()
        pair.server.sendHeaders(1, [(b":status", b"200")])
        pair.server.sendData(1, b"x" * WINDOW)
        pair.server.dataToSend()
        pair.server.endStream(1)
        self.assertEqual(parseFrames(pair.server.dataToSend()), [Frame(DATA, END_STREAM, 1, b"")])
        self.assertEqual(pair.server.openStreams, 0)

    def test_endStreamNegativeWindow(self) -> None:
        """
        The stream still ends when a smaller C{SETTINGS_INITIAL_WINDOW_SIZE} made its window
        negative: the empty C{DATA} frame takes no window.
        """
        pair = Pair()
        pair.request()
        pair.server.sendHeaders(1, [(b":status", b"200")])
        pair.server.sendData(1, b"x" * 1000)
        pair.server.dataToSend()
        pair.server.receiveData(frame(SETTINGS, 0, 0, setting(0x4, 10)))
        self.assertEqual(pair.server.localFlowControlWindow(1), 10 - 1000)
        pair.server.endStream(1)
        self.assertIn(Frame(DATA, END_STREAM, 1, b""), parseFrames(pair.server.dataToSend()))
        self.assertEqual(pair.server.openStreams, 0)

    def test_headersEndStream(self) -> None:
        """
        L{ServerConnection.sendHeaders} with C{endStream} sends the block with C{END_STREAM} and
        C{END_HEADERS}; the client reads a response without a body.
        """
        pair = Pair()
        pair.request()
        pair.server.sendHeaders(1, [(b":status", b"204")], endStream=True)
        data = pair.server.dataToSend()
        [headersFrame] = parseFrames(data)
        self.assertEqual(headersFrame[:3], (HEADERS, END_STREAM | END_HEADERS, 1))
        events = pair.client.receive_data(data)
        self.assertEqual(
            [type(e) for e in events], [h2events.ResponseReceived, h2events.StreamEnded]
        )

    def test_interimAndTrailers(self) -> None:
        """
        Several header blocks can be sent on one stream: an interim response, the response, and
        trailers that end the stream.
        """
        pair = Pair()
        pair.request()
        pair.server.sendHeaders(1, [(b":status", b"103"), (b"link", b"</a>")])
        pair.server.sendHeaders(1, [(b":status", b"200")])
        pair.server.sendData(1, b"body")
        pair.server.sendHeaders(1, [(b"x-checksum", b"abc")], endStream=True)
        events = pair.toClient()
        self.assertEqual(
            [type(e) for e in events],
            [
                h2events.InformationalResponseReceived,
                h2events.ResponseReceived,
                h2events.DataReceived,
                h2events.TrailersReceived,
                h2events.StreamEnded,
            ],
        )
        trailers = events[3]
        assert isinstance(trailers, h2events.TrailersReceived)
        self.assertEqual(trailers.headers, [(b"x-checksum", b"abc")])

    def test_resetStream(self) -> None:
        """
        L{ServerConnection.resetStream} queues C{RST_STREAM} with the code and forgets the stream;
        the client reads it as reset.
        """
        pair = Pair()
        pair.request(1, POST, endStream=False)
        pair.request(3)
        pair.server.resetStream(1, ErrorCode.INTERNAL_ERROR)
        self.assertEqual(pair.server.openStreams, 1)
        data = pair.server.dataToSend()
        self.assertEqual(parseFrames(data), [reset(1, ErrorCode.INTERNAL_ERROR)])
        [event] = pair.client.receive_data(data)
        assert isinstance(event, h2events.StreamReset)
        self.assertEqual((event.stream_id, event.error_code), (1, ErrorCodes.INTERNAL_ERROR))
        self.assertRaises(StreamStateError, pair.server.sendData, 1, b"x")
        self.assertRaises(StreamStateError, pair.server.resetStream, 1, ErrorCode.CANCEL)

    def test_responseRepresentations(self) -> None:
        """
        Response fields of every kind reach the client intact, on two responses (the second from
        the encoder's cache): static fields, fields with a static name or a new one, an empty
        value, a value too long to cache, one that Huffman coding would not shorten, and a
        C{set-cookie}, which comes marked never to be indexed.
        """
        pair = Pair()
        fields = [
            (b":status", b"404"),
            (b"content-type", b"text/html; charset=utf-8"),
            (b"x-request-id", b"abc123"),
            (b"set-cookie", b"a=b; HttpOnly"),
            (b"x-long", b"z" * 300),
            (b"x-symbols", bytes(range(0x21, 0x7F))),
            (b"cache-control", b""),
            (b"vary", b"accept-encoding"),
        ]
        for streamID in [1, 3]:
            pair.request(streamID)
            pair.server.sendHeaders(streamID, fields, endStream=True)
            events = pair.toClient()
            self.assertEqual(
                [type(e) for e in events], [h2events.ResponseReceived, h2events.StreamEnded]
            )
            response = events[0]
            assert isinstance(response, h2events.ResponseReceived)
            self.assertEqual(response.headers, fields)
            self.assertIsInstance(response.headers[3], NeverIndexedHeaderTuple)
            self.assertNotIsInstance(response.headers[2], NeverIndexedHeaderTuple)

    def test_largeHeaderBlock(self) -> None:
        """
        A header block larger than L{ServerConnection.maxOutboundFrameSize} goes in a C{HEADERS}
        frame without C{END_HEADERS} and C{CONTINUATION} frames, the last with it; the client
        decodes the whole.
        """
        pair = Pair()
        pair.client.update_settings({SettingCodes.MAX_HEADER_LIST_SIZE: 1_000_000})
        pair.toServer()
        pair.toClient()
        pair.request()
        fields = [(b":status", b"200")] + [
            (b"x-field-%d" % i, b"%x" % (i * 0x9E3779B97F4A7C15)) for i in range(2000)
        ]
        pair.server.sendHeaders(1, fields, endStream=True)
        data = pair.server.dataToSend()
        frames = parseFrames(data)
        self.assertGreater(len(frames), 2)
        self.assertEqual(frames[0][:3], (HEADERS, END_STREAM, 1))
        self.assertEqual(
            [f[:3] for f in frames[1:]],
            [(CONTINUATION, 0, 1)] * (len(frames) - 2) + [(CONTINUATION, END_HEADERS, 1)],
        )
        self.assertEqual([len(f.payload) for f in frames[:-1]], [FRAME] * (len(frames) - 1))
        events = pair.client.receive_data(data)
        self.assertEqual(
            [type(e) for e in events], [h2events.ResponseReceived, h2events.StreamEnded]
        )
        response = events[0]
        assert isinstance(response, h2events.ResponseReceived)
        self.assertEqual(response.headers, fields)

    def test_largeHeaderBlockLargerFrames(self) -> None:
        """
        Once the client raised C{SETTINGS_MAX_FRAME_SIZE}, a header block fits one frame of that
        size.
        """
        pair = Pair()
        pair.client.update_settings(
            {SettingCodes.MAX_FRAME_SIZE: 2**24 - 1, SettingCodes.MAX_HEADER_LIST_SIZE: 10**6}
        )
        pair.toServer()
        pair.toClient()
        pair.request()
        fields = [(b":status", b"200")] + [(b"x-f%d" % i, b"%d" % (i * 7919)) for i in range(3000)]
        pair.server.sendHeaders(1, fields, endStream=True)
        data = pair.server.dataToSend()
        [headersFrame] = parseFrames(data)
        self.assertGreater(len(headersFrame.payload), FRAME)
        [response, _] = pair.client.receive_data(data)
        assert isinstance(response, h2events.ResponseReceived)
        self.assertEqual(response.headers, fields)


#: Well-formed frames that make a conversation go on: requests (whole blocks that decode in any
#: state, or split in two), bodies, resets, window updates, pings, settings.
_goodFrames = st.sampled_from(
    [
        frame(HEADERS, END_HEADERS | END_STREAM, 1, Encoder().encode(GET)),
        frame(HEADERS, END_HEADERS, 3, Encoder().encode(POST)),
        frame(HEADERS, END_HEADERS, 5, Encoder().encode([*POST, (b"content-length", b"3")])),
        frame(HEADERS, END_STREAM, 7, Encoder().encode(GET)[:2]),
        frame(CONTINUATION, END_HEADERS, 7, Encoder().encode(GET)[2:]),
        frame(HEADERS, END_HEADERS | END_STREAM, 3, Encoder().encode([(b"x-trailer", b"1")])),
        frame(DATA, 0, 3, b"abc"),
        frame(DATA, END_STREAM, 3, b""),
        frame(DATA, PADDED, 5, b"\x02ab\x00\x00"),
        frame(DATA, END_STREAM, 5, b"a"),
        frame(DATA, 0, 1, b"x" * FRAME),
        frame(RST_STREAM, 0, 3, u32(ErrorCode.CANCEL)),
        frame(WINDOW_UPDATE, 0, 0, u32(100)),
        frame(WINDOW_UPDATE, 0, 3, u32(2**31 - 1)),
        frame(PING, 0, 0, b"12345678"),
        frame(PRIORITY, 0, 9, u32(3) + b"\x01"),
        frame(SETTINGS, ACK, 0),
        frame(UNKNOWN, 0, 3, b"?"),
    ]
)

#: Frames well-formed at the framing layer, with kinds, flags, streams and payloads that cover the
#: server's checks.
_anyFrames = st.builds(
    frame,
    st.sampled_from([DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY])
    | st.sampled_from([WINDOW_UPDATE, CONTINUATION, PUSH_PROMISE, UNKNOWN]),
    st.sampled_from([0, END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG, 0x25, 0x2D, 0xFF]),
    st.sampled_from([0, 1, 2, 3, 5, 0x80000001, 2**31 - 1]),
    st.binary(max_size=24),
)

#: C{SETTINGS} frames with settings known and unknown, of values in range and out of it.
_settingsFrames = st.builds(
    frame,
    st.just(SETTINGS),
    st.just(0),
    st.just(0),
    st.lists(
        st.builds(
            setting,
            st.integers(0, 8),
            st.sampled_from([0, 1, 2, 100, 16_384, 65_535, 2**24, 2**31 - 1, 2**32 - 1]),
        ),
        max_size=3,
    ).map(b"".join),
)

#: What a client may send: mostly well-formed frames, some odd ones, a few random bytes.
_frames = st.sampled_from(
    [_goodFrames] * 12 + [_anyFrames] * 2 + [_settingsFrames, st.binary(max_size=12)]
).flatmap(lambda strategy: strategy)


class PropertyTests(ServerTestCase):
    """
    Whatever the client sends, the server either reports events or raises L{ProtocolError}.
    """

    def feed(
        self, server: ServerConnection, data: bytes
    ) -> tuple[list[Event], ProtocolError | None, list[Frame]]:
        """
        @return: The events of C{data}, the L{ProtocolError} it raised if any (then the connection
            is checked to ignore further input), and the frames the server queued.
        """
        try:
            events = server.receiveData(data)
        except ProtocolError as e:
            self.assertIsInstance(e.code, ErrorCode)
            sent = parseFrames(server.dataToSend())
            self.assertEqual(sent[-1], goAway(server.lastStreamID, e.code))
            self.assertEqual(server.receiveData(data), [])
            self.assertEqual(server.receiveData(PREFACE + frame(PING, 0, 0, b"12345678")), [])
            self.assertEqual(server.dataToSend(), b"")
            return [], e, sent
        return events, None, parseFrames(server.dataToSend())

    @deterministic
    @given(st.binary(max_size=300))
    def test_randomBytes(self, data: bytes) -> None:
        """
        Random bytes after a valid preface and C{SETTINGS} produce events or raise
        L{ProtocolError}, never another exception; after L{ProtocolError}, input is ignored.
        """
        client = RawClient()
        client.server.receiveData(client.headers(1, POST, END_HEADERS))
        self.feed(client.server, data)

    @deterministic
    @given(st.lists(_frames, max_size=20), st.lists(st.integers(1, 40), max_size=10))
    def test_randomFrames(self, frames: list[bytes], cuts: list[int]) -> None:
        """
        Random frames after a valid preface and C{SETTINGS} produce events or raise
        L{ProtocolError}, never another exception; fed in pieces, they produce the same events (when
        there is no error: an error loses its call's events; connection-wide window events come
        once per call), the same error, and the same frames to send.
        """
        data = b"".join(frames)
        events, error, sent = self.feed(RawClient().server, data)
        server = RawClient().server
        piecesEvents: list[Event] = []
        piecesError = None
        position = 0
        for cut in [*cuts, len(data)]:
            chunk = data[position : position + cut]
            position += cut
            try:
                piecesEvents += server.receiveData(chunk)
            except ProtocolError as e:
                piecesError = e
                break
        self.assertEqual(parseFrames(server.dataToSend()), sent)
        if error is None:
            self.assertIsNone(piecesError)
            # Connection-wide window events are reported once per call.
            whole, pieces = summarize(events), summarize(piecesEvents)
            noted = [e for e in whole if e in ALL_WINDOWS]
            self.assertLessEqual(len(noted), 1)
            self.assertEqual(bool(noted), any(e in ALL_WINDOWS for e in pieces))
            self.assertEqual(
                [e for e in pieces if e not in ALL_WINDOWS],
                [e for e in whole if e not in ALL_WINDOWS],
            )
        else:
            assert piecesError is not None
            self.assertEqual(piecesError.code, error.code)
