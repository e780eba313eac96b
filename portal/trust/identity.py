"""
secp256k1 identities for tunnels and relays.

An identity is a secp256k1 private key.  Its id is derived from the compressed public key and is safe
to use as a DNS label; lease ownership and relay pinning are both keyed on it.  The private key lives
in a JSON file that only its owner may read (mode 0600); loading refuses, with a message saying what
to do, any file that is missing, readable by others, or inconsistent, rather than silently replacing
it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from typing import Any

import attrs
import coincurve

from portal.trust.privatefiles import (
    PRIVATE_FILE_MODE,
    NotRegularFileError,
    PermissionsTooOpenError,
    makePrivateDirectories,
    openPrivateFile,
    writeFileAtomically,
)

#: Length in bytes of a compressed secp256k1 public key.
PUBLIC_KEY_LENGTH = 33

#: Length in bytes of a secp256k1 private key.
PRIVATE_KEY_LENGTH = 32

#: Version of the identity file format written by L{saveIdentity}.
FILE_VERSION = 1

#: Key type recorded in identity files.
KEY_TYPE = "secp256k1"

#: Number of characters of an identity id shown to humans.
SHORT_ID_LENGTH = 12
#: Number of characters of a full identity id (L{identityId}).
ID_LENGTH = 52
#: The characters of an identity id: the lowercase RFC 4648 base32 alphabet.
ID_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


class IdentityError(Exception):
    """
    An identity file could not be used; the message says what is wrong and what to do about it.
    """


def identityId(publicKey: bytes) -> str:
    """
    Derive the id of an identity from its public key.

    @param publicKey: The 33-byte compressed secp256k1 public key.
    @return: The lowercase, unpadded RFC 4648 base32 encoding of the SHA-256 of C{publicKey}: 52
        characters from C{[a-z2-7]}, usable as a DNS label.
    """
    digest = hashlib.sha256(publicKey).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def looksLikeIdentityId(text: str) -> bool:
    """
    @param text: Some text.
    @return: Whether C{text} has the form of a full identity id: L{ID_LENGTH} characters of
        L{ID_ALPHABET}.
    """
    return len(text) == ID_LENGTH and set(text) <= ID_ALPHABET


def shortId(fullId: str) -> str:
    """
    Shorten an identity id for display to humans.

    @param fullId: An id as returned by L{identityId}.
    @return: The first 12 characters of C{fullId}.
    """
    return fullId[:SHORT_ID_LENGTH]


def verifySignature(publicKey: bytes, signature: bytes, message: bytes) -> bool:
    """
    Check an ECDSA signature made by L{Identity.sign}.

    @param publicKey: The signer's 33-byte compressed public key.
    @param signature: A DER-encoded ECDSA signature over the SHA-256 of C{message}.
    @param message: The signed message.
    @return: C{True} if the signature is valid for this key and message; C{False} otherwise,
        including when the key or signature is malformed (this function never raises for those).
    """
    if not isinstance(publicKey, bytes) or len(publicKey) != PUBLIC_KEY_LENGTH:
        return False
    if not isinstance(signature, bytes) or not isinstance(message, bytes):
        return False
    try:
        return bool(coincurve.verify_signature(signature, message, publicKey))
    except (ValueError, TypeError):
        return False


@attrs.frozen(eq=False)
class Identity:
    """
    A secp256k1 key pair identifying a tunnel or a relay.

    @ivar privateKey: The private key; never logged, shown in C{repr}, or sent anywhere.
    """

    privateKey: coincurve.PrivateKey = attrs.field(repr=False)

    @classmethod
    def generate(cls) -> Identity:
        """
        Create a new identity from a fresh random key.

        @return: The new identity.
        """
        return cls(coincurve.PrivateKey(secrets.token_bytes(PRIVATE_KEY_LENGTH)))

    @property
    def publicKey(self) -> bytes:
        """
        The 33-byte compressed public key of this identity.
        """
        return self.privateKey.public_key.format(compressed=True)

    @property
    def id(self) -> str:
        """
        The 52-character DNS-safe id of this identity; see L{identityId}.
        """
        return identityId(self.publicKey)

    @property
    def shortId(self) -> str:
        """
        The 12-character form of L{id} printed for humans.
        """
        return shortId(self.id)

    def sign(self, message: bytes) -> bytes:
        """
        Sign a message with this identity's private key.

        @param message: The message to sign.
        @return: A DER-encoded ECDSA signature over the SHA-256 of C{message}, which
            L{verifySignature} accepts with L{publicKey}.
        """
        return self.privateKey.sign(message)

    def __repr__(self) -> str:
        """
        Show the identity's id, never its private key.

        @return: A short description naming the id.
        """
        return f"<Identity {self.id}>"


def defaultIdentityPath() -> str:
    """
    Find where the identity file lives when no path is given.

    @return: C{$XDG_CONFIG_HOME/portal/identity.json} when C{XDG_CONFIG_HOME} is set to an absolute
        path, else C{~/.config/portal/identity.json}.
    """
    configHome = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(configHome):
        configHome = os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(configHome, "portal", "identity.json")


def _alreadyExists(path: str) -> IdentityError:
    """
    Describe a refusal to replace an existing identity file.

    @param path: The existing file.
    @return: The error to raise.
    """
    return IdentityError(
        f"An identity file already exists at {path}; refusing to replace it. "
        f"Move it away first if you really want a new identity."
    )


def saveIdentity(identity: Identity, path: str, overwrite: bool = False) -> None:
    """
    Write an identity to a file that only its owner can read.

    Missing parent directories are created with mode 0700.  The file is written atomically: the JSON
    goes to a temporary file (created with mode 0600) in the same directory, which is flushed to disk
    and then moved into place, so a reader sees either the old file or the complete new one.

    @param identity: The identity to save.
    @param path: Where to save it.
    @param overwrite: Whether an existing file at C{path} may be replaced.
    @raise IdentityError: If C{path} exists and C{overwrite} is false.
    """
    if not overwrite and os.path.lexists(path):
        raise _alreadyExists(path)
    directory = os.path.dirname(os.path.abspath(path))
    document = {
        "version": FILE_VERSION,
        "type": KEY_TYPE,
        "privateKey": identity.privateKey.secret.hex(),
        "publicKey": identity.publicKey.hex(),
        "id": identity.id,
    }
    content = (json.dumps(document, indent=2) + "\n").encode("ascii")
    try:
        makePrivateDirectories(directory)
        writeFileAtomically(path, content, PRIVATE_FILE_MODE, overwrite=overwrite)
    except FileExistsError:
        # Another process created the file since the check above.
        raise _alreadyExists(path)
    except OSError as e:
        raise IdentityError(
            f"Cannot write the identity file {path}: {e.strerror or e}. "
            f"Check that its directory is writable, or choose another path with --identity."
        )


def _readPrivateFile(path: str) -> bytes:
    """
    Read a file after checking that neither group nor others can access it.

    @param path: The file to read.
    @return: Its contents.
    @raise IdentityError: If the file is missing, unreadable, or accessible by group or others.
    """
    try:
        privateFile = openPrivateFile(path)
    except FileNotFoundError:
        raise IdentityError(
            f"No identity file at {path}. Create one with `portal identity new`, "
            f"or point --identity at an existing file."
        )
    except NotRegularFileError:
        raise IdentityError(f"The identity file {path} is not a regular file.")
    except PermissionsTooOpenError as e:
        raise IdentityError(
            f"The identity file {path} has mode {e.mode:04o}, so other users may read or change "
            f"the private key. Run `chmod 600 {path}` and, if anyone else could have read it, "
            f"create a new identity."
        )
    except OSError as e:
        raise IdentityError(f"Cannot open the identity file {path}: {e.strerror}.")
    with privateFile:
        try:
            return privateFile.read()
        except OSError as e:
            raise IdentityError(f"Cannot read the identity file {path}: {e.strerror}.")


def _parseIdentity(path: str, content: bytes) -> Identity:
    """
    Check and decode the contents of an identity file.

    @param path: The file's path, for error messages.
    @param content: The file's contents.
    @return: The identity it holds.
    @raise IdentityError: If the contents are not a consistent version 1 secp256k1 identity.
    """
    fix = "Restore it from a backup, or move it away and run `portal identity new`."
    try:
        document: Any = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise IdentityError(f"The identity file {path} is not valid JSON. {fix}")
    if not isinstance(document, dict):
        raise IdentityError(f"The identity file {path} does not hold a JSON object. {fix}")
    if document.get("version") != FILE_VERSION:
        raise IdentityError(
            f"The identity file {path} has version {document.get('version')!r}; this Portal "
            f"reads version {FILE_VERSION}. {fix}"
        )
    if document.get("type") != KEY_TYPE:
        raise IdentityError(
            f"The identity file {path} holds a key of type {document.get('type')!r}, "
            f"not {KEY_TYPE!r}. {fix}"
        )
    secretHex = document.get("privateKey")
    try:
        if not isinstance(secretHex, str):
            raise ValueError("not a string")
        secret = bytes.fromhex(secretHex)
        if len(secret) != PRIVATE_KEY_LENGTH:
            raise ValueError("wrong length")
        identity = Identity(coincurve.PrivateKey(secret))
    except ValueError:
        raise IdentityError(
            f"The identity file {path} does not hold a valid secp256k1 private key "
            f"(64 hex digits). {fix}"
        )
    publicHex = document.get("publicKey")
    if publicHex is not None and publicHex != identity.publicKey.hex():
        raise IdentityError(
            f"The publicKey in the identity file {path} does not belong to its private key; "
            f"the file has been damaged or edited. {fix}"
        )
    recordedId = document.get("id")
    if recordedId is not None and recordedId != identity.id:
        raise IdentityError(
            f"The id in the identity file {path} does not belong to its private key; "
            f"the file has been damaged or edited. {fix}"
        )
    return identity


def loadIdentity(path: str) -> Identity:
    """
    Load an identity written by L{saveIdentity}.

    The C{publicKey} and C{id} fields are optional, but when present must match the private key.

    @param path: The identity file.
    @return: The identity it holds.
    @raise IdentityError: If the file is missing, accessible by group or others, not JSON, of
        another version or key type, holds a malformed key, or records a public key or id that does
        not belong to its private key.  The file is never replaced.
    """
    return _parseIdentity(path, _readPrivateFile(path))


def loadOrCreateIdentity(path: str) -> tuple[Identity, bool]:
    """
    Load the identity at C{path}, creating and saving a new one if no file exists there.

    An existing but unusable file is reported, never replaced.

    @param path: The identity file.
    @return: The identity, and whether it was just created.
    @raise IdentityError: If an existing file cannot be used, see L{loadIdentity}.
    """
    if not os.path.lexists(path):
        identity = Identity.generate()
        try:
            saveIdentity(identity, path)
        except IdentityError:
            if not os.path.lexists(path):
                raise
            # Another process created it first; use theirs.
            return loadIdentity(path), False
        return identity, True
    return loadIdentity(path), False
