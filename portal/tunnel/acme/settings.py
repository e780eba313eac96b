"""
The C{--acme} options: which ACME directory, the contact address, a private CA to trust, and when to
renew.
"""

from __future__ import annotations

import os
import re

import attrs

from portal.trust.relayaddress import ConfigError

LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
"""
Let's Encrypt's production directory (C{--acme letsencrypt}).
"""

LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
"""
Let's Encrypt's staging directory (C{--acme letsencrypt-staging}): untrusted certificates, generous
rate limits, for trying things out.
"""

SHORTCUTS = {"letsencrypt": LETSENCRYPT, "letsencrypt-staging": LETSENCRYPT_STAGING}
"""
The names C{--acme} accepts instead of a directory URL.
"""

_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[smhd]?)\Z")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@attrs.frozen
class AcmeSettings:
    """
    How a tunnel gets its certificates from an ACME CA.

    @ivar directory: The ACME directory URL.
    @ivar email: The contact address given to the CA, or L{None}.
    @ivar caFile: A PEM file of CA certificates to verify the ACME server's HTTPS with (a company
        CA, a test server), or L{None} for the system's.
    @ivar renewBefore: Renew this many seconds before expiry, or L{None} to renew at two thirds of
        the lifetime.
    """

    directory: str
    email: str | None = None
    caFile: str | None = None
    renewBefore: float | None = None


def parseDuration(text: str, flag: str) -> float:
    """
    Parse a duration: a number of seconds, or a number followed by C{s}, C{m}, C{h} or C{d}.

    @param text: The duration as given.
    @param flag: The option, for the message.
    @return: Seconds, more than zero.
    @raise ConfigError: When malformed or zero.
    """
    match = _DURATION.match(text.strip().lower())
    if match is None or float(match.group("number")) <= 0:
        raise ConfigError(f"{flag} {text!r}: expected a duration like 30d, 12h, 90m or 600s")
    return float(match.group("number")) * _UNITS[match.group("unit")]


def parseAcme(
    acme: str | None,
    email: str | None = None,
    caFile: str | None = None,
    renewBefore: str | None = None,
) -> AcmeSettings | None:
    """
    Check the C{--acme} options.

    @param acme: C{--acme}: a directory URL (C{https://}, or C{http://} for a local test server),
        C{letsencrypt} or C{letsencrypt-staging}; L{None} without ACME.
    @param email: C{--acme-email}.
    @param caFile: C{--acme-ca}.
    @param renewBefore: C{--acme-renew-before}, a duration.
    @return: The settings, or L{None} without C{--acme}.
    @raise ConfigError: For a malformed option, or one of the others without C{--acme}.
    """
    if acme is None:
        for value, flag in (
            (email, "--acme-email"),
            (caFile, "--acme-ca"),
            (renewBefore, "--acme-renew-before"),
        ):
            if value is not None:
                raise ConfigError(f"{flag} needs --acme")
        return None
    directory = SHORTCUTS.get(acme.strip().lower(), acme.strip())
    if not re.match(r"https?://[^/\s]+", directory):
        raise ConfigError(
            f"--acme {acme!r}: expected an ACME directory URL (https://...), letsencrypt or "
            "letsencrypt-staging"
        )
    if email is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
        raise ConfigError(f"--acme-email {email!r}: expected an email address")
    if caFile is not None:
        if not os.path.isfile(caFile):
            raise ConfigError(f"--acme-ca {caFile!r}: no such file")
        caFile = os.path.abspath(caFile)
    return AcmeSettings(
        directory=directory,
        email=email,
        caFile=caFile,
        renewBefore=None
        if renewBefore is None
        else parseDuration(renewBefore, "--acme-renew-before"),
    )
