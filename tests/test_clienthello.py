"""
Tests for L{portal.wire.clienthello}.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from portal.wire.clienthello import (
    HANDSHAKE_FAILURE,
    INTERNAL_ERROR,
    MAX_CLIENT_HELLO_BYTES,
    UNRECOGNIZED_NAME,
    ClientHello,
    MalformedClientHello,
    alertRecord,
    normalizeHostName,
    parseClientHello,
    peekHostName,
)

_HOST = "Foo.Example.localhost."
_EXPECTED_HOST = "foo.example.localhost"


def _u8(value: int) -> bytes:
    """
    @param value: An integer in 0..255.
    @return: It as one byte.
    """
    return value.to_bytes(1, "big")


def _u16(value: int) -> bytes:
    """
    @param value: An integer in 0..65535.
    @return: It as two big-endian bytes.
    """
    return value.to_bytes(2, "big")


def _vector8(data: bytes) -> bytes:
    """
    @param data: A vector's contents.
    @return: C{data} with a one-byte length prefix.
    """
    return _u8(len(data)) + data


def _vector16(data: bytes) -> bytes:
    """
    @param data: A vector's contents.
    @return: C{data} with a two-byte length prefix.
    """
    return _u16(len(data)) + data


def _extension(extensionType: int, data: bytes) -> bytes:
    """
    @param extensionType: The extension's type.
    @param data: The extension's contents.
    @return: The encoded extension.
    """
    return _u16(extensionType) + _vector16(data)


def _serverNameExtension(*names: bytes, nameType: int = 0) -> bytes:
    """
    @param names: Host names to list.
    @param nameType: The name type to give each of them.
    @return: An encoded C{server_name} extension.
    """
    entries = b"".join(_u8(nameType) + _vector16(name) for name in names)
    return _extension(0, _vector16(entries))


def _alpnExtension(*protocols: bytes) -> bytes:
    """
    @param protocols: Protocol names to offer.
    @return: An encoded ALPN extension.
    """
    return _extension(16, _vector16(b"".join(_vector8(p) for p in protocols)))


def _supportedVersionsExtension(*versions: int) -> bytes:
    """
    @param versions: Versions to list.
    @return: An encoded ClientHello C{supported_versions} extension.
    """
    return _extension(43, _vector8(b"".join(_u16(v) for v in versions)))


def _clientHelloBody(
    extensions: Sequence[bytes] | None = (),
    legacyVersion: int = 0x0303,
    sessionID: bytes = b"\x01" * 32,
    cipherSuites: bytes = b"\x13\x01\x13\x02\xc0\x2b",
    compressionMethods: bytes = b"\x00",
) -> bytes:
    """
    Encode a ClientHello body from its parts.

    @param extensions: Encoded extensions, or L{None} to leave out the extensions block entirely.
    @param legacyVersion: The C{legacy_version} field.
    @param sessionID: The C{legacy_session_id}.
    @param cipherSuites: The C{cipher_suites} vector's contents.
    @param compressionMethods: The C{legacy_compression_methods} vector's contents.
    @return: The body, without the handshake header.
    """
    body = (
        _u16(legacyVersion)
        + bytes(range(32))
        + _vector8(sessionID)
        + _vector16(cipherSuites)
        + _vector8(compressionMethods)
    )
    if extensions is not None:
        body += _vector16(b"".join(extensions))
    return body


def _handshake(body: bytes, handshakeType: int = 1) -> bytes:
    """
    @param body: A handshake message body.
    @param handshakeType: The message type.
    @return: The message with its four-byte header.
    """
    return _u8(handshakeType) + len(body).to_bytes(3, "big") + body


def _records(
    message: bytes,
    fragmentSize: int = 2**14,
    contentType: int = 22,
    version: int = 0x0301,
) -> bytes:
    """
    Fragment a message into records of at most C{fragmentSize} bytes each.

    @param message: The bytes to fragment.
    @param fragmentSize: The largest fragment.
    @param contentType: The records' content type.
    @param version: The records' C{legacy_record_version}.
    @return: The records.
    """
    return _recordsAt(message, range(0, len(message), fragmentSize), contentType, version)


def _recordsAt(
    message: bytes,
    cuts: Iterable[int],
    contentType: int = 22,
    version: int = 0x0301,
) -> bytes:
    """
    Fragment a message into records starting at the given offsets.

    @param message: The bytes to fragment.
    @param cuts: The offsets where a fragment starts; 0 is implied.
    @param contentType: The records' content type.
    @param version: The records' C{legacy_record_version}.
    @return: The records.
    """
    starts = sorted({0, *cuts})
    ends = [*starts[1:], len(message)]
    return b"".join(
        _u8(contentType) + _u16(version) + _vector16(message[start:end])
        for start, end in zip(starts, ends, strict=True)
    )


def _handshakeMessage(records: bytes) -> bytes:
    """
    Join the payloads of consecutive handshake records, as a test oracle.

    @param records: Complete TLS records.
    @return: Their payloads, concatenated.
    """
    payloads = []
    offset = 0
    while offset < len(records):
        length = int.from_bytes(records[offset + 3 : offset + 5], "big")
        payloads.append(records[offset + 5 : offset + 5 + length])
        offset += 5 + length
    return b"".join(payloads)


def _stdlibHello(
    maximumVersion: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    serverHostname: str | None = _HOST,
) -> bytes:
    """
    Have the standard library's C{ssl} module write a ClientHello offering ALPN C{h2} and
    C{http/1.1}.

    @param maximumVersion: The highest TLS version to offer.
    @param serverHostname: The name to send in SNI, or L{None} for none.
    @return: The bytes the client wrote.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximumVersion
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=serverHostname)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _pyOpenSSLHello() -> bytes:
    """
    Have pyOpenSSL write a ClientHello for C{Foo.Example.localhost.} offering ALPN C{h2} and
    C{http/1.1}.

    @return: The bytes the client wrote.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_alpn_protos([b"h2", b"http/1.1"])
    connection = SSL.Connection(context, None)
    connection.set_tlsext_host_name(_HOST.encode("ascii"))
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(2**17)


def _curlShapedHello() -> bytes:
    """
    Build a hello shaped like a curl/Chrome one: GREASE values, many extensions, and a large
    padding extension.

    @return: The ClientHello in a single record.
    """
    extensions = [
        _extension(0x0A0A, b""),
        _serverNameExtension(b"Curl.Example.COM"),
        _extension(23, b""),
        _extension(65281, b"\x00"),
        _extension(10, _vector16(b"\x2a\x2a\x00\x1d\x00\x17\x00\x18")),
        _extension(11, _vector8(b"\x00")),
        _extension(35, b""),
        _alpnExtension(b"h2", b"http/1.1"),
        _extension(5, b"\x01\x00\x00\x00\x00"),
        _extension(13, _vector16(b"\x04\x03\x08\x04\x04\x01\x05\x03")),
        _extension(18, b""),
        _extension(51, _vector16(b"\x2a\x2a\x00\x01\x00" + b"\x00\x1d" + _vector16(b"k" * 32))),
        _extension(45, _vector8(b"\x01")),
        _supportedVersionsExtension(0x7A7A, 0x0304, 0x0303),
        _extension(27, _vector8(b"\x00\x02")),
        _extension(0x1A1A, b"\x00"),
        _extension(21, b"\x00" * 1500),
    ]
    cipherSuites = b"\x7a\x7a\x13\x01\x13\x02\x13\x03\xc0\x2b\xc0\x2f\xc0\x2c\xc0\x30"
    return _records(_handshake(_clientHelloBody(extensions, cipherSuites=cipherSuites)))


def _noSNIHello() -> bytes:
    """
    Build a hello with ALPN and supported versions but no C{server_name} extension.

    @return: The ClientHello in a single record.
    """
    extensions = [_alpnExtension(b"acme-tls/1"), _supportedVersionsExtension(0x0304)]
    return _records(_handshake(_clientHelloBody(extensions)))


def _realHellos() -> list[tuple[str, bytes, ClientHello]]:
    """
    @return: Named hellos from real TLS stacks and hand-built ones, each with the result expected
        from parsing it.
    """
    bothProtocols = ("h2", "http/1.1")
    stdlib13 = _stdlibHello()
    stdlib12 = _stdlibHello(maximumVersion=ssl.TLSVersion.TLSv1_2)
    stdlibNoSNI = _stdlibHello(serverHostname=None)
    pyOpenSSL = _pyOpenSSLHello()
    curl = _curlShapedHello()
    noSNI = _noSNIHello()
    return [
        (
            "stdlib TLS 1.3",
            stdlib13,
            ClientHello(_EXPECTED_HOST, bothProtocols, 0x0303, (0x0304, 0x0303), len(stdlib13)),
        ),
        (
            "stdlib TLS 1.2",
            stdlib12,
            ClientHello(_EXPECTED_HOST, bothProtocols, 0x0303, (), len(stdlib12)),
        ),
        (
            "stdlib without SNI",
            stdlibNoSNI,
            ClientHello(None, bothProtocols, 0x0303, (0x0304, 0x0303), len(stdlibNoSNI)),
        ),
        (
            "pyOpenSSL",
            pyOpenSSL,
            ClientHello(_EXPECTED_HOST, bothProtocols, 0x0303, (0x0304, 0x0303), len(pyOpenSSL)),
        ),
        (
            "curl-shaped",
            curl,
            ClientHello(
                "curl.example.com", bothProtocols, 0x0303, (0x7A7A, 0x0304, 0x0303), len(curl)
            ),
        ),
        ("no SNI", noSNI, ClientHello(None, ("acme-tls/1",), 0x0303, (0x0304,), len(noSNI))),
    ]


class AlertRecordTests(SynchronousTestCase):
    """
    Tests for L{alertRecord} and the alert description constants.
    """

    def test_fatalByDefault(self) -> None:
        """
        Without a level, L{alertRecord} builds a fatal alert record.
        """
        self.assertEqual(alertRecord(UNRECOGNIZED_NAME), b"\x15\x03\x03\x00\x02\x02\x70")

    def test_warning(self) -> None:
        """
        The level is the first byte of the alert.
        """
        self.assertEqual(alertRecord(INTERNAL_ERROR, level=1), b"\x15\x03\x03\x00\x02\x01\x50")

    def test_descriptions(self) -> None:
        """
        The constants have the values RFC 8446 section 6 assigns.
        """
        self.assertEqual((UNRECOGNIZED_NAME, HANDSHAKE_FAILURE, INTERNAL_ERROR), (112, 40, 80))


class MalformedClientHelloTests(SynchronousTestCase):
    """
    Tests for L{MalformedClientHello}.
    """

    def test_reason(self) -> None:
        """
        The reason is kept as an attribute and is the exception's string form.
        """
        error = MalformedClientHello("no good")
        self.assertEqual(error.reason, "no good")
        self.assertEqual(str(error), "no good")
        self.assertIsInstance(error, ValueError)


class RealClientHelloTests(SynchronousTestCase):
    """
    L{parseClientHello} on hellos written by real TLS stacks and on hand-built realistic ones.
    """

    def test_complete(self) -> None:
        """
        Each complete hello parses to the expected server name, protocols and versions.
        """
        for name, data, expected in _realHellos():
            with self.subTest(name):
                self.assertEqual(parseClientHello(data), expected)

    def test_everyPrefix(self) -> None:
        """
        Every proper prefix of each hello, split at any TCP read boundary, needs more bytes.
        """
        for name, data, _ in _realHellos():
            with self.subTest(name):
                for end in range(len(data)):
                    self.assertIsNone(parseClientHello(data[:end]), end)

    def test_trailingData(self) -> None:
        """
        Bytes after the hello's records are ignored, and C{length} tells where the hello ends.
        """
        for name, data, expected in _realHellos():
            with self.subTest(name):
                trailing = _records(b"early data" * 10, contentType=23, version=0x0303)
                self.assertEqual(parseClientHello(data + trailing), expected)

    def test_refragmented(self) -> None:
        """
        Each hello's handshake message, re-fragmented into records of 1, 7 or 100 bytes, parses to
        the same result, and every prefix of the re-fragmented records needs more bytes.
        """
        for name, data, expected in _realHellos():
            message = _handshakeMessage(data)
            for size in (1, 7, 100):
                with self.subTest(name, fragmentSize=size):
                    records = _records(message, size)
                    self.assertEqual(
                        parseClientHello(records), attrs.evolve(expected, length=len(records))
                    )
                    step = 1 if size > 1 else 13
                    for end in range(0, len(records), step):
                        self.assertIsNone(parseClientHello(records[:end]), end)

    def test_recordVersions(self) -> None:
        """
        Record versions 0x0300 through 0x0304 are all accepted.
        """
        message = _handshakeMessage(_curlShapedHello())
        for version in range(0x0300, 0x0305):
            with self.subTest(version=hex(version)):
                hello = parseClientHello(_records(message, 300, version=version))
                self.assertIsNotNone(hello)


class ParseClientHelloTests(SynchronousTestCase):
    """
    L{parseClientHello} on hand-built hellos exercising individual fields.
    """

    def parse(self, extensions: Sequence[bytes] | None = (), **kwargs: Any) -> ClientHello:
        """
        Build a single-record hello from parts and parse it, insisting it is complete.

        @param extensions: Passed to L{_clientHelloBody}.
        @param kwargs: Passed to L{_clientHelloBody}.
        @return: The parsed hello.
        """
        data = _records(_handshake(_clientHelloBody(extensions, **kwargs)))
        hello = parseClientHello(data)
        assert hello is not None
        return hello

    def test_minimal(self) -> None:
        """
        A hello with no extensions block at all is valid and has no name, protocols or versions.
        """
        data = _records(_handshake(_clientHelloBody(None, sessionID=b"")))
        self.assertEqual(parseClientHello(data), ClientHello(None, (), 0x0303, (), len(data)))

    def test_emptyExtensions(self) -> None:
        """
        An empty extensions block is valid.
        """
        self.assertEqual(self.parse([]).serverName, None)

    def test_legacyVersion(self) -> None:
        """
        C{legacyVersion} is the hello's C{legacy_version} field.
        """
        self.assertEqual(self.parse(legacyVersion=0x0301).legacyVersion, 0x0301)

    def test_normalizedName(self) -> None:
        """
        The server name is lowercased and loses one trailing dot.
        """
        self.assertEqual(
            self.parse([_serverNameExtension(b"WWW.Ex_ample-1.ORG.")]).serverName,
            "www.ex_ample-1.org",
        )

    def test_firstHostName(self) -> None:
        """
        Entries of other name types are skipped, and the first host name is taken.
        """
        names = b"\x07" + _vector16(b"other") + b"\x00" + _vector16(b"first.example")
        names += b"\x00" + _vector16(b"second.example")
        hello = self.parse([_extension(0, _vector16(names))])
        self.assertEqual(hello.serverName, "first.example")

    def test_noHostName(self) -> None:
        """
        A C{server_name} list without a host name entry means there is no server name.
        """
        self.assertIsNone(self.parse([_serverNameExtension(b"x", nameType=9)]).serverName)

    def test_longestName(self) -> None:
        """
        A 253-byte name made of 63-byte labels is accepted, with or without a trailing dot.
        """
        name = b".".join([b"a" * 63] * 3 + [b"b" * 61])
        self.assertEqual(len(name), 253)
        for sent in (name, name + b"."):
            with self.subTest(sent=sent):
                hello = self.parse([_serverNameExtension(sent)])
                self.assertEqual(hello.serverName, name.decode("ascii"))

    def test_grease(self) -> None:
        """
        Non-ASCII ALPN values such as GREASE do not make the hello malformed; their bytes are
        escaped.
        """
        hello = self.parse([_alpnExtension(b"\xfa\xfa", b"h2")])
        self.assertEqual(hello.alpn, ("\\xfa\\xfa", "h2"))

    def test_unusedFieldsIgnored(self) -> None:
        """
        Unknown extensions and the random, cipher suite and compression contents do not matter.
        """
        hello = self.parse(
            [_extension(0xFFFF, b"\xff" * 100), _alpnExtension(b"x")],
            cipherSuites=b"\xff" * 200,
            compressionMethods=b"\x01\x00",
        )
        self.assertEqual(hello.alpn, ("x",))


class MalformedTests(SynchronousTestCase):
    """
    L{parseClientHello} raises L{MalformedClientHello} with a reason for bytes that can never
    become a valid ClientHello.
    """

    def assertMalformed(self, data: bytes, reasonContains: str = "") -> MalformedClientHello:
        """
        Assert that C{data} is malformed, with a non-empty reason.

        @param data: Bytes to parse.
        @param reasonContains: Text the reason must contain.
        @return: The exception.
        """
        error: MalformedClientHello = self.assertRaises(
            MalformedClientHello, parseClientHello, data
        )
        self.assertTrue(error.reason)
        self.assertEqual(str(error), error.reason)
        self.assertIn(reasonContains, error.reason)
        return error

    def assertBodyMalformed(self, body: bytes, reasonContains: str = "") -> None:
        """
        Assert that a hello with the given body is malformed, with and without fragmentation.

        @param body: A ClientHello body.
        @param reasonContains: Text the reason must contain.
        """
        message = _handshake(body)
        self.assertMalformed(_records(message), reasonContains)
        self.assertMalformed(_records(message, 5), reasonContains)

    def test_wrongContentType(self) -> None:
        """
        A first record that is not a handshake record is malformed, as soon as its first byte
        arrives.
        """
        data = _records(_handshake(_clientHelloBody()), contentType=23)
        self.assertMalformed(data[:1], "first byte 0x17")

    def test_laterContentType(self) -> None:
        """
        A non-handshake record before the hello is complete is malformed.
        """
        message = _handshake(_clientHelloBody())
        data = _records(message[:10]) + _records(b"\x01", contentType=20) + _records(message[10:])
        self.assertMalformed(data, "record type 20")

    def test_http(self) -> None:
        """
        A plain HTTP request is malformed, and the reason says it looks like HTTP.
        """
        error = self.assertMalformed(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "HTTP")
        self.assertIn("0x47", error.reason)
        self.assertMalformed(b"G", "0x47")

    def test_sslv2(self) -> None:
        """
        An SSLv2-style hello is malformed, and the reason says so; other bytes with the top bit set
        are not blamed on SSLv2 once the message type byte shows otherwise.
        """
        sslv2 = b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x07\x00\xc0" * 7 + b"x" * 16
        self.assertMalformed(sslv2, "SSLv2")
        self.assertMalformed(sslv2[:1], "SSLv2")
        error = self.assertMalformed(b"\xff\xff\xff", "first byte 0xff")
        self.assertNotIn("SSLv2", error.reason)

    def test_recordVersion(self) -> None:
        """
        A record version whose major byte is not 3 or whose minor byte is above 4 is malformed.
        """
        self.assertMalformed(b"\x16\x02", "version")
        self.assertMalformed(b"\x16\x03\x05", "version")

    def test_recordTooLong(self) -> None:
        """
        A record longer than 2**14 + 2048 bytes is malformed, as soon as its header arrives.
        """
        self.assertMalformed(b"\x16\x03\x01" + _u16(2**14 + 2049), "record length")

    def test_zeroLengthRecord(self) -> None:
        """
        An empty handshake record is malformed, whether first or later.
        """
        self.assertMalformed(b"\x16\x03\x01\x00\x00", "empty")
        message = _handshake(_clientHelloBody())
        self.assertMalformed(_records(message[:3]) + b"\x16\x03\x01\x00\x00", "empty")

    def test_handshakeType(self) -> None:
        """
        A handshake message other than client_hello is malformed, as soon as its type arrives.
        """
        data = _records(_handshake(_clientHelloBody(), handshakeType=2))
        self.assertMalformed(data[:6], "handshake type 2")

    def test_handshakeTooLong(self) -> None:
        """
        A handshake message whose length would take its records past the buffer bound is
        malformed, as soon as its header arrives.
        """
        header = b"\x01" + (MAX_CLIENT_HELLO_BYTES - 8).to_bytes(3, "big")
        self.assertMalformed(_records(header + b"\x03\x03"), str(MAX_CLIENT_HELLO_BYTES))

    def test_overSizeBuffer(self) -> None:
        """
        A hello of acceptable message length whose records grow past L{MAX_CLIENT_HELLO_BYTES}
        is malformed.
        """
        body = _clientHelloBody([_extension(21, b"\x00" * 40000)])
        data = _records(_handshake(body), 4)
        self.assertGreater(len(data), MAX_CLIENT_HELLO_BYTES)
        self.assertMalformed(data[: MAX_CLIENT_HELLO_BYTES + 1], str(MAX_CLIENT_HELLO_BYTES))
        self.assertMalformed(data, str(MAX_CLIENT_HELLO_BYTES))

    def test_trailingHandshakeBytes(self) -> None:
        """
        Extra bytes after the hello in the record that completes it are malformed.
        """
        data = _records(_handshake(_clientHelloBody()) + b"\x00")
        self.assertMalformed(data, "unexpected bytes")

    def test_extensionOverrun(self) -> None:
        """
        An extension whose length overruns the extensions block is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody([b"\x00\x17\x00\x05\x00"]), "truncated")

    def test_extensionsBlockMismatch(self) -> None:
        """
        An extensions block that does not end exactly at the end of the message is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody([]) + b"\x00", "unexpected bytes")
        self.assertBodyMalformed(_clientHelloBody([_extension(23, b"")])[:-1], "truncated")

    def test_duplicateExtension(self) -> None:
        """
        An extension type sent twice is malformed.
        """
        extensions = [_extension(23, b""), _alpnExtension(b"h2"), _extension(23, b"")]
        self.assertBodyMalformed(_clientHelloBody(extensions), "duplicate extension 23")

    def test_sessionIDTooLong(self) -> None:
        """
        A session ID longer than 32 bytes is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody(sessionID=b"s" * 33), "legacy_session_id")

    def test_oddCipherSuites(self) -> None:
        """
        A cipher suite list of odd length is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody(cipherSuites=b"\x13\x01\x13"), "cipher_suites")

    def test_noCipherSuites(self) -> None:
        """
        An empty cipher suite list is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody(cipherSuites=b""), "cipher_suites")

    def test_noCompressionMethods(self) -> None:
        """
        An empty compression method list is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody(compressionMethods=b""), "compression")

    def test_legacyVersion(self) -> None:
        """
        A C{legacy_version} whose major byte is not 3 is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody(legacyVersion=0x0200), "legacy_version")

    def test_truncatedBody(self) -> None:
        """
        A message too short to hold the fixed fields is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody()[:20], "random")

    def test_emptyServerName(self) -> None:
        """
        An empty host name, or one that is just a dot, is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody([_serverNameExtension(b"")]), "server name")
        self.assertBodyMalformed(_clientHelloBody([_serverNameExtension(b".")]), "server name")

    def test_emptyServerNameList(self) -> None:
        """
        A C{server_name} extension with no content or an empty list is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody([_extension(0, b"")]), "server_name_list")
        self.assertBodyMalformed(_clientHelloBody([_extension(0, b"\x00\x00")]), "server_name")

    def test_badHostNames(self) -> None:
        """
        Host names with characters outside letters, digits, C{-} and C{_}, with empty or over-long
        labels, longer than 253 bytes, or not ASCII are malformed.
        """
        for name in [
            b"exa mple.com",
            b"example.com/",
            b"a..b",
            b".example.com",
            b"example.com..",
            b"a" * 64 + b".com",
            b".".join([b"a" * 63] * 4),
            b"caf\xc3\xa9.example",
            b"nul\x00.example",
        ]:
            with self.subTest(name=name):
                body = _clientHelloBody([_serverNameExtension(name)])
                self.assertBodyMalformed(body, "invalid server name")

    def test_badALPN(self) -> None:
        """
        An empty ALPN list or an empty protocol name is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody([_alpnExtension()]), "protocol_name_list")
        self.assertBodyMalformed(_clientHelloBody([_alpnExtension(b"h2", b"")]), "protocol name")

    def test_badSupportedVersions(self) -> None:
        """
        An empty or odd-length supported versions list is malformed.
        """
        self.assertBodyMalformed(_clientHelloBody([_extension(43, b"\x00")]), "supported_versions")
        oddList = _extension(43, b"\x03\x03\x04\x03")
        self.assertBodyMalformed(_clientHelloBody([oddList]), "supported_versions")


