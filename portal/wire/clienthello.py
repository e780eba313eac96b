"""
Peek at a TLS ClientHello without decrypting anything.

The relay routes each visitor's connection by the server name it asks for. L{parseClientHello} is a
pure function on the bytes buffered so far: it returns L{None} while a valid ClientHello is still
incomplete, a L{ClientHello} once the whole handshake message has arrived, and raises
L{MalformedClientHello} as soon as the bytes can never become a valid ClientHello. L{alertRecord}
builds the plaintext alert the relay sends when it refuses a connection before any handshake.
"""

from __future__ import annotations

import re

import attrs

MAX_CLIENT_HELLO_BYTES: int = 65536
"""
The most bytes, record headers included, that the records holding a ClientHello may use; a buffer
that grows past this without holding a complete ClientHello is malformed.
"""

UNRECOGNIZED_NAME: int = 112
"""
The C{unrecognized_name} alert description: no service is published under the requested name.
"""

HANDSHAKE_FAILURE: int = 40
"""
The C{handshake_failure} alert description: the relay cannot route this handshake.
"""

INTERNAL_ERROR: int = 80
"""
The C{internal_error} alert description: the relay failed for a reason unrelated to the peer.
"""

_CONTENT_TYPE_HANDSHAKE = 22
_HANDSHAKE_TYPE_CLIENT_HELLO = 1
_RECORD_HEADER_LENGTH = 5
_HANDSHAKE_HEADER_LENGTH = 4
# RFC 8446 section 5.1 bounds plaintext at 2**14; allow the ciphertext expansion RFC 5246 allows so
# that unusual but harmless peers are not refused.
_MAX_RECORD_LENGTH = 2**14 + 2048
_MAX_RECORD_MINOR_VERSION = 4

_EXTENSION_SERVER_NAME = 0
_EXTENSION_ALPN = 16
_EXTENSION_SUPPORTED_VERSIONS = 43
_SERVER_NAME_TYPE_HOST_NAME = 0

_MAX_HOST_NAME_LENGTH = 253
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}\Z")
_HTTP_METHODS = (
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PRI",
)


class MalformedClientHello(ValueError):
    """
    The bytes can never become a valid TLS ClientHello.

    @ivar reason: A short human-readable explanation, suitable for a log line.
    """

    reason: str

    def __init__(self, reason: str) -> None:
        """
        @param reason: A short human-readable explanation of what is wrong.
        """
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class ClientHello:
    """
    What the relay needs to know about a complete TLS ClientHello.

    @ivar serverName: The first C{host_name} of the C{server_name} extension, lowercased and with
        one trailing dot removed; L{None} when the client sent no host name.
    @ivar alpn: The application protocol names offered, in the client's order; C{()} when the
        client sent no ALPN extension. Bytes outside ASCII are backslash-escaped.
    @ivar legacyVersion: The C{legacy_version} (C{client_version}) field, e.g. C{0x0303}.
    @ivar supportedVersions: The versions listed in the C{supported_versions} extension, in order;
        C{()} when it is absent.
    @ivar length: How many bytes of the parsed data the records holding the ClientHello use,
        record headers included.
    """

    serverName: str | None
    alpn: tuple[str, ...]
    legacyVersion: int
    supportedVersions: tuple[int, ...]
    length: int


def alertRecord(description: int, level: int = 2) -> bytes:
    """
    Build a plaintext TLS alert record.

    @param description: The alert description, e.g. L{UNRECOGNIZED_NAME}.
    @param level: The alert level: 1 for warning, 2 (the default) for fatal.
    @return: The five-byte record header followed by the two-byte alert.
    """
    return b"\x15\x03\x03\x00\x02" + bytes([level, description])


def parseClientHello(data: bytes) -> ClientHello | None:
    """
    Parse a TLS ClientHello from the bytes a client has sent so far.

    The handshake message may be fragmented over any number of handshake records; bytes after the
    records holding it (such as early data) are ignored.

    @param data: Everything received from the client so far.
    @return: L{None} when C{data} is a valid prefix that needs more bytes, or the L{ClientHello}
        once the whole message has arrived.
    @raise MalformedClientHello: When no bytes appended to C{data} could make a valid ClientHello.
    """
    message = _reassemble(data)
    if message is None:
        return None
    body, length = message
    return _parseBody(body, length)


