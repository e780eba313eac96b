"""
HTTP Basic authentication in front of routed HTTP mode (RFC 7617): C{--basic-auth USER:PASS} and
C{--basic-auth-file FILE}, a file of C{USER:BCRYPT-HASH} lines as C{htpasswd -nB} writes them.

A pure check on a request's headers: L{BasicAuth.check} answers L{None} (let the request through)
or the L{GatewayResponse} to send instead (401 with a challenge, 429 after too many wrong attempts).
Passwords given in clear are kept only as SHA-256 digests of C{USER:PASS} and compared in constant
time (L{hmac.compare_digest}, every entry compared); hashed entries are checked with C{bcrypt}, also
for an unknown user (against a dummy hash), so timing says nothing about which users exist. A
bcrypt check costs tens of milliseconds, so wrong attempts are limited per visitor address and in
total (L{AttemptLimiter}), and each credential that passed is remembered (as a digest, at most
L{MAX_REMEMBERED}) so a browser's repeated header costs one check.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Sequence

import attrs
import bcrypt
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from portal.forwarding.logthrottle import LogThrottle
from portal.gateway.caller import GatewayResponse
from portal.gateway.pairing import AttemptLimiter, TooManyAttempts

#: Wrong credentials allowed per visitor address (an IPv6 visitor's /64) in L{WINDOW}.
WRONG_PER_ADDRESS = 10
#: Wrong credentials allowed from all visitors together in L{WINDOW}.
WRONG_TOTAL = 100
#: Seconds over which wrong credentials are counted.
WINDOW = 60.0
#: Credentials that passed, remembered so that they are not checked again.
MAX_REMEMBERED = 1024
#: Least seconds between two log events about refused credentials.
LOG_INTERVAL = 10.0
#: The realm in the challenge.
REALM = "portal"


@functools.cache
def _dummyHash() -> bytes:
    """
    @return: A bcrypt hash to check unknown users' passwords against (made once, when needed).
    """
    return bcrypt.hashpw(b"portal-dummy-password", bcrypt.gensalt(rounds=10))


class CredentialError(ValueError):
    """
    A credential or a credentials file is malformed; the message says where and why.
    """


@attrs.frozen
class Credential:
    """
    One user allowed through.

    @ivar user: The user name.
    @ivar digest: SHA-256 of C{USER:PASS}, for a password given in clear; else L{None}.
    @ivar hashed: The bcrypt hash of the password, for an entry of a file; else L{None}.
    """

    user: str
    digest: bytes | None = None
    hashed: bytes | None = None


def _pairDigest(user: str, password: str) -> bytes:
    """
    @return: SHA-256 of C{USER:PASS} in UTF-8.
    """
    return hashlib.sha256(f"{user}:{password}".encode()).digest()


def parseCredential(text: str) -> Credential:
    """
    Parse C{USER:PASS} (the password may contain colons; the user may not).

    @raise CredentialError: Without a colon, or with an empty user or password.
    """
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise CredentialError("--basic-auth: expected USER:PASS, both non-empty")
    return Credential(user, digest=_pairDigest(user, password))


def parseCredentialsFile(text: str, path: str) -> tuple[Credential, ...]:
    """
    Parse a file of C{USER:HASH} lines, HASH from bcrypt (C{$2a$}, C{$2b$}, C{$2y$}: what
    C{htpasswd -nB USER} prints). Blank lines and lines starting with C{#} are skipped.

    @param path: The file's name, for messages.
    @raise CredentialError: Naming the line of an entry that is not C{USER:BCRYPT-HASH}.
    """
    credentials = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, _, hashed = line.partition(":")
        if not user or not hashed.startswith(("$2a$", "$2b$", "$2y$")) or len(hashed) != 60:
            raise CredentialError(
                f"--basic-auth-file {path}:{number}: expected USER:BCRYPT-HASH (as written by "
                "htpasswd -nB USER)"
            )
        credentials.append(Credential(user, hashed=hashed.encode("ascii")))
    if not credentials:
        raise CredentialError(f"--basic-auth-file {path}: no USER:BCRYPT-HASH entry")
    return tuple(credentials)


def loadCredentialsFile(path: str) -> tuple[Credential, ...]:
    """
    Read L{parseCredentialsFile}'s format from a file.

    @raise CredentialError: When the file cannot be read or is malformed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialError(f"--basic-auth-file {path}: cannot read it: {e}")
    return parseCredentialsFile(text, path)


def challenge(message: str, status: int = 401, **extra: str) -> GatewayResponse:
    """
    @return: A small page refusing the request, with the Basic challenge.
    """
    headers = [
        (b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode()),
        (b"content-type", b"text/plain; charset=utf-8"),
    ]
    headers += [(name.lower().encode(), value.encode()) for name, value in extra.items()]
    return GatewayResponse(status, tuple(headers), message.encode() + b"\n")


class BasicAuth:
    """
    The check of one tunnel's credentials.

    @ivar credentials: Who may pass.
    @ivar limiter: The limit on wrong attempts.
    """

    _log = Logger()

    def __init__(self, credentials: Sequence[Credential], clock: IReactorTime) -> None:
        """
        @param credentials: Who may pass; at least one.
        @param clock: The source of the current time.
        """
        self.credentials = tuple(credentials)
        self.limiter = AttemptLimiter(
            clock, WRONG_PER_ADDRESS, WRONG_TOTAL, WINDOW, noun="credentials"
        )
        self._passed: OrderedDict[bytes, None] = OrderedDict()
        self._refusedLog = LogThrottle(clock, LOG_INTERVAL)

    def check(self, headers: Sequence[tuple[bytes, bytes]], host: str) -> GatewayResponse | None:
        """
        Judge a request's C{Authorization} header.

        @param headers: The request's headers.
        @param host: The visitor's address (for the attempt limit and the log).
        @return: L{None} to let the request through, else the answer to send.
        """
        values = [v for name, v in headers if name.lower() == b"authorization"]
        if not values:
            return challenge("This tunnel needs a user name and password.")
        key = hashlib.sha256(b"\0".join(values)).digest()
        if key in self._passed:
            self._passed.move_to_end(key)
            return None
        try:
            self.limiter.check(host)
        except TooManyAttempts as e:
            return challenge(str(e), 429, **{"Retry-After": str(int(e.retryAfter))})
        user = self._verified(values)
        if user is None:
            self.limiter.failed(host)
            held = self._refusedLog.due()
            if held is not None:
                self._log.warn(
                    "refused wrong credentials from {peer} ({held} more since the last message)",
                    peer=host,
                    held=held,
                )
            return challenge("Wrong user name or password.")
        self._passed[key] = None
        while len(self._passed) > MAX_REMEMBERED:
            self._passed.popitem(last=False)
        return None

    def _verified(self, values: Sequence[bytes]) -> str | None:
        """
        @return: The user whose credentials the one C{Authorization} value carries, or L{None}.
        """
        if len(values) != 1:
            return None
        scheme, _, encoded = values[0].strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, colon, password = decoded.partition(":")
        if not colon:
            return None
        digest = _pairDigest(user, password)
        found = None
        for credential in self.credentials:
            # Every entry is compared, so the time taken does not say which one matched.
            if credential.digest is not None and hmac.compare_digest(credential.digest, digest):
                found = credential.user
        if found is not None or not any(c.hashed for c in self.credentials):
            return found
        hashed = [c.hashed for c in self.credentials if c.hashed is not None and c.user == user]
        # An unknown user costs a check too, so that timing does not tell which users exist.
        if bcrypt.checkpw(password.encode(), hashed[0] if hashed else _dummyHash()) and hashed:
            return user
        return None