_LABEL_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


@attrs.frozen
class _Components:
    """
    The parts of a generated ClientHello and what parsing it must return.

    @ivar data: The encoded records, followed by unrelated trailing bytes.
    @ivar expected: What L{parseClientHello} must return for C{data}.
    """

    data: bytes
    expected: ClientHello


@st.composite
def _hostNames(draw: st.DrawFn) -> str:
    """
    Generate valid host names of mixed case.

    @param draw: Hypothesis's draw function.
    @return: A host name of at most 253 characters, without a trailing dot.
    """
    labels = draw(
        st.lists(st.text(_LABEL_CHARACTERS, min_size=1, max_size=63), min_size=1, max_size=6)
    )
    name = ".".join(labels)
    while len(name) > 253:
        labels.pop()
        name = ".".join(labels)
    return name


@st.composite
def _validHellos(draw: st.DrawFn) -> _Components:
    """
    Generate a valid ClientHello from random components, fragmented into random records and
    followed by random non-handshake bytes.

    @param draw: Hypothesis's draw function.
    @return: The hello and the expected parse.
    """
    hostName = draw(st.none() | _hostNames())
    trailingDot = draw(st.booleans())
    protocols = draw(
        st.lists(st.binary(min_size=1, max_size=20).map(lambda b: bytes(c & 0x7F or 1 for c in b)))
    )
    versions = draw(st.none() | st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20))
    others = draw(
        st.dictionaries(
            st.integers(0, 0xFFFF).filter(lambda t: t not in (0, 16, 43)),
            st.binary(max_size=300),
            max_size=8,
        )
    )
    extensions = [_extension(t, data) for t, data in others.items()]
    if hostName is not None:
        sent = hostName + "." if trailingDot else hostName
        extensions.append(_serverNameExtension(sent.encode("ascii")))
    if protocols:
        extensions.append(_alpnExtension(*protocols))
    if versions is not None:
        extensions.append(_supportedVersionsExtension(*versions))
    shuffled = draw(st.permutations(extensions))
    withBlock = bool(shuffled) or draw(st.booleans())
    body = _clientHelloBody(
        shuffled if withBlock else None,
        legacyVersion=draw(st.integers(0x0300, 0x03FF)),
        sessionID=draw(st.binary(max_size=32)),
        cipherSuites=draw(st.binary(min_size=1, max_size=40)) * 2,
        compressionMethods=draw(st.binary(min_size=1, max_size=4)),
    )
    message = _handshake(body)
    cuts = draw(st.lists(st.integers(1, len(message) - 1), max_size=30))
    records = _recordsAt(message, cuts, version=draw(st.integers(0x0300, 0x0304)))
    trailing = draw(st.just(b"") | st.binary(max_size=50).map(lambda b: b"\x17\x03\x03" + b))
    expected = ClientHello(
        serverName=None if hostName is None else hostName.lower(),
        alpn=tuple(p.decode("ascii") for p in protocols),
        legacyVersion=int.from_bytes(body[:2], "big"),
        supportedVersions=() if versions is None else tuple(versions),
        length=len(records),
    )
    return _Components(records + trailing, expected)


