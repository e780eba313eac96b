"""
Tests for L{portal.wire.headercompression}: HPACK decoding against RFC 7541's examples and the
C{hpack} package's encoder, every refusal, and the stateless encoder read back by C{hpack}'s
decoder.
"""

from __future__ import annotations

from hpack import Decoder, Encoder
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from portal.wire.headercompression import (
    ENCODED_CACHE,
    HeaderBlockError,
    HeaderDecoder,
    HeaderEncoder,
    HeaderListTooLarge,
    encodeField,
)

_names = st.one_of(
    st.sampled_from([b":method", b":path", b"content-type", b"cookie", b"set-cookie", b"date"]),
    st.binary(min_size=1, max_size=12).map(bytes.lower),
)
_values = st.one_of(st.sampled_from([b"GET", b"200", b"", b"text/html"]), st.binary(max_size=40))
_fields = st.lists(st.tuples(_names, _values), max_size=8)


class RFCExamplesTests(SynchronousTestCase):
    """
    The request examples of RFC 7541 Appendix C, decoded block after block on one connection.
    """

    def assertDecodes(self, blocks: list[str], dynamicTables: list[int]) -> None:
        """
        Each hex block decodes to the example's fields, and the dynamic table holds the entries the
        RFC lists after it.
        """
        decoder = HeaderDecoder()
        expected = [
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
            + [(b":authority", b"www.example.com")],
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
            + [(b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html")]
            + [(b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
        ]
        for block, fields, tableSize in zip(blocks, expected, dynamicTables, strict=True):
            self.assertEqual(decoder.decode(bytes.fromhex(block)), fields)
            self.assertEqual(decoder._tableSize, tableSize)

    def test_withoutHuffman(self) -> None:
        """
        C.3: three requests with literal strings.
        """
        self.assertDecodes(
            [
                "828684410f7777772e6578616d706c652e636f6d",
                "828684be58086e6f2d6361636865",
                "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
            ],
            [57, 110, 164],
        )

    def test_withHuffman(self) -> None:
        """
        C.4: the same requests with Huffman-coded strings.
        """
        self.assertDecodes(
            [
                "828684418cf1e3c2e5f23a6ba0ab90f4ff",
                "828684be5886a8eb10649cbf",
                "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
            ],
            [57, 110, 164],
        )


class DecoderTests(SynchronousTestCase):
    """
    L{HeaderDecoder} reads what a conforming encoder writes and refuses what RFC 7541 forbids.
    """

    @settings(max_examples=300)
    @given(st.lists(_fields, min_size=1, max_size=6), st.booleans(), st.integers(0, 4096))
    def test_readsHpackEncoder(
        self, blocks: list[list[tuple[bytes, bytes]]], huffman: bool, tableSize: int
    ) -> None:
        """
        Successive blocks from C{hpack}'s encoder (which indexes fields into the dynamic table and
        announces a smaller table when told to) decode to the fields it was given.
        """
        encoder = Encoder()
        decoder = HeaderDecoder()
        for number, fields in enumerate(blocks):
            if number == 1:
                encoder.header_table_size = tableSize
            block = encoder.encode(fields, huffman=huffman)
            self.assertEqual(decoder.decode(block), fields)
            self.assertLessEqual(decoder._tableSize, 4096)

    def test_evicts(self) -> None:
        """
        The dynamic table keeps within its size: old entries go first, an entry bigger than the whole
        table empties it, and a size update to 0 drops everything.
        """
        decoder = HeaderDecoder()
        encoder = Encoder()
        for number in range(200):
            decoder.decode(encoder.encode([(b"x-n", b"%d" % number)]))
        self.assertLessEqual(decoder._tableSize, 4096)
        self.assertEqual(decoder._table[0], (b"x-n", b"199"))
        self.assertEqual(decoder.decode(bytes([0x80 | 62])), [(b"x-n", b"199")])
        decoder.decode(encoder.encode([(b"x-big", b"v" * 5000)]))
        self.assertEqual(decoder._tableSize, 0)
        decoder.decode(encoder.encode([(b"x-n", b"again")]))
        self.assertEqual(decoder.decode(b"\x20"), [])
        self.assertEqual(decoder._tableSize, 0)
        self.assertRaises(HeaderBlockError, decoder.decode, bytes([0x80 | 62]))

    def assertRefused(self, block: bytes, reason: str) -> None:
        """
        C{block} is refused with an error whose text contains C{reason}.
        """
        error = self.assertRaises(HeaderBlockError, HeaderDecoder().decode, block)
        self.assertIn(reason, str(error))

    def test_refusals(self) -> None:
        """
        Index 0, an index beyond both tables (indexed or as a literal's name), a size update after
        a field or above the table the server allows, an over-long integer, strings past the block
        and a bad Huffman code are refused.
        """
        self.assertRefused(b"\x80", "no field at index 0")
        self.assertRefused(bytes([0x80 | 62]), "no field at index 62")
        self.assertRefused(b"\xff\x80\x01", "no field at index 255")
        self.assertRefused(bytes([0x40 | 62]) + b"\x01a", "no field at index 62")
        self.assertRefused(b"\x82\x20", "a table size update after a field")
        self.assertRefused(b"\x3f\xe2\x1f", "a table size of 4097")
        self.assertRefused(b"\xff\xff\xff\xff\xff\x01", "an integer too long")
        self.assertRefused(b"\xff\xff", "an integer runs past the block")
        self.assertRefused(b"\x00\x05ab", "a string runs past the block")
        self.assertRefused(b"\x00\x01a", "a string runs past the block")
        self.assertRefused(b"\x00\x81\x00\x00", "bad Huffman code")

    def test_listSize(self) -> None:
        """
        A header list is counted as RFC 9113 counts it (name, value and 32 per field): exactly the
        bound is accepted, one byte more is refused with L{HeaderListTooLarge}.
        """
        fields = [(b"x-a", b"v" * (100 - 32 - 3))]
        block = Encoder().encode(fields, huffman=False)
        self.assertEqual(HeaderDecoder(maxListSize=100).decode(block), fields)
        self.assertRaises(HeaderListTooLarge, HeaderDecoder(maxListSize=99).decode, block)


class EncoderTests(SynchronousTestCase):
    """
    L{HeaderEncoder} writes blocks any decoder reads, without a dynamic table.
    """

    @settings(max_examples=300)
    @given(st.lists(_fields, min_size=1, max_size=6), st.integers(0, 5))
    def test_readByHpack(self, blocks: list[list[tuple[bytes, bytes]]], resize: int) -> None:
        """
        Successive blocks decode with C{hpack}'s decoder to the fields given, also after the client
        changed its table size (the block then starts by setting it to 0).
        """
        encoder = HeaderEncoder()
        decoder = Decoder()
        for number, fields in enumerate(blocks):
            if number == resize:
                encoder.tableSizeChanged()
            block = encoder.encode(fields)
            self.assertEqual([tuple(f) for f in decoder.decode(block, raw=True)], fields)
            self.assertEqual(len(decoder.header_table.dynamic_entries), 0)
            if number == resize:
                self.assertEqual(block[:1], b"\x20")

    def test_representations(self) -> None:
        """
        A field the static table has whole is one byte; a known name is its index and the value;
        credentials are "never indexed"; strings are Huffman-coded when shorter.
        """
        self.assertEqual(encodeField(b":status", b"200"), b"\x88")
        self.assertEqual(encodeField(b":status", b"299")[:1], bytes([0x08]))
        self.assertEqual(encodeField(b"set-cookie", b"a=b")[:1], bytes([0x1F]))
        self.assertEqual(encodeField(b"x-unknown", b"1")[:1], b"\x00")
        # The name is shorter Huffman-coded (H bit), the value is not.
        self.assertTrue(encodeField(b"x-unknown", b"\xff\xfe")[1] & 0x80)
        self.assertEqual(encodeField(b"x-unknown", b"\xff\xfe")[-3:], b"\x02\xff\xfe")

    def test_cacheBounded(self) -> None:
        """
        The cache of encoded fields never holds more than L{ENCODED_CACHE} entries, nor long
        fields.
        """
        from portal.wire import headercompression

        encoder = HeaderEncoder()
        encoder.encode([(b"x-long", b"v" * 300)])
        self.assertNotIn((b"x-long", b"v" * 300), headercompression._cache)
        for number in range(ENCODED_CACHE + 10):
            encoder.encode([(b"x-n", b"%d" % number)])
            self.assertLessEqual(len(headercompression._cache), ENCODED_CACHE)
