"""
The contact list: the other Portal owners ("peers") this Portal knows, each bound to the full id
of its identity.

A contact is an identity id (all 52 characters: a short prefix names no one in particular, so it
is refused), a name for humans, the peer's public URLs, needed to call it (an identity id says
who a peer is, not where its tunnel is reachable: no directory maps one to the other), and
optionally the certificate authority its tunnel's TLS certificates come from (a Portal's local
CA is not publicly trusted).

The list lives in C{peers.json} next to the identity file: JSON, mode 0600, written atomically,
changes serialised by a lock file.  It is read afresh whenever the file changes, so a contact
added or removed with C{portal peers} takes effect in a running tunnel at once.
"""

from __future__ import annotations

import base64
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
from cryptography import x509

from portal.trust.identity import ID_ALPHABET, ID_LENGTH, SHORT_ID_LENGTH, looksLikeIdentityId
from portal.trust.privatefiles import (
    PRIVATE_FILE_MODE,
    NotRegularFileError,
    PermissionsTooOpenError,
    makePrivateDirectories,
    openPrivateFile,
    writeFileAtomically,
)

#: The contact list's file name, in the directory of the identity file.
CONTACTS_FILE = "peers.json"

#: Version of the contact list format written by L{ContactList}.
FILE_VERSION = 1

#: Longest contact name.
MAX_NAME_LENGTH = 64

#: Most URLs one contact may have.
MAX_URLS = 16


class InvalidContact(ValueError):
    """
    A contact's id, name, URL or CA is malformed; the message says which and why.
    """


class ContactsError(Exception):
    """
    The contact list file cannot be read or written; the message says what to do.
    """


def validateIdentityId(text: str) -> str:
    """
    Check that C{text} is a full identity id.

    @param text: An identity id as a user typed it; surrounding spaces and upper case are
        forgiven.
    @return: The id, lowercase.
    @raise InvalidContact: If C{text} is a short id (a prefix; it names no one in particular) or
        not an identity id at all.
    """
    candidate = text.strip().lower()
    if candidate and set(candidate) <= ID_ALPHABET and len(candidate) < ID_LENGTH:
        raise InvalidContact(
            f"{text!r} is a short id ({len(candidate)} characters); a peer is identified by its "
            f"full {ID_LENGTH}-character identity id, which `portal identity show` prints on "
            f"the peer's machine"
        )
    if not looksLikeIdentityId(candidate):
        raise InvalidContact(
            f"{text!r} is not an identity id ({ID_LENGTH} characters from a-z and 2-7)"
        )
    # 52 base32 characters carry 260 bits, a SHA-256 256: the last character's low bits are 0.
    digest = base64.b32decode(candidate.upper() + "====")
    if base64.b32encode(digest).decode("ascii").rstrip("=").lower() != candidate:
        raise InvalidContact(f"{text!r} is not an identity id (it is not the base32 of a hash)")
    return candidate


def isShortId(text: str) -> bool:
    """
    @param text: Some text.
    @return: Whether C{text} looks like the short form of an identity id that humans are shown.
    """
    return len(text) == SHORT_ID_LENGTH and set(text) <= ID_ALPHABET


