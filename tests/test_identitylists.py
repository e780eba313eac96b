"""
Tests for L{portal.relay.identitylists}.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from portal.relay.identitylists import (
    DENY_FILE,
    INVITE_FILE,
    IdentityListError,
    IdentityLists,
    readIdentityList,
)
from portal.trust.identity import Identity


class IdentityListsTests(SynchronousTestCase):
    """
    The deny and invite lists are read from the state directory, one identity id a line.
    """

    def setUp(self) -> None:
        """
        A state directory and two identities.
        """
        self.stateDir = self.mktemp()
        os.makedirs(self.stateDir)
        self.alice = Identity.generate().id
        self.bob = Identity.generate().id

    def write(self, name: str, text: str) -> None:
        """
        Write a list file in the state directory.
        """
        with open(os.path.join(self.stateDir, name), "w", encoding="utf-8") as f:
            f.write(text)

    def test_open(self) -> None:
        """
        Without files and invite mode, every identity may register.
        """
        lists = IdentityLists.load(self.stateDir, inviteOnly=False)
        self.assertIsNone(lists.refusal(self.alice))

    def test_denied(self) -> None:
        """
        A listed identity is refused, with comments and blank lines ignored; others are not.
        """
        self.write(DENY_FILE, f"# abusers\n\n{self.alice}  # flooded on Monday\n")
        lists = IdentityLists.load(self.stateDir, inviteOnly=False)
        refusal = lists.refusal(self.alice)
        assert refusal is not None
        self.assertEqual(refusal[0], "identity_denied")
        self.assertIsNone(lists.refusal(self.bob))

    def test_inviteOnly(self) -> None:
        """
        In invite mode only invited identities may register; the refusal names the identity and
        the file to add it to. A denied identity stays refused even when invited.
        """
        self.write(INVITE_FILE, f"{self.alice}\n{self.bob}\n")
        self.write(DENY_FILE, f"{self.bob}\n")
        lists = IdentityLists.load(self.stateDir, inviteOnly=True)
        self.assertIsNone(lists.refusal(self.alice))
        stranger = Identity.generate().id
        refusal = lists.refusal(stranger)
        assert refusal is not None
        self.assertEqual(refusal[0], "identity_not_invited")
        self.assertIn(stranger, refusal[1])
        self.assertIn(INVITE_FILE, refusal[1])
        denied = lists.refusal(self.bob)
        assert denied is not None
        self.assertEqual(denied[0], "identity_denied")

    def test_inviteFileIgnoredWhenOpen(self) -> None:
        """
        Without invite mode the invite file does not restrict anyone.
        """
        self.write(INVITE_FILE, f"{self.alice}\n")
        self.assertIsNone(IdentityLists.load(self.stateDir, False).refusal(self.bob))

    def test_malformed(self) -> None:
        """
        A line that is not an identity id is an error naming the file and line.
        """
        self.write(DENY_FILE, f"{self.alice}\nnot-an-id\n")
        error = self.assertRaises(
            IdentityListError, readIdentityList, os.path.join(self.stateDir, DENY_FILE)
        )
        self.assertIn("line 2", str(error))
        self.assertIn(DENY_FILE, str(error))
