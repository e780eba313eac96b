"""
The tunnel's record of relay identities, pinned on first use like SSH's C{known_hosts}.

A tunnel authenticates each relay by the relay's own identity.  The first time it meets a
relay at an address it remembers the identity the relay presented; later a different identity
at that address is refused loudly, since it means either that the relay's key was replaced or
that someone is impersonating the relay.  An identity given on the command line
(C{--relay host:port#RELAYID}) is checked first and pinned in turn.

The file is JSON: C{{"version": 1, "relays": {"host:port": "relay-id"}}}.  It is read afresh on
every check, so removing a stale entry takes effect without a restart.
"""

from __future__ import annotations

import json
import os

from portal.trust.privatefiles import PRIVATE_FILE_MODE, makePrivateDirectories, writeFileAtomically

FILE_VERSION = 1
"""
The version of the known relays file format that this module reads and writes.
"""


class RelayIdentityChanged(Exception):
    """
    A relay presented an identity other than the one pinned or given for its address.

    @ivar address: The relay's C{host:port}.
    @ivar presentedId: The identity the relay presented.
    @ivar expectedId: The identity that was pinned or given on the command line.
    @ivar path: The known relays file, when the expected identity was pinned there.
    @ivar flag: The option the relay is given with: C{--relay}, or C{--via} for a hop.
    """

    def __init__(
        self,
        address: str,
        presentedId: str,
        expectedId: str,
        path: str | None = None,
        flag: str = "--relay",
    ) -> None:
        """
        @param address: The relay's C{host:port}.
        @param presentedId: The identity the relay presented.
        @param expectedId: The identity that was pinned or given on the command line.
        @param path: The known relays file holding C{expectedId}, or L{None} when
            C{expectedId} came from the command line.
        @param flag: The option the relay is given with, for the advice in the message.
        """
        self.address = address
        self.presentedId = presentedId
        self.expectedId = expectedId
        self.path = path
        self.flag = flag
        super().__init__(self._message())

    def _message(self) -> str:
        """
        Explain the mismatch and what to do about it.

        @return: The message.
        """
        if self.path is None:
            return (
                f"relay {self.address} presented identity {self.presentedId} but "
                f"{self.flag} {self.address}#{self.expectedId} was given on the command line. "
                f"Check the identity you were given for this relay; if it is right, someone "
                f"may be impersonating the relay."
            )
        return (
            f"relay {self.address} presented identity {self.presentedId} but "
            f"{self.expectedId} is pinned for it in {self.path}. If the relay's key was "
            f"changed on purpose, remove its entry from that file or pass "
            f"{self.flag} {self.address}#{self.presentedId}; otherwise someone may be "
            f"impersonating the relay."
        )


class KnownRelays:
    """
    The relay identities a tunnel has pinned, kept in a JSON file.

    Addresses are compared in lower case; identities exactly.
    """

    def __init__(self, path: str) -> None:
        """
        @param path: The file of pinned identities; a missing file means none are pinned
            yet, and it is created on the first pin.
        @raise ValueError: If the file exists but is not a valid known relays file.
        """
        self.path = path
        self._load()

    def pinned(self, address: str) -> str | None:
        """
        Look up the identity pinned for a relay.

        @param address: The relay's C{host:port}.
        @return: The pinned identity, or L{None} if none is pinned.
        @raise ValueError: If the file is not a valid known relays file.
        """
        return self._load().get(address.lower())

    def check(
        self,
        address: str,
        presentedId: str,
        expectedId: str | None = None,
        flag: str = "--relay",
    ) -> bool:
        """
        Accept or refuse the identity a relay presented, pinning it if it is new.

        With C{expectedId} (from C{--relay host:port#RELAYID}) the relay must present exactly
        that identity, which then replaces any pin for the address.  Without it the relay must
        present the pinned identity, or, when none is pinned, its identity is pinned now.

        @param address: The relay's C{host:port}.
        @param presentedId: The identity the relay presented.
        @param expectedId: The identity given on the command line, if any.
        @param flag: The option the relay is given with (C{--relay}, or C{--via} for a hop), for
            the advice in L{RelayIdentityChanged}.
        @return: L{True} if the file was changed (a new or replaced pin), L{False} if the
            identity was already pinned.
        @raise RelayIdentityChanged: If the presented identity is not the expected one.
        @raise ValueError: If the file is not a valid known relays file.
        """
        key = address.lower()
        relays = self._load()
        pinnedId = relays.get(key)
        if expectedId is not None:
            if presentedId != expectedId:
                raise RelayIdentityChanged(address, presentedId, expectedId, flag=flag)
        elif pinnedId is not None and presentedId != pinnedId:
            raise RelayIdentityChanged(address, presentedId, pinnedId, self.path, flag)
        if pinnedId == presentedId:
            return False
        relays[key] = presentedId
        self._save(relays)
        return True

    def _load(self) -> dict[str, str]:
        """
        Read the pinned identities from the file.

        @return: The identity pinned for each lowercased address.
        @raise ValueError: If the file is not a valid known relays file.
        """
        try:
            with open(self.path, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            return {}
        problem = (
            f"{self.path} is not a valid known relays file; fix it, or remove it to pin "
            f"relays afresh on first use"
        )
        try:
            document = json.loads(content)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{problem} ({e}).")
        if not isinstance(document, dict):
            raise ValueError(f"{problem} (expected a JSON object).")
        if document.get("version") != FILE_VERSION:
            raise ValueError(
                f"{problem} (unsupported version {document.get('version')!r}; "
                f"expected {FILE_VERSION})."
            )
        relays = document.get("relays")
        if not isinstance(relays, dict) or not all(
            isinstance(address, str) and isinstance(relayId, str)
            for address, relayId in relays.items()
        ):
            raise ValueError(f'{problem} ("relays" must map "host:port" strings to ids).')
        return {address.lower(): relayId for address, relayId in relays.items()}

    def _save(self, relays: dict[str, str]) -> None:
        """
        Write the pinned identities to the file atomically, with mode 0600, creating its
        missing parent directories with mode 0700.

        @param relays: The identity pinned for each address.
        """
        content = json.dumps(
            {"version": FILE_VERSION, "relays": relays}, indent=2, sort_keys=True
        ).encode("utf-8")
        makePrivateDirectories(os.path.dirname(os.path.abspath(self.path)))
        writeFileAtomically(self.path, content + b"\n", PRIVATE_FILE_MODE)
