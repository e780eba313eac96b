"""
The relay's identity lists: a deny list (identities that may not register) and, for a private relay,
an invite list (the only identities that may). Both are text files in the state directory, one
identity id per line (C{portal identity show} prints it), C{#} starting a comment; the relay reads
them at start and again on SIGHUP, so an operator can change them without a restart.
"""

from __future__ import annotations

import os

import attrs

from portal.trust.identity import looksLikeIdentityId

#: File names in the state directory.
DENY_FILE = "denied-identities"
INVITE_FILE = "invited-identities"


class IdentityListError(ValueError):
    """
    An identity list file cannot be read or holds something that is not an identity id; C{str()}
    names the file and line.
    """


def readIdentityList(path: str) -> frozenset[str]:
    """
    Read one identity list file.

    @param path: The file.
    @return: The identity ids in it; none when the file does not exist.
    @raise IdentityListError: If it cannot be read or a line is not an identity id.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return frozenset()
    except (OSError, UnicodeDecodeError) as e:
        raise IdentityListError(f"cannot read identity list {path}: {e}")
    ids = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not looksLikeIdentityId(text):
            raise IdentityListError(
                f"{path}, line {number}: {text[:60]!r} is not an identity id "
                f"(portal identity show prints one)"
            )
        ids.add(text)
    return frozenset(ids)


@attrs.frozen
class IdentityLists:
    """
    Who may register, as the files said when they were last read.

    @ivar denied: Identity ids that may not register.
    @ivar invited: With L{inviteOnly}, the only identity ids that may register.
    @ivar inviteOnly: Whether the relay is private (C{--invite-only}).
    """

    denied: frozenset[str] = frozenset()
    invited: frozenset[str] = frozenset()
    inviteOnly: bool = False

    @classmethod
    def load(cls, stateDir: str, inviteOnly: bool) -> IdentityLists:
        """
        Read the lists from the state directory.

        @param stateDir: The relay's state directory.
        @param inviteOnly: Whether only invited identities may register.
        @raise IdentityListError: If a file cannot be read or is malformed.
        """
        denied = readIdentityList(os.path.join(stateDir, DENY_FILE))
        invited = readIdentityList(os.path.join(stateDir, INVITE_FILE)) if inviteOnly else None
        return cls(denied=denied, invited=invited or frozenset(), inviteOnly=inviteOnly)

    def refusal(self, identity: str) -> tuple[str, str] | None:
        """
        Tell whether C{identity} may register.

        @param identity: A full identity id.
        @return: L{None} if it may; otherwise the refusal's reason label and message.
        """
        if identity in self.denied:
            return ("identity_denied", "this identity is not allowed to register on this relay")
        if self.inviteOnly and identity not in self.invited:
            return (
                "identity_not_invited",
                f"this relay is private: ask its operator to add identity {identity} to its "
                f"{INVITE_FILE} file",
            )
        return None
