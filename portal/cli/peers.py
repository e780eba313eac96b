"""
C{portal peers add|list|remove}: the contact list from the command line.

The list lives next to the identity file (C{peers.json}, see L{portal.gateway.contacts}), so
C{--identity PATH} picks both.
"""

from __future__ import annotations

import json
import os
from typing import TextIO

from twisted.python import usage

from portal.cli.flagsanywhere import FlagsAnywhere
from portal.cli.helptext import TidyHelp
from portal.gateway.contacts import (
    Contact,
    ContactList,
    ContactsError,
    InvalidContact,
    contactsPath,
    validateIdentityId,
)
from portal.trust.identity import defaultIdentityPath

#: Exit status for anything but a usage error.
FAILURE = 1

_IDENTITY = ["identity", None, None, "Identity file; the contact list is beside it."]


def _identityId(text: str) -> str:
    """
    Check an identity id argument.

    @raise usage.UsageError: If it is a short id or not an id.
    """
    try:
        return validateIdentityId(text)
    except InvalidContact as e:
        raise usage.UsageError(str(e))


class PeersAddOptions(FlagsAnywhere):
    """
    C{portal peers add IDENTITY-ID [--name NAME] [--url URL]... [--ca FILE] [--replace]}.
    """

    synopsis = "IDENTITY-ID [--name NAME] [--url https://HOST[:PORT]]... [--ca FILE] [--replace]"
    longdesc = (
        "Add another Portal owner to your contacts, by the full id of their identity (they see it "
        "with `portal identity show`). Contacts can call your apps as peers; to call theirs, "
        "give their tunnel's URL (repeat --url for each relay they use) and, if their "
        "certificates come from their local CA, that CA's ca.pem."
    )
    optParameters = [
        ["name", None, None, "A name for this peer."],
        ["ca", None, None, "The peer's CA certificate (PEM), to verify TLS to its URLs."],
        _IDENTITY,
    ]
    optFlags = [
        [
            "replace",
            None,
            "Change an existing contact: the --name, --url (all of them) and --ca given replace "
            "the old ones; the others are kept.",
        ]
    ]

    def __init__(self) -> None:
        super().__init__()
        self["urls"] = []

    def opt_url(self, url: str) -> None:
        """
        The peer's public URL, https://HOST[:PORT] (repeatable).
        """
        self["urls"].append(url)

    def parseArgs(self, identityId: str | None = None) -> None:
        """
        @param identityId: The peer's full identity id.
        """
        if identityId is None:
            raise usage.UsageError("portal peers add needs the peer's IDENTITY-ID")
        self["id"] = _identityId(identityId)

    def postOptions(self) -> None:
        """
        Check the name and URLs.
        """
        try:
            self["contact"] = Contact.create(self["id"], self["name"] or "", self["urls"])
        except InvalidContact as e:
            raise usage.UsageError(str(e))


class PeersListOptions(FlagsAnywhere):
    """
    C{portal peers list [--json]}.
    """

    synopsis = "[--json]"
    optParameters = [_IDENTITY]
    optFlags = [["json", None, "Print one JSON object per peer."]]


class PeersRemoveOptions(FlagsAnywhere):
    """
    C{portal peers remove IDENTITY-ID}.
    """

    synopsis = "IDENTITY-ID"
    optParameters = [_IDENTITY]

    def parseArgs(self, identityId: str | None = None) -> None:
        """
        @param identityId: The peer's full identity id.
        """
        if identityId is None:
            raise usage.UsageError("portal peers remove needs the peer's IDENTITY-ID")
        self["id"] = _identityId(identityId)


class PeersOptions(TidyHelp):
    """
    C{portal peers add|list|remove}.
    """

    synopsis = "add|list|remove ..."
    optParameters = [_IDENTITY]
    subCommands = [
        ["add", None, PeersAddOptions, "Add a peer to your contacts."],
        ["list", None, PeersListOptions, "List your contacts."],
        ["remove", None, PeersRemoveOptions, "Remove a peer from your contacts."],
    ]

    def postOptions(self) -> None:
        """
        A subcommand is required.
        """
        if self.subCommand is None:
            raise usage.UsageError("expected 'portal peers add', 'list' or 'remove'")


def _contactList(identityPath: str | None) -> ContactList:
    """
    @param identityPath: The identity file given, if any.
    @return: The contact list beside the identity file.
    """
    identityPath = identityPath or defaultIdentityPath()
    return ContactList(contactsPath(os.path.dirname(os.path.abspath(identityPath))))


def _describe(contact: Contact) -> str:
    """
    @return: Lines describing a contact for humans.
    """
    urls = ", ".join(contact.urls) or "none (it can call you; you cannot call it)"
    tls = "its own CA" if contact.ca else "the system's CAs"
    return f"  id: {contact.id}\n  urls: {urls}\n  TLS verified with: {tls}\n"


def _add(options: PeersAddOptions, contacts: ContactList, out: TextIO) -> None:
    """
    Run C{portal peers add}.

    @raise ContactsError: If the CA file cannot be used or the list cannot be changed.
    """
    contact: Contact = options["contact"]
    if options["ca"] is not None:
        try:
            with open(options["ca"], "rb") as f:
                pem = f.read()
            contact = Contact.create(contact.id, contact.name, contact.urls, pem.decode("ascii"))
        except (OSError, UnicodeDecodeError, InvalidContact) as e:
            reason = e.strerror if isinstance(e, OSError) else e
            raise ContactsError(f"--ca {options['ca']}: {reason}")
    if options["replace"] and contacts.get(contact.id) is not None:
        contact = contacts.update(
            contact.id,
            name=None if options["name"] is None else contact.name,
            urls=contact.urls if options["urls"] else None,
            ca=contact.ca,
        )
        out.write(f"changed peer {contact.label}\n{_describe(contact)}")
        return
    contacts.add(contact)
    out.write(f"added peer {contact.label}\n{_describe(contact)}")


def _list(options: PeersListOptions, contacts: ContactList, out: TextIO) -> None:
    """
    Run C{portal peers list}.
    """
    peers = contacts.contacts()
    if options["json"]:
        for contact in peers:
            document = {
                "id": contact.id,
                "name": contact.name,
                "urls": list(contact.urls),
                "ca": contact.ca is not None,
            }
            out.write(json.dumps(document, sort_keys=True) + "\n")
        return
    if not peers:
        out.write(
            f"no peers in {contacts.path} yet; add one with "
            f"`portal peers add IDENTITY-ID --name NAME --url https://...`\n"
        )
        return
    for contact in peers:
        out.write(f"{contact.name or '(no name)'}\n{_describe(contact)}")


def peersCommand(options: PeersOptions, out: TextIO, err: TextIO) -> int:
    """
    Run C{portal peers add|list|remove}.

    @return: The exit code: 0, or 1 when the contact list or a CA file cannot be used, or the
        peer to remove is not a contact.
    """
    sub = options.subOptions
    contacts = _contactList(sub["identity"] or options["identity"])
    try:
        if options.subCommand == "add":
            _add(sub, contacts, out)
        elif options.subCommand == "list":
            _list(sub, contacts, out)
        else:
            contact = contacts.remove(sub["id"])
            out.write(f"removed peer {contact.label}\n")
    except ContactsError as e:
        err.write(f"portal: {e}\n")
        return FAILURE
    return 0
