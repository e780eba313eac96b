"""
Everything a tunnel needs for paired terminals, in one object: the store, the pairing codes, the
nonces and sessions, the authenticator and pages the gateway uses, and the owner's operations that
C{portal pair} and C{portal terminals} reach over the local control socket.
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IReactorTime

from portal.gateway.caller import Authenticator, GatewayPages
from portal.gateway.pairing import CODE_TTL, IssuedCode, PairingCodes
from portal.gateway.proof import NonceBook
from portal.gateway.sessions import SESSION_TTL, SessionTokens, TerminalAuthenticator
from portal.gateway.terminalpages import TerminalPages
from portal.gateway.terminals import STORE_FILENAME, Terminal, TerminalStore, validateName


def storePath(stateDir: str) -> str:
    """
    @param stateDir: The tunnel's state directory (the directory of its identity file).
    @return: Where its terminal store lives.
    """
    return os.path.join(stateDir, STORE_FILENAME)


class TerminalAccess:
    """
    Paired terminals of one tunnel.

    @ivar store: The paired terminals.
    @ivar codes: The pairing codes issued and not yet used.
    @ivar authenticator: The gateway's authenticator for terminals.
    @ivar pages: The gateway's pages for pairing and sessions.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: TerminalStore,
        codeTTL: float = CODE_TTL,
        sessionTTL: float = SESSION_TTL,
    ) -> None:
        """
        @param clock: The source of the current time.
        @param store: The paired terminals.
        @param codeTTL: Seconds a pairing code stays valid.
        @param sessionTTL: Seconds a session stays valid without renewal.
        """
        self._clock = clock
        self.store = store
        self.codes = PairingCodes(clock, ttl=codeTTL)
        tokens = SessionTokens(clock, ttl=sessionTTL)
        # Typed as the gateway's interfaces, which mypy checks the classes against.
        self.authenticator: Authenticator = TerminalAuthenticator(tokens, store)
        self.pages: GatewayPages = TerminalPages(clock, store, self.codes, NonceBook(clock), tokens)

    @classmethod
    def open(cls, clock: IReactorTime, stateDir: str) -> TerminalAccess:
        """
        Open the terminal store in a state directory (creating it if needed).

        @param clock: The source of the current time.
        @param stateDir: The tunnel's state directory.
        @return: The tunnel's terminals.
        @raise portal.gateway.terminals.StoreError: If the store cannot be opened.
        """
        return cls(clock, TerminalStore.open(storePath(stateDir)))

    def issueCode(self, name: str | None = None) -> IssuedCode:
        """
        Issue a pairing code (C{portal pair}).

        @param name: The name to give the terminal that pairs with it, or L{None}.
        @return: The code.
        @raise portal.gateway.terminals.InvalidTerminalName: If C{name} is not acceptable.
        """
        return self.codes.issue(None if name is None else validateName(name))

    def list(self) -> list[Terminal]:
        """
        @return: Every terminal, revoked ones included, oldest first.
        """
        return self.store.list()

    def rename(self, prefix: str, name: str) -> Terminal:
        """
        Rename a terminal; see L{TerminalStore.rename}.
        """
        return self.store.rename(prefix, name)

    def revoke(self, prefix: str) -> Terminal:
        """
        Revoke a terminal; its next request is refused.  See L{TerminalStore.revoke}.
        """
        return self.store.revoke(prefix, self._clock.seconds())

    def close(self) -> None:
        """
        Close the store.
        """
        self.store.close()
