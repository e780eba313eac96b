"""
Twisted's TLS wrapper with its per-connection set-up done once.

C{TLSMemoryBIOProtocol.makeConnection} declares that the wrapper provides what its transport
provides with one C{directlyProvides} call per interface (each replacing the one before) and then
once more for all of them, in C{ProtocolWrapper.makeConnection}, which also connects and registers
the protocol a second time: a dozen zope declarations, each normalising its interface list, for
every visitor a tunnel serves (issue 16's profile: 2-4% of the tunnel's own work per new TLS
visitor). L{LeanTLSTransport} ends in the same state with one declaration, one connection and
one registration.

A connection an HTTP server ends (L{closePromptly}) closes its TCP connection once its own
close_notify is sent, instead of waiting for the visitor's as Twisted does (so that the rest of a
half-closed stream can still be read): a visitor that sends none and keeps the socket open would
otherwise hold the connection, and the relay's, until an idle timeout.

It also gives an idle connection smaller memory BIOs: pyOpenSSL's memory BIOs keep the largest
buffer they ever held (after the handshake, the ClientHello one way and the server's flight and
session tickets the other: about 2 KB of a tunnel's memory per idle visitor; after one 64 KiB read
from the socket, about 88 KB), so when they may have grown (the handshake, a read or a write of more
than L{GROWN_ABOVE} bytes) the connection gets two new empty ones at the next small read that
leaves both empty (L{renewMemoryBIOs}). Waiting for a small read keeps bulk transfers from renewing
them at every read; a connection whose last read was large keeps its buffer until its next small
one.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport
from zope.interface import directlyProvides, providedBy

#: Reads and writes larger than this (bytes) may leave a memory BIO with a grown buffer.
GROWN_ABOVE = 4096

_lib: Any = Binding.lib
_ffi: Any = Binding.ffi


def renewMemoryBIOs(connection: Any) -> bool:
    """
    Give a pyOpenSSL connection with memory BIOs two new, empty ones in place of its own, if both of
    its own are empty: a memory BIO never shrinks the buffer it grew to.

    This replaces pyOpenSSL's private C{_into_ssl} and C{_from_ssl} (the BIOs its C{bio_write} and
    C{bio_read} use) with C{SSL_set_bio}, which frees the old ones; nothing is done if they are
    missing or either holds bytes.

    @param connection: An L{OpenSSL.SSL.Connection} made without a socket.
    @return: Whether the BIOs were replaced.
    """
    into = getattr(connection, "_into_ssl", None)
    out = getattr(connection, "_from_ssl", None)
    ssl = getattr(connection, "_ssl", None)
    if into is None or out is None or ssl is None:
        return False
    if _lib.BIO_get_mem_data(into, _ffi.NULL) or _lib.BIO_get_mem_data(out, _ffi.NULL):
        return False
    newInto = _lib.BIO_new(_lib.BIO_s_mem())
    newOut = _lib.BIO_new(_lib.BIO_s_mem())
    if newInto == _ffi.NULL or newOut == _ffi.NULL:
        for bio in (newInto, newOut):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    # SSL_set_bio takes ownership of the new BIOs and frees the old ones.
    _lib.SSL_set_bio(ssl, newInto, newOut)
    connection._into_ssl, connection._from_ssl = newInto, newOut
    return True


class LeanTLSTransport(BufferingTLSTransport):
    """
    L{BufferingTLSTransport} (what L{twisted.protocols.tls.TLSMemoryBIOFactory} builds) whose
    C{makeConnection} declares the transport's interfaces once, and connects and registers itself
    once, and whose memory BIOs are renewed when they may have grown (L{renewMemoryBIOs}).
    """

    _log = Logger()
    #: Whether the memory BIOs may hold buffers grown by the handshake or a large read or write.
    _grownBIOs = True
    #: Whether this process's pyOpenSSL lets BIOs be renewed (set to False on the first failure).
    _renewable = True

    #: Whether the TCP connection closes once close_notify is sent (L{loseConnectionPromptly}).
    _prompt = False

    def loseConnectionPromptly(self) -> None:
        """
        Close as C{loseConnection} does (after what was written, with close_notify), then close the
        TCP connection (after its own buffered bytes) without waiting for the peer's close_notify,
        which RFC 8446 6.1 allows. For a server that reads nothing more from this peer.
        """
        self._prompt = True
        self.loseConnection()

    def _shutdownTLS(self) -> None:
        """
        Send close_notify as usual (once what the application wrote is encrypted); after
        L{loseConnectionPromptly}, close the TCP connection too.
        """
        super()._shutdownTLS()
        if self._prompt and self.transport is not None:
            self.transport.loseConnection()

    def makeConnection(self, transport: Any) -> None:
        """
        Create the TLS connection, provide what C{transport} provides, connect the wrapped
        protocol (unless told not to) and start the handshake, as
        L{twisted.protocols.tls.TLSMemoryBIOProtocol.makeConnection} does.

        @param transport: The transport to wrap.
        """
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()

    def dataReceived(self, data: bytes) -> None:
        """
        Decrypt and deliver as usual; after a small read, once the handshake is done, renew the
        memory BIOs if they may have grown and both are empty.

        @param data: Bytes from the transport.
        """
        super().dataReceived(data)
        if len(data) > GROWN_ABOVE:
            self._grownBIOs = True
        elif (
            self._grownBIOs
            and self._handshakeDone
            and not self._lostTLSConnection
            and not self.disconnecting
            and self._renewable
        ):
            try:
                renewed = renewMemoryBIOs(self._tlsConnection)
            except Exception:
                # A pyOpenSSL without these internals: keep the BIOs, and stop trying.
                self._log.failure("cannot renew the TLS memory BIOs")
                LeanTLSTransport._renewable = False
                renewed = False
            if renewed:
                self._grownBIOs = False

    def _write(self, data: bytes) -> None:
        """
        Encrypt and send as usual; a large write may grow the outgoing memory BIO.

        @param data: Application bytes.
        """
        if len(data) > GROWN_ABOVE:
            self._grownBIOs = True
        super()._write(data)


def closePromptly(transport: Any) -> None:
    """
    Close C{transport} without waiting for the peer: L{LeanTLSTransport.loseConnectionPromptly}
    where it is one, C{loseConnection} otherwise.

    @param transport: A visitor's transport.
    """
    prompt = getattr(type(transport), "loseConnectionPromptly", None)
    if prompt is not None:
        prompt(transport)
    else:
        transport.loseConnection()