def _parseOrRaise(data: bytes) -> ClientHello | None:
    """
    Parse C{data}, allowing only L{MalformedClientHello} to escape.

    @param data: Bytes to parse.
    @return: The parse result, or L{None} if the data was malformed.
    """
    try:
        return parseClientHello(data)
    except MalformedClientHello as error:
        assert error.reason
        return None


class PropertyTests(SynchronousTestCase):
    """
    Hypothesis property tests for L{parseClientHello}.
    """

    @given(st.binary(max_size=2000))
    def test_randomBytes(self, data: bytes) -> None:
        """
        Arbitrary bytes are either malformed or parse; no other exception escapes.
        """
        _parseOrRaise(data)

    @given(st.integers(0x0300, 0x0304), st.binary(max_size=2000))
    def test_randomHandshakeRecords(self, version: int, payload: bytes) -> None:
        """
        Random payloads in handshake records, fragmented or not, are either malformed or parse;
        no other exception escapes.
        """
        _parseOrRaise(_records(payload, version=version) if payload else b"")
        _parseOrRaise(_records(b"\x01" + payload, 11, version=version))

    @given(_validHellos(), st.data())
    @settings(suppress_health_check=[HealthCheck.too_slow])
    def test_mutatedHellos(self, hello: _Components, data: st.DataObject) -> None:
        """
        A valid hello with random bytes overwritten is either malformed or parses; no other
        exception escapes.
        """
        mutated = bytearray(hello.data)
        for _ in range(data.draw(st.integers(1, 5))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
        _parseOrRaise(bytes(mutated))

    @given(_validHellos())
    @settings(suppress_health_check=[HealthCheck.too_slow])
    def test_validHellos(self, hello: _Components) -> None:
        """
        A hello built from random valid components parses to exactly those components.
        """
        self.assertEqual(parseClientHello(hello.data), hello.expected)

    @given(_validHellos(), st.data())
    @settings(suppress_health_check=[HealthCheck.too_slow])
    def test_prefixes(self, hello: _Components, data: st.DataObject) -> None:
        """
        Any proper prefix of a valid hello's records needs more bytes.
        """
        end = data.draw(st.integers(0, hello.expected.length - 1))
        self.assertIsNone(parseClientHello(hello.data[:end]))


def _peekedName(data: bytes) -> str | None:
    """
    @param data: A connection's first bytes.
    @return: The normal form of the host name L{peekHostName} finds, or L{None}.
    """
    sent = peekHostName(data)
    return None if sent is None else normalizeHostName(sent)


class PeekHostNameTests(SynchronousTestCase):
    """
    Tests for L{peekHostName} and L{normalizeHostName}: the host name of a simple ClientHello,
    found without parsing the rest.
    """

    def test_realHellos(self) -> None:
        """
        The hellos of real TLS stacks give the name L{parseClientHello} finds, or none when they
        send none.
        """
        for name, data, expected in _realHellos():
            self.assertEqual(_peekedName(data), expected.serverName, name)

    def test_asSent(self) -> None:
        """
        The name comes as sent; L{normalizeHostName} gives the form L{parseClientHello} returns,
        or L{None} where it refuses the name.
        """
        data = _records(_handshake(_clientHelloBody([_serverNameExtension(b"Foo.Localhost.")])))
        self.assertEqual(peekHostName(data), b"Foo.Localhost.")
        self.assertEqual(normalizeHostName(b"Foo.Localhost."), "foo.localhost")
        for refused in (b"", b".", b"a..b", b"caf\xc3\xa9.localhost", b"a b.localhost", b"x" * 254):
            self.assertIsNone(normalizeHostName(refused), refused)

    def test_notSimple(self) -> None:
        """
        Only a ClientHello whole in its first record, whose server name list starts with a host
        name, gives a name; for the rest it says nothing (L{parseClientHello} decides).
        """
        sni = _serverNameExtension(b"a.localhost")
        message = _handshake(_clientHelloBody([_alpnExtension(b"h2"), sni]))
        self.assertEqual(peekHostName(_records(message)), b"a.localhost")
        cases = {
            "fragmented": _records(message, 40),
            "incomplete": _records(message)[:-1],
            "not a handshake record": _records(message, contentType=23),
            "not a ClientHello": _records(_handshake(_clientHelloBody([sni]), handshakeType=2)),
            "no server name": _records(_handshake(_clientHelloBody([_alpnExtension(b"h2")]))),
            "no extensions": _records(_handshake(_clientHelloBody(None))),
            "other name type first": _records(
                _handshake(
                    _clientHelloBody(
                        [
                            _extension(
                                0,
                                _vector16(b"\x01" + _vector16(b"x") + b"\x00" + _vector16(b"a.b")),
                            )
                        ]
                    )
                )
            ),
            "short server name list": _records(
                _handshake(_clientHelloBody([_extension(0, b"\x00\x01\x00")]))
            ),
            "name past its extension": _records(
                _handshake(_clientHelloBody([_extension(0, _vector16(b"\x00\x00\x09ab"))]))
            ),
            "extension past the block": _records(
                _handshake(_clientHelloBody([b"\x00\x00\x00\x40" + b"\x00" * 10]))
            ),
            "empty": b"",
            "HTTP": b"GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n",
        }
        for name, data in cases.items():
            self.assertIsNone(peekHostName(data), name)

    @given(st.binary(max_size=2000))
    def test_randomBytes(self, data: bytes) -> None:
        """
        Arbitrary bytes give a name or none; nothing is raised.
        """
        peekHostName(data)
        peekHostName(_records(data) if data else b"")

    @given(_validHellos())
    @settings(suppress_health_check=[HealthCheck.too_slow])
    def test_validHellos(self, hello: _Components) -> None:
        """
        A valid hello gives the name L{parseClientHello} gives, or none (when fragmented or
        without a name).
        """
        peeked = _peekedName(hello.data)
        if peeked is not None:
            self.assertEqual(peeked, hello.expected.serverName)
        first = _records(_handshake(_clientHelloBody([_serverNameExtension(b"x.localhost")])))
        self.assertEqual(_peekedName(first + hello.data), "x.localhost")

    @given(_validHellos(), st.data())
    @settings(suppress_health_check=[HealthCheck.too_slow])
    def test_agreesWithParse(self, hello: _Components, data: st.DataObject) -> None:
        """
        Whenever a (possibly damaged) hello both gives a name here and parses, the names agree.
        """
        mutated = bytearray(hello.data)
        for _ in range(data.draw(st.integers(0, 5))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
        parsed = _parseOrRaise(bytes(mutated))
        peeked = _peekedName(bytes(mutated))
        if parsed is not None and peeked is not None:
            self.assertEqual(peeked, parsed.serverName)
