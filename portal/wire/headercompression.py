"""
HPACK (RFC 7541) for the HTTP/2 server (L{portal.wire.h2server}): a decoder for the client's
header blocks, with the dynamic table the client fills, and a stateless encoder for responses.

The decoder reads each representation in one pass over the block; Huffman-coded strings go to
the C{hpack} package's table-driven decoder. It refuses what RFC 7541 forbids (index 0 or beyond
the tables, a size update after the first field or above the table size the server allows,
integers longer than four continuation bytes, strings running past the block) with
L{HeaderBlockError}, and a header list bigger than its bound with L{HeaderListTooLarge}; either
leaves the table in an unknown state, so the connection must end.

The encoder never inserts into the client's dynamic table: a field is a static-table index when
the static table has it whole, else a literal "without indexing" (with the static table's index
for the name where there is one; "never indexed" for cookies and credentials), its strings
Huffman-coded when that is shorter. A field then always encodes to the same bytes, which are
cached (L{ENCODED_CACHE} fields): a response head costs a few dictionary lookups instead of a
search of the dynamic table per field. The price is bytes on the wire: a repeated field such as
C{server} or C{content-type} is sent as a literal each time (tens of bytes per response) rather
than as a one-byte index.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from hpack.exceptions import HPACKDecodingError
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

#: The static table (RFC 7541 Appendix A): index 1 is C{STATIC[0]}.
STATIC: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
#: Bytes an entry costs in a dynamic table beyond its name and value (RFC 7541 4.1); also what a
#: field costs in a header list's size (RFC 9113 6.5.2).
ENTRY_OVERHEAD = 32
#: Encoded fields the encoder keeps; the cache is emptied when it is full.
ENCODED_CACHE = 2048
#: The longest field (name and value) whose encoding is cached.
CACHED_FIELD = 256

_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, _field in enumerate(STATIC, start=1):
    _STATIC_FIELDS.setdefault(_field, _index)
    _STATIC_NAMES.setdefault(_field[0], _index)

#: Fields sent "never indexed" (RFC 7541 7.1.3), so that no intermediary indexes them.
_SENSITIVE = frozenset({b"set-cookie", b"cookie", b"authorization", b"proxy-authorization"})

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


class HeaderBlockError(Exception):
    """
    A header block RFC 7541 does not allow; the argument says why.
    """


class HeaderListTooLarge(HeaderBlockError):
    """
    A header list over the decoder's bound.
    """


def _integer(block: bytes, position: int, mask: int) -> tuple[int, int]:
    """
    Read an integer whose prefix is the C{mask} bits of C{block[position]}.

    @return: The integer and the position after it.
    """
    value = block[position] & mask
    position += 1
    if value < mask:
        return value, position
    shift = 0
    end = len(block)
    while True:
        if position >= end:
            raise HeaderBlockError("an integer runs past the block")
        byte = block[position]
        position += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 21:
            raise HeaderBlockError("an integer too long")


def _string(block: bytes, position: int) -> tuple[bytes, int]:
    """
    Read a string literal at C{position}.

    @return: The string and the position after it.
    """
    if position >= len(block):
        raise HeaderBlockError("a string runs past the block")
    huffman = block[position] & 0x80
    length, position = _integer(block, position, 0x7F)
    end = position + length
    if end > len(block):
        raise HeaderBlockError("a string runs past the block")
    raw = block[position:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except HPACKDecodingError as e:
            raise HeaderBlockError(f"bad Huffman code: {e}") from e
    return raw, end


class HeaderDecoder:
    """
    Decode a client's header blocks, keeping its dynamic table.

    @ivar maxTableSize: The dynamic table size the server allows (C{SETTINGS_HEADER_TABLE_SIZE},
        4,096 unless it advertised another).
    @ivar maxListSize: The largest header list accepted (C{SETTINGS_MAX_HEADER_LIST_SIZE}).
    """

    def __init__(self, maxTableSize: int = 4096, maxListSize: int = 65536) -> None:
        self.maxTableSize = maxTableSize
        self.maxListSize = maxListSize
        self._tableLimit = maxTableSize
        # Newest first: dynamic index 62 is self._table[0].
        self._table: deque[tuple[bytes, bytes]] = deque()
        self._tableSize = 0

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """
        Decode one complete header block.

        @raise HeaderBlockError: The block is malformed.
        @raise HeaderListTooLarge: The fields are more than L{maxListSize}.
        """
        headers: list[tuple[bytes, bytes]] = []
        size = 0
        limit = self.maxListSize
        position = 0
        end = len(block)
        table = self._table
        while position < end:
            byte = block[position]
            if byte & 0x80:
                # Indexed field.
                if byte != 0xFF:
                    index = byte & 0x7F
                    position += 1
                else:
                    index, position = _integer(block, position, 0x7F)
                if 0 < index <= 61:
                    field = STATIC[index - 1]
                elif index > 61 and index - 62 < len(table):
                    field = table[index - 62]
                else:
                    raise HeaderBlockError(f"no field at index {index}")
            elif byte & 0x40:
                # Literal with incremental indexing.
                field, position = self._literal(block, position, 0x3F)
                self._add(field)
            elif byte & 0x20:
                # Dynamic table size update: only before the first field.
                if headers:
                    raise HeaderBlockError("a table size update after a field")
                newSize, position = _integer(block, position, 0x1F)
                if newSize > self.maxTableSize:
                    raise HeaderBlockError(f"a table size of {newSize}")
                self._tableLimit = newSize
                self._evict(0)
                continue
            else:
                # Literal without indexing (0000) or never indexed (0001).
                field, position = self._literal(block, position, 0x0F)
            size += len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if size > limit:
                raise HeaderListTooLarge(f"a header list over {limit} bytes")
            headers.append(field)
        return headers

    def _literal(self, block: bytes, position: int, mask: int) -> tuple[tuple[bytes, bytes], int]:
        """
        Read a literal field whose name index has C{mask} as prefix.
        """
        index, position = _integer(block, position, mask)
        if index:
            if index <= 61:
                name = STATIC[index - 1][0]
            elif index - 62 < len(self._table):
                name = self._table[index - 62][0]
            else:
                raise HeaderBlockError(f"no field at index {index}")
        else:
            name, position = _string(block, position)
        value, position = _string(block, position)
        return (name, value), position

    def _add(self, field: tuple[bytes, bytes]) -> None:
        """
        Insert a field at the front of the dynamic table, evicting from the back (RFC 7541 4.4).
        """
        cost = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        if cost > self._tableLimit:
            self._table.clear()
            self._tableSize = 0
            return
        self._evict(cost)
        self._table.appendleft(field)
        self._tableSize += cost

    def _evict(self, room: int) -> None:
        """
        Drop the oldest entries until C{room} more bytes fit.
        """
        table = self._table
        while table and self._tableSize + room > self._tableLimit:
            name, value = table.pop()
            self._tableSize -= len(name) + len(value) + ENTRY_OVERHEAD


def _encodeInteger(value: int, prefixBits: int, first: int) -> bytes:
    """
    Encode C{value} with a prefix of C{prefixBits} bits (the C{hpack} package's encoding), the
    first byte's other bits C{first}.
    """
    encoded = encode_integer(value, prefixBits)
    encoded[0] |= first
    return bytes(encoded)


def _encodeString(value: bytes) -> bytes:
    """
    A string literal, Huffman-coded when that is shorter.
    """
    coded = _HUFFMAN.encode(value)
    if len(coded) < len(value):
        return _encodeInteger(len(coded), 7, 0x80) + coded
    return _encodeInteger(len(value), 7, 0) + value


def encodeField(name: bytes, value: bytes) -> bytes:
    """
    One field's representation, which never touches the dynamic table.
    """
    index = _STATIC_FIELDS.get((name, value))
    if index is not None:
        return _encodeInteger(index, 7, 0x80)
    first = 0x10 if name in _SENSITIVE else 0x00
    index = _STATIC_NAMES.get(name)
    if index is not None:
        return _encodeInteger(index, 4, first) + _encodeString(value)
    return bytes((first,)) + _encodeString(name) + _encodeString(value)


_cache: dict[tuple[bytes, bytes], bytes] = {}


class HeaderEncoder:
    """
    Encode response header blocks without a dynamic table (see the module's docstring).
    """

    def __init__(self) -> None:
        self._announceSize = False

    def tableSizeChanged(self) -> None:
        """
        The client changed C{SETTINGS_HEADER_TABLE_SIZE}: the next block starts by setting the
        table this encoder does not use to 0, whatever the client allowed (RFC 7541 4.2).
        """
        self._announceSize = True

    def encode(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """
        Encode a header list (names lowercase, as HTTP/2 requires).
        """
        cache = _cache
        parts = [b"\x20"] if self._announceSize else []
        self._announceSize = False
        for field in headers:
            encoded = cache.get(field)
            if encoded is None:
                name, value = field
                encoded = encodeField(name, value)
                if len(name) + len(value) <= CACHED_FIELD:
                    if len(cache) >= ENCODED_CACHE:
                        cache.clear()
                    cache[(name, value)] = encoded
            parts.append(encoded)
        return b"".join(parts)
