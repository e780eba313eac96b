"""
Lease names and the hostnames they appear under.

A lease name is a single DNS label; its public hostname is C{<label>.<tunnel-domain>}.  Without an
explicit name a tunnel uses L{stableLabel}, derived from its identity and target, so the same command
gives the same URL every time.
"""

from __future__ import annotations

import base64
import hashlib
import re
import string

#: Longest DNS label allowed (RFC 1035).
MAX_LABEL_LENGTH = 63

#: Number of base32 characters in a label made by L{stableLabel} (80 bits).
STABLE_LABEL_LENGTH = 16

_LABEL = re.compile(r"[A-Za-z0-9-]+")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


class InvalidName(ValueError):
    """
    A lease name is not usable as a DNS label; C{str()} of the exception gives the reason.
    """


def _asciiLower(text: str) -> str:
    """
    Lowercase the ASCII letters of C{text} and nothing else.

    Unicode lowercasing would map some non-ASCII characters (such as the Kelvin sign) to ASCII
    letters, letting two different strings name the same lease.

    @param text: The text to lowercase.
    @return: C{text} with C{A-Z} replaced by C{a-z}.
    """
    return text.translate(_ASCII_LOWER)


def validateLabel(label: str) -> str:
    """
    Check that a lease name is a single DNS label and normalise it.

    @param label: The requested name.
    @return: The name in lowercase.
    @raise InvalidName: If C{label} is empty, longer than 63 characters, contains anything but ASCII
        letters, digits and hyphens, or starts or ends with a hyphen.
    """
    prefix = f"lease name {label!r} is not a DNS label"
    if not isinstance(label, str):
        raise InvalidName(f"lease name {label!r} is not a string")
    if not label:
        raise InvalidName(f"{prefix}: it is empty")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidName(f"{prefix}: it is {len(label)} characters long, the limit is 63")
    if _LABEL.fullmatch(label) is None:
        raise InvalidName(f"{prefix}: use only letters a-z, digits 0-9 and '-'")
    if label.startswith("-") or label.endswith("-"):
        raise InvalidName(f"{prefix}: it may not start or end with '-'")
    return _asciiLower(label)


def normaliseHostname(hostname: str) -> str:
    """
    Put a hostname in the form used for comparisons.

    @param hostname: A hostname, for example from a TLS server name indication.
    @return: C{hostname} with ASCII letters lowercased and one trailing dot removed.
    """
    hostname = _asciiLower(hostname)
    if hostname.endswith("."):
        hostname = hostname[:-1]
    return hostname


def stableLabel(identityId: str, target: str) -> str:
    """
    Derive the default lease name for an identity publishing a target.

    @param identityId: The tunnel's identity id.
    @param target: The target as given on the command line.
    @return: The first 16 characters of the lowercase base32 encoding of
        C{sha256(identityId + "\\n" + target)}; always a valid label.
    """
    digest = hashlib.sha256(f"{identityId}\n{target}".encode()).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:STABLE_LABEL_LENGTH]


def leaseLabel(hostname: str, tunnelDomain: str) -> str | None:
    """
    Find the lease name a hostname refers to.

    @param hostname: The requested hostname, such as the SNI of a visitor's connection.
    @param tunnelDomain: The domain leases live under.
    @return: The label if C{hostname} is exactly one valid label followed by C{tunnelDomain}
        (compared case-insensitively, ignoring a trailing dot), else C{None}.
    """
    suffix = "." + normaliseHostname(tunnelDomain)
    hostname = normaliseHostname(hostname)
    if not hostname.endswith(suffix):
        return None
    label = hostname[: -len(suffix)]
    try:
        return validateLabel(label)
    except InvalidName:
        return None


def leaseHostname(label: str, tunnelDomain: str) -> str:
    """
    Build the public hostname of a lease.

    @param label: The lease name.
    @param tunnelDomain: The domain leases live under.
    @return: C{<label>.<tunnelDomain>}, normalised.
    @raise InvalidName: If C{label} is not a valid label.
    """
    return f"{validateLabel(label)}.{normaliseHostname(tunnelDomain)}"