def peekHostName(data: bytes) -> bytes | None:
    """
    Find the host name of a ClientHello quickly, checking only what finding it needs: for a
    decision that L{parseClientHello} makes again later (the relay's workers peeking at a visitor
    as it is accepted, L{portal.relay.earlyhandoff}).

    Only the simple case is recognised: a handshake record holding the whole ClientHello, whose
    C{server_name} list starts with a host name. Whenever that finds a name and
    L{parseClientHello} accepts the same bytes, their names agree (property-tested); a hello that
    L{parseClientHello} refuses may still yield one here.

    @param data: The connection's first bytes.
    @return: The host name as sent (see L{normalizeHostName}), or L{None} when not found that way.
    """
    size = len(data)
    if size < 9 or data[0] != _CONTENT_TYPE_HANDSHAKE or data[5] != _HANDSHAKE_TYPE_CLIENT_HELLO:
        return None
    recordEnd = 5 + ((data[3] << 8) | data[4])
    end = 9 + ((data[6] << 16) | (data[7] << 8) | data[8])
    if recordEnd > size or end > recordEnd:
        return None
    # Legacy version and random, then the session id, cipher suites and compression methods.
    at = 9 + 2 + 32
    if at >= end:
        return None
    at += 1 + data[at]
    if at + 2 > end:
        return None
    at += 2 + ((data[at] << 8) | data[at + 1])
    if at >= end:
        return None
    at += 1 + data[at]
    if at + 2 > end:
        return None
    extensionsEnd = at + 2 + ((data[at] << 8) | data[at + 1])
    if extensionsEnd > end:
        return None
    at += 2
    while at + 4 <= extensionsEnd:
        kind = (data[at] << 8) | data[at + 1]
        length = (data[at + 2] << 8) | data[at + 3]
        at += 4
        if at + length > extensionsEnd:
            return None
        if kind == _EXTENSION_SERVER_NAME:
            # server_name_list: its length, then the first entry's type and length.
            if length < 5 or data[at + 2] != _SERVER_NAME_TYPE_HOST_NAME:
                return None
            nameEnd = at + 5 + ((data[at + 3] << 8) | data[at + 4])
            if nameEnd > at + length:
                return None
            return data[at + 5 : nameEnd]
        at += length
    return None


def normalizeHostName(hostName: bytes) -> str | None:
    """
    @param hostName: A host name as a ClientHello sends it.
    @return: The name as L{parseClientHello} returns it (lowercased, one trailing dot removed), or
        L{None} when it refuses it.
    """
    try:
        return _normalizeHostName(hostName)
    except MalformedClientHello:
        return None


def _describeFirstByte(data: bytes) -> str:
    """
    Explain why the first record of a connection is not a handshake record.

    @param data: The connection's first bytes; at least one.
    @return: A reason naming the first byte and, when recognisable, what the client speaks instead.
    """
    first = data[0]
    # An SSLv2 CLIENT-HELLO starts with a two-byte length whose top bit is set, then message type 1.
    if first & 0x80 and data[2:3] in (b"", b"\x01"):
        return f"SSLv2-style ClientHello is not supported (first byte 0x{first:02x})"
    for method in _HTTP_METHODS:
        request = method + b" "
        if request.startswith(data[: len(request)]):
            return f"not a TLS handshake record (first byte 0x{first:02x}; plaintext HTTP?)"
    return f"not a TLS handshake record (first byte 0x{first:02x})"