def validateName(text: str) -> str:
    """
    Check a contact's name.

    @param text: The name; surrounding spaces are removed.
    @return: The name.
    @raise InvalidContact: If it is longer than L{MAX_NAME_LENGTH} characters or holds control
        characters.
    """
    name = text.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidContact(f"--name: at most {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise InvalidContact("--name: control characters are not allowed")
    return name


def parsePeerURL(text: str) -> str:
    """
    Check and normalise a peer's public URL.

    @param text: C{https://HOST[:PORT]}, optionally with a trailing C{/}.
    @return: C{https://host} or C{https://host:port}: the host lowercased, port 443 left out.
    @raise InvalidContact: If the URL is not https, has user information, a path, a query or a
        fragment, or a malformed host or port.
    """
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as e:
        raise InvalidContact(f"--url {text!r}: {e}")
    if parts.scheme != "https":
        raise InvalidContact(f"--url {text!r}: must be an https:// URL (peers are called over TLS)")
    if parts.username is not None or parts.password is not None:
        raise InvalidContact(f"--url {text!r}: user information is not allowed")
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.strip()[-1] in "?#":
        raise InvalidContact(
            f"--url {text!r}: give the peer's origin only (https://HOST[:PORT]); the path is "
            f"part of each call"
        )
    host = parts.hostname or ""
    if not host:
        raise InvalidContact(f"--url {text!r}: no host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidContact(f"--url {text!r}: malformed IPv6 address")
        host = f"[{host}]"
    elif not host.isascii() or not all(c.isalnum() or c in "-." for c in host):
        raise InvalidContact(
            f"--url {text!r}: the host must be an ASCII name (use the IDNA form) or an address"
        )
    if port is None or port == 443:
        return f"https://{host}"
    if port == 0:
        raise InvalidContact(f"--url {text!r}: port 0 is not a port")
    return f"https://{host}:{port}"


def validateCA(pem: bytes, where: str = "--ca") -> str:
    """
    Check that C{pem} holds PEM certificates.

    @param pem: The file's contents.
    @param where: Where they came from, for messages.
    @return: The PEM text.
    @raise InvalidContact: If it holds no certificate, or a malformed one.
    """
    try:
        certificates = x509.load_pem_x509_certificates(pem)
        text = pem.decode("ascii")
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidContact(f"{where}: not a PEM certificate file ({e})")
    if not certificates:
        raise InvalidContact(f"{where}: no certificate found")
    return text


@attrs.frozen
class Contact:
    """
    Another Portal owner.

    @ivar id: The full id of the peer's identity.
    @ivar name: A name for humans, or C{""}.
    @ivar urls: The peer's public URLs (C{https://host[:port]}), in the order to try them; empty
        for a peer that only calls us.
    @ivar ca: PEM certificates to trust for TLS to L{urls} (the peer's local CA), or L{None} to
        trust the system's certificate authorities.
    """

    id: str
    name: str = ""
    urls: tuple[str, ...] = ()
    ca: str | None = None

    @classmethod
    def create(
        cls,
        identityId: str,
        name: str = "",
        urls: tuple[str, ...] | list[str] = (),
        ca: str | None = None,
    ) -> Contact:
        """
        Build a contact from what a user gave, checking every field.

        @raise InvalidContact: If a field is malformed.
        """
        normalised = tuple(dict.fromkeys(parsePeerURL(url) for url in urls))
        if len(normalised) > MAX_URLS:
            raise InvalidContact(f"--url: at most {MAX_URLS} URLs per peer")
        return cls(
            validateIdentityId(identityId),
            validateName(name),
            normalised,
            None if ca is None else validateCA(ca.encode("ascii", "replace")),
        )

    @property
    def label(self) -> str:
        """
        How to show this contact to humans: its name and short id, or the short id alone.
        """
        short = self.id[:SHORT_ID_LENGTH]
        return f"{self.name} ({short})" if self.name else short

    def toJSON(self) -> dict[str, Any]:
        """
        @return: This contact as a JSON object of the contact list file.
        """
        return {"id": self.id, "name": self.name, "urls": list(self.urls), "ca": self.ca}

    @classmethod
    def fromJSON(cls, document: Any) -> Contact:
        """
        Read a contact from the contact list file.

        @raise InvalidContact: If C{document} is not a valid contact.
        """
        if not isinstance(document, dict):
            raise InvalidContact("a contact must be a JSON object")
        name = document.get("name", "")
        urls = document.get("urls", [])
        ca = document.get("ca")
        if not isinstance(document.get("id"), str) or not isinstance(name, str):
            raise InvalidContact('"id" and "name" must be strings')
        if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
            raise InvalidContact('"urls" must be a list of strings')
        if ca is not None and not isinstance(ca, str):
            raise InvalidContact('"ca" must be a string of PEM certificates or null')
        return cls.create(document["id"], name, urls, ca)


def contactsPath(configDir: str) -> str:
    """
    @param configDir: The directory of the identity file (L{TunnelConfig.configDir
        <portal.tunnel.config.TunnelConfig.configDir>}).
    @return: The contact list file in it.
    """
    return os.path.join(configDir, CONTACTS_FILE)


class ContactList:
    """
    The contact list file: looked up by the gateway and the local peer endpoint, changed by
    C{portal peers}.

    Lookups read the file again only when it has changed (its inode, size or modification time),
    so a running tunnel sees C{portal peers add} and C{remove} at once.

    @ivar path: The file.
    """

    def __init__(self, path: str) -> None:
        """
        @param path: The contact list file; it need not exist yet (no contacts).
        """
        self.path = path
        self._stamp: tuple[int, ...] | None = None
        self._contacts: dict[str, Contact] = {}

    def get(self, identityId: str) -> Contact | None:
        """
        Look a peer up by its full identity id.

        @param identityId: The id.
        @return: The contact, or L{None} when that identity is not a contact.
        @raise ContactsError: If the file cannot be read or is not a valid contact list.
        """
        return self._current().get(identityId)

    def contacts(self) -> list[Contact]:
        """
        @return: Every contact, in the order they were added.
        @raise ContactsError: If the file cannot be read or is not a valid contact list.
        """
        return list(self._current().values())

    def add(self, contact: Contact, replace: bool = False) -> bool:
        """
        Add a contact, or replace the contact with the same id (all its fields).

        @param contact: The contact.
        @param replace: Whether a contact with the same id may be replaced.
        @return: Whether a contact was replaced.
        @raise ContactsError: If the id is a contact already and C{replace} is false, or the file
            cannot be read or written.
        """
        with self._locked():
            contacts = self._read()
            existing = contacts.get(contact.id)
            if existing is not None and not replace:
                raise ContactsError(
                    f"{contact.id} is a contact already ({existing.label}); give --replace to "
                    f"change its name, URLs or CA"
                )
            contacts[contact.id] = contact
            self._write(contacts)
        return existing is not None

    def update(
        self,
        identityId: str,
        name: str | None = None,
        urls: tuple[str, ...] | None = None,
        ca: str | None = None,
    ) -> Contact:
        """
        Change some fields of a contact, keeping the others.

        @param identityId: The contact's full identity id.
        @param name: The new name (checked), or L{None} to keep it.
        @param urls: The new URLs (checked, replacing all the old ones), or L{None} to keep them.
        @param ca: The new CA (checked), or L{None} to keep it.
        @return: The contact as changed.
        @raise ContactsError: If that identity is not a contact, or the file cannot be read or
            written.
        """
        with self._locked():
            contacts = self._read()
            contact = contacts.get(identityId)
            if contact is None:
                raise ContactsError(f"{identityId} is not a contact (see `portal peers list`)")
            contact = attrs.evolve(
                contact,
                name=contact.name if name is None else name,
                urls=contact.urls if urls is None else urls,
                ca=contact.ca if ca is None else ca,
            )
            contacts[identityId] = contact
            self._write(contacts)
        return contact

    def remove(self, identityId: str) -> Contact:
        """
        Remove a contact.

        @param identityId: Its full identity id.
        @return: The contact removed.
        @raise ContactsError: If that identity is not a contact, or the file cannot be read or
            written.
        """
        with self._locked():
            contacts = self._read()
            contact = contacts.pop(identityId, None)
            if contact is None:
                raise ContactsError(f"{identityId} is not a contact (see `portal peers list`)")
            self._write(contacts)
        return contact

    def _current(self) -> dict[str, Contact]:
        """
        @return: The contacts, read again if the file changed since it was last read.
        """
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._contacts = None, {}
            return self._contacts
        except OSError as e:
            raise ContactsError(f"Cannot read the contact list {self.path}: {e.strerror}.")
        stamp = (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        if stamp != self._stamp:
            self._contacts = self._read()
            self._stamp = stamp
        return self._contacts

    def _read(self) -> dict[str, Contact]:
        """
        Read and check the file.

        @return: The contacts by id, in file order; empty if there is no file.
        @raise ContactsError: If it cannot be read or is not a valid contact list.
        """
        try:
            with openPrivateFile(self.path) as f:
                content = f.read()
        except FileNotFoundError:
            return {}
        except PermissionsTooOpenError as e:
            raise ContactsError(
                f"The contact list {self.path} has mode {e.mode:04o}, so other users may change "
                f"who can call your apps as a peer. Run `chmod 600 {self.path}` and check its "
                f"contents with `portal peers list`."
            )
        except NotRegularFileError:
            raise ContactsError(f"The contact list {self.path} is not a regular file.")
        except OSError as e:
            raise ContactsError(f"Cannot read the contact list {self.path}: {e.strerror}.")
        fix = "Fix it, or move it away and add your peers again with `portal peers add`."
        try:
            document = json.loads(content)
        except (UnicodeDecodeError, ValueError):
            raise ContactsError(f"The contact list {self.path} is not valid JSON. {fix}")
        if not isinstance(document, dict) or document.get("version") != FILE_VERSION:
            raise ContactsError(
                f"The contact list {self.path} is not a version {FILE_VERSION} contact list. {fix}"
            )
        entries = document.get("peers")
        if not isinstance(entries, list):
            raise ContactsError(f'The contact list {self.path} has no "peers" list. {fix}')
        contacts: dict[str, Contact] = {}
        for index, entry in enumerate(entries):
            try:
                contact = Contact.fromJSON(entry)
            except InvalidContact as e:
                raise ContactsError(f"Peer {index + 1} in the contact list {self.path}: {e}. {fix}")
            contacts[contact.id] = contact
        return contacts

    def _write(self, contacts: dict[str, Contact]) -> None:
        """
        Write the file atomically with mode 0600.

        @raise ContactsError: If it cannot be written.
        """
        document = {
            "version": FILE_VERSION,
            "peers": [contact.toJSON() for contact in contacts.values()],
        }
        content = (json.dumps(document, indent=2) + "\n").encode("utf-8")
        try:
            writeFileAtomically(self.path, content, PRIVATE_FILE_MODE)
        except OSError as e:
            raise ContactsError(f"Cannot write the contact list {self.path}: {e.strerror or e}.")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """
        Hold an exclusive lock on C{.peers.json.lock} beside the file, so that two C{portal peers}
        commands at once do not lose each other's change.

        @raise ContactsError: If the directory or the lock file cannot be created.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        lockPath = os.path.join(directory, f".{os.path.basename(self.path)}.lock")
        try:
            makePrivateDirectories(directory)
            fd = os.open(lockPath, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
        except OSError as e:
            raise ContactsError(f"Cannot lock the contact list {self.path}: {e.strerror or e}.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