def _checkRecordHeader(data: bytes, start: int) -> int | None:
    """
    Check the record header at C{start} as far as it has arrived.

    @param data: The buffered bytes.
    @param start: The offset of the record header.
    @return: The record's payload length, or L{None} if the header is incomplete.
    @raise MalformedClientHello: When the header is not that of a handshake record.
    """
    header = data[start : start + _RECORD_HEADER_LENGTH]
    if not header:
        return None
    if header[0] != _CONTENT_TYPE_HANDSHAKE:
        if start == 0:
            raise MalformedClientHello(_describeFirstByte(data))
        raise MalformedClientHello(
            f"record type {header[0]} before the ClientHello was complete (expected handshake)"
        )
    if len(header) >= 2 and header[1] != 3:
        raise MalformedClientHello(f"unsupported record version major byte 0x{header[1]:02x}")
    if len(header) >= 3 and header[2] > _MAX_RECORD_MINOR_VERSION:
        raise MalformedClientHello(f"unsupported record version 0x03{header[2]:02x}")
    if len(header) < _RECORD_HEADER_LENGTH:
        return None
    recordLength = int.from_bytes(header[3:5], "big")
    if recordLength == 0:
        raise MalformedClientHello("empty handshake record")
    if recordLength > _MAX_RECORD_LENGTH:
        raise MalformedClientHello(f"record length {recordLength} exceeds {_MAX_RECORD_LENGTH}")
    return recordLength


def _checkHandshakeHeader(header: bytes) -> int | None:
    """
    Check the handshake message header as far as it has arrived.

    @param header: The first (up to four) bytes of the handshake message.
    @return: The handshake message length including its header, or L{None} if incomplete.
    @raise MalformedClientHello: When the message is not a ClientHello of acceptable size.
    """
    if not header:
        return None
    if header[0] != _HANDSHAKE_TYPE_CLIENT_HELLO:
        raise MalformedClientHello(f"handshake type {header[0]} is not client_hello")
    if len(header) < _HANDSHAKE_HEADER_LENGTH:
        return None
    bodyLength = int.from_bytes(header[1:4], "big")
    total = _HANDSHAKE_HEADER_LENGTH + bodyLength
    # The message needs at least one record header around it.
    if total + _RECORD_HEADER_LENGTH > MAX_CLIENT_HELLO_BYTES:
        raise MalformedClientHello(
            f"ClientHello length {bodyLength} cannot fit in {MAX_CLIENT_HELLO_BYTES} bytes of records"
        )
    return total


def _reassemble(data: bytes) -> tuple[bytes, int] | None:
    """
    Collect the ClientHello handshake message from the handshake records at the start of C{data}.

    @param data: The buffered bytes.
    @return: L{None} when more bytes are needed, else the ClientHello body (without its handshake
        header) and the number of bytes its records use.
    @raise MalformedClientHello: When the records or the handshake header are invalid, or the
        records would exceed L{MAX_CLIENT_HELLO_BYTES}.
    """
    fragments: list[bytes] = []
    collected = 0
    head = b""
    messageLength: int | None = None
    start = 0
    while True:
        recordLength = _checkRecordHeader(data, start)
        if recordLength is None:
            break
        payloadStart = start + _RECORD_HEADER_LENGTH
        end = payloadStart + recordLength
        if end > MAX_CLIENT_HELLO_BYTES:
            raise MalformedClientHello(f"ClientHello exceeds {MAX_CLIENT_HELLO_BYTES} bytes")
        payload = data[payloadStart:end]
        if messageLength is None:
            head += payload[: _HANDSHAKE_HEADER_LENGTH - len(head)]
            messageLength = _checkHandshakeHeader(head)
        if messageLength is not None and collected + recordLength > messageLength:
            raise MalformedClientHello(
                f"{collected + recordLength - messageLength} unexpected bytes after the "
                "ClientHello in its last record"
            )
        fragments.append(payload)
        collected += len(payload)
        if len(payload) < recordLength:
            break
        start = end
        if collected == messageLength:
            message = b"".join(fragments)
            return message[_HANDSHAKE_HEADER_LENGTH:], end
    if len(data) > MAX_CLIENT_HELLO_BYTES:
        raise MalformedClientHello(f"ClientHello exceeds {MAX_CLIENT_HELLO_BYTES} bytes")
    return None


class _Reader:
    """
    Read TLS presentation-language fields from a byte string, strictly.

    @ivar _data: The bytes being read.
    @ivar _offset: The offset of the next unread byte.
    """

    def __init__(self, data: bytes) -> None:
        """
        @param data: The bytes to read.
        """
        self._data = data
        self._offset = 0

    def remaining(self) -> int:
        """
        @return: The number of unread bytes.
        """
        return len(self._data) - self._offset

    def read(self, count: int, what: str) -> bytes:
        """
        Read exactly C{count} bytes.

        @param count: How many bytes to read.
        @param what: The field's name, for the error message.
        @return: The bytes read.
        @raise MalformedClientHello: When fewer than C{count} bytes remain.
        """
        start = self._offset
        end = start + count
        if end > len(self._data):
            raise MalformedClientHello(f"truncated {what}")
        self._offset = end
        return self._data[start:end]

    def integer(self, size: int, what: str) -> int:
        """
        Read a big-endian unsigned integer.

        @param size: Its width in bytes.
        @param what: The field's name, for the error message.
        @return: The integer.
        @raise MalformedClientHello: When fewer than C{size} bytes remain.
        """
        return int.from_bytes(self.read(size, what), "big")

    def vector(self, lengthSize: int, what: str, minimum: int = 0, maximum: int = 2**24) -> bytes:
        """
        Read a variable-length vector: a length prefix followed by that many bytes.

        @param lengthSize: The width of the length prefix in bytes.
        @param what: The field's name, for the error message.
        @param minimum: The smallest acceptable length.
        @param maximum: The largest acceptable length.
        @return: The vector's contents.
        @raise MalformedClientHello: When the vector is truncated or its length is out of bounds.
        """
        # The reads of L{read} and L{integer} inline, error messages made only on error: a
        # ClientHello holds some twenty vectors, and every visitor's is parsed.
        data = self._data
        start = self._offset + lengthSize
        if start > len(data):
            raise MalformedClientHello(f"truncated {what} length")
        length = int.from_bytes(data[self._offset : start], "big")
        if not minimum <= length <= maximum:
            raise MalformedClientHello(f"{what} length {length} not in {minimum}..{maximum}")
        end = start + length
        if end > len(data):
            raise MalformedClientHello(f"truncated {what}")
        self._offset = end
        return data[start:end]

    def expectEnd(self, what: str) -> None:
        """
        Insist that every byte has been read.

        @param what: The structure's name, for the error message.
        @raise MalformedClientHello: When unread bytes remain.
        """
        if self.remaining():
            raise MalformedClientHello(f"{self.remaining()} unexpected bytes after {what}")


def _parseBody(body: bytes, length: int) -> ClientHello:
    """
    Parse the body of a complete ClientHello handshake message.

    @param body: The message without its four-byte handshake header.
    @param length: The number of bytes the message's records used.
    @return: The parsed hello.
    @raise MalformedClientHello: When any field is invalid.
    """
    reader = _Reader(body)
    legacyVersion = reader.integer(2, "legacy_version")
    if legacyVersion >> 8 != 3:
        raise MalformedClientHello(f"unsupported legacy_version 0x{legacyVersion:04x}")
    reader.read(32, "random")
    reader.vector(1, "legacy_session_id", maximum=32)
    cipherSuites = reader.vector(2, "cipher_suites", minimum=2, maximum=2**16 - 2)
    if len(cipherSuites) % 2:
        raise MalformedClientHello(f"odd cipher_suites length {len(cipherSuites)}")
    reader.vector(1, "legacy_compression_methods", minimum=1)
    extensions: dict[int, bytes] = {}
    if reader.remaining():
        data = reader.vector(2, "extensions")
        reader.expectEnd("extensions")
        # What _Reader would do for each extension (type, then a vector with a 2-byte length),
        # inline: a ClientHello holds a dozen or more, and every visitor's is parsed.
        offset, end = 0, len(data)
        while offset < end:
            if offset + 2 > end:
                raise MalformedClientHello("truncated extension type")
            extensionType = data[offset] << 8 | data[offset + 1]
            if offset + 4 > end:
                raise MalformedClientHello(f"truncated extension {extensionType} length")
            start = offset + 4
            offset = start + (data[offset + 2] << 8 | data[offset + 3])
            if offset > end:
                raise MalformedClientHello(f"truncated extension {extensionType}")
            if extensionType in extensions:
                raise MalformedClientHello(f"duplicate extension {extensionType}")
            extensions[extensionType] = data[start:offset]
    serverName = None
    alpn: tuple[str, ...] = ()
    supportedVersions: tuple[int, ...] = ()
    if _EXTENSION_SERVER_NAME in extensions:
        serverName = _parseServerName(extensions[_EXTENSION_SERVER_NAME])
    if _EXTENSION_ALPN in extensions:
        alpn = _parseALPN(extensions[_EXTENSION_ALPN])
    if _EXTENSION_SUPPORTED_VERSIONS in extensions:
        supportedVersions = _parseSupportedVersions(extensions[_EXTENSION_SUPPORTED_VERSIONS])
    return ClientHello(
        serverName=serverName,
        alpn=alpn,
        legacyVersion=legacyVersion,
        supportedVersions=supportedVersions,
        length=length,
    )


def _parseServerName(extensionData: bytes) -> str | None:
    """
    Parse the C{server_name} extension (RFC 6066 section 3).

    @param extensionData: The extension's contents.
    @return: The first host name, normalized by L{_normalizeHostName}, or L{None} if the list
        holds no host name.
    @raise MalformedClientHello: When the list is malformed or the host name is invalid.
    """
    outer = _Reader(extensionData)
    names = _Reader(outer.vector(2, "server_name_list", minimum=1, maximum=2**16 - 1))
    outer.expectEnd("server_name_list")
    hostName: bytes | None = None
    while names.remaining():
        nameType = names.integer(1, "server name type")
        name = names.vector(2, "server name", maximum=2**16 - 1)
        if nameType == _SERVER_NAME_TYPE_HOST_NAME and hostName is None:
            hostName = name
    if hostName is None:
        return None
    return _normalizeHostName(hostName)


def _normalizeHostName(hostName: bytes) -> str:
    """
    Validate a SNI host name and put it in canonical form.

    @param hostName: The host name as sent.
    @return: The name lowercased, with one trailing dot removed.
    @raise MalformedClientHello: When the name is empty, too long, not ASCII, or has a label that
        is empty, longer than 63 characters, or holds characters other than letters, digits,
        C{-} and C{_}.
    """
    if hostName.endswith(b"."):
        hostName = hostName[:-1]
    if not hostName:
        raise MalformedClientHello("invalid server name (empty)")
    if len(hostName) > _MAX_HOST_NAME_LENGTH:
        raise MalformedClientHello(f"invalid server name (length {len(hostName)})")
    try:
        text = hostName.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedClientHello(f"invalid server name {hostName!r} (not ASCII)")
    for label in text.split("."):
        if not _LABEL.match(label):
            raise MalformedClientHello(f"invalid server name {text!r} (bad label {label!r})")
    return text.lower()


def _parseALPN(extensionData: bytes) -> tuple[str, ...]:
    """
    Parse the C{application_layer_protocol_negotiation} extension (RFC 7301 section 3.1).

    @param extensionData: The extension's contents.
    @return: The protocol names in order, decoded as ASCII with other bytes backslash-escaped (so a
        GREASE value cannot make the hello malformed).
    @raise MalformedClientHello: When the list is empty or holds an empty name.
    """
    outer = _Reader(extensionData)
    names = _Reader(outer.vector(2, "protocol_name_list", minimum=2, maximum=2**16 - 1))
    outer.expectEnd("protocol_name_list")
    protocols = []
    while names.remaining():
        name = names.vector(1, "protocol name", minimum=1)
        protocols.append(name.decode("ascii", "backslashreplace"))
    return tuple(protocols)


def _parseSupportedVersions(extensionData: bytes) -> tuple[int, ...]:
    """
    Parse a ClientHello's C{supported_versions} extension (RFC 8446 section 4.2.1).

    @param extensionData: The extension's contents.
    @return: The versions in the client's order.
    @raise MalformedClientHello: When the list is empty, of odd length, or overruns the extension.
    """
    reader = _Reader(extensionData)
    versions = reader.vector(1, "supported_versions", minimum=2, maximum=254)
    reader.expectEnd("supported_versions")
    if len(versions) % 2:
        raise MalformedClientHello(f"odd supported_versions length {len(versions)}")
    return tuple(int.from_bytes(versions[i : i + 2], "big") for i in range(0, len(versions), 2))
