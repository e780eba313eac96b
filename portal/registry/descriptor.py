"""
A relay's signed descriptor of itself, served at C{/.well-known/portal-relay.json} on the relay's own
hostname, so that a registry entry can be checked against the relay it names.

The descriptor is a JSON object (identity, domains, ports, modes, software, issue time) signed by the
relay's identity key over L{DESCRIPTOR_PURPOSE} followed by the object's canonical JSON encoding (keys
sorted, no whitespace, ASCII). It is specified in C{docs/registry.md}.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import attrs

from portal.trust.identity import PUBLIC_KEY_LENGTH, Identity, identityId, verifySignature

#: Where a relay serves its descriptor.
DESCRIPTOR_PATH = "/.well-known/portal-relay.json"
#: The descriptor format version this code writes and reads.
DESCRIPTOR_VERSION = 1
#: Domain separation prefix of the descriptor signature.
DESCRIPTOR_PURPOSE = b"portal-relay-descriptor-v1\0"
#: Largest descriptor document read, in bytes.
MAX_DESCRIPTOR_BYTES = 64 * 1024
#: Seconds a descriptor stays acceptable after it was issued (relays sign one per request).
MAX_AGE = 86400.0
#: Seconds a descriptor's issue time may lie in the future (clock differences).
MAX_CLOCK_SKEW = 300.0


class DescriptorError(ValueError):
    """
    A relay descriptor is malformed, does not verify, is not the expected relay's, or is stale; the
    message says which.
    """


@attrs.frozen
class RelayDescriptor:
    """
    What a relay says about itself.

    @ivar id: The relay's identity id.
    @ivar publicKey: Its 33-byte compressed public key (the id is derived from it).
    @ivar domain: The relay's own hostname (C{--domain}).
    @ivar tunnelDomain: Lease hostnames are C{<label>.<tunnelDomain>}.
    @ivar publicPort: The port of its public TLS listener.
    @ivar controlPort: The port of its control listener, as bound.
    @ivar modes: The modes it offers: C{stream}, and C{tcp} / C{udp} when their port ranges are set.
    @ivar tcpPorts: The raw TCP lease port range C{"LO-HI"}, or L{None}.
    @ivar udpPorts: The UDP lease port range C{"LO-HI"}, or L{None}.
    @ivar software: The relay's software and version, C{portal-relay/0.1.0}.
    @ivar issued: When the descriptor was signed, in whole seconds since the epoch.
    """

    id: str
    publicKey: bytes
    domain: str
    tunnelDomain: str
    publicPort: int
    controlPort: int
    modes: tuple[str, ...]
    tcpPorts: str | None
    udpPorts: str | None
    software: str
    issued: int

    def fields(self) -> dict[str, Any]:
        """
        @return: The signed JSON object.
        """
        return {
            "version": DESCRIPTOR_VERSION,
            "id": self.id,
            "publicKey": self.publicKey.hex(),
            "domain": self.domain,
            "tunnelDomain": self.tunnelDomain,
            "publicPort": self.publicPort,
            "controlPort": self.controlPort,
            "modes": list(self.modes),
            "tcpPorts": self.tcpPorts,
            "udpPorts": self.udpPorts,
            "software": self.software,
            "issued": self.issued,
        }


def signedMessage(fields: dict[str, Any]) -> bytes:
    """
    The bytes a descriptor's signature covers.

    @param fields: The descriptor's JSON object.
    @return: L{DESCRIPTOR_PURPOSE} followed by the canonical JSON of C{fields}: keys sorted, no
        whitespace, non-ASCII characters escaped.
    @raise ValueError: When C{fields} holds a value JSON cannot encode (NaN, infinity).
    """
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return DESCRIPTOR_PURPOSE + canonical.encode("ascii")


def signDescriptor(identity: Identity, descriptor: RelayDescriptor) -> bytes:
    """
    Sign a descriptor with the relay's identity.

    @param identity: The relay's identity; its key must be the descriptor's.
    @param descriptor: What the relay says about itself.
    @return: The document to serve: C{{"descriptor": {...}, "signature": BASE64}}, UTF-8 JSON.
    """
    if descriptor.publicKey != identity.publicKey or descriptor.id != identity.id:
        raise ValueError("the descriptor names another identity than the signing one")
    fields = descriptor.fields()
    signature = identity.sign(signedMessage(fields))
    document = {"descriptor": fields, "signature": base64.b64encode(signature).decode("ascii")}
    return json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def _isInt(value: object) -> bool:
    """
    @return: Whether C{value} is a JSON integer (not a boolean).
    """
    return isinstance(value, int) and not isinstance(value, bool)


def _field(fields: dict[str, Any], name: str, check: Any, what: str) -> Any:
    """
    Get one field of a descriptor, checked.

    @raise DescriptorError: When it is missing or fails C{check}.
    """
    if name not in fields:
        raise DescriptorError(f'the descriptor has no "{name}"')
    value = fields[name]
    if not check(value):
        raise DescriptorError(f'the descriptor\'s "{name}" is not {what}: {value!r}')
    return value


def verifyDescriptor(content: bytes, expectedId: str, now: float | None = None) -> RelayDescriptor:
    """
    Check a descriptor document against the relay it should describe.

    Checked, in order: the document's shape; the format version; the public key; the signature over
    the canonical encoding of the C{descriptor} object; that the id belongs to the public key; that
    it is C{expectedId}; the fields' types; and, when C{now} is given, that it was issued at most
    L{MAX_AGE} seconds ago and at most L{MAX_CLOCK_SKEW} seconds ahead. Unknown fields are covered by
    the signature and otherwise ignored.

    @param content: The document, as served.
    @param expectedId: The relay id it must be for (from a registry entry, or C{--relay ...#ID}).
    @param now: The current time in seconds since the epoch, to check freshness; L{None} skips it.
    @return: The descriptor.
    @raise DescriptorError: Saying which check failed.
    """
    try:
        document: Any = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DescriptorError(f"not a JSON document: {e}")
    if not isinstance(document, dict):
        raise DescriptorError("not a descriptor document (expected a JSON object)")
    fields = document.get("descriptor")
    signature = document.get("signature")
    if not isinstance(fields, dict) or not isinstance(signature, str):
        raise DescriptorError('expected an object with "descriptor" (an object) and "signature"')
    version = fields.get("version")
    if version != DESCRIPTOR_VERSION or not _isInt(version):
        raise DescriptorError(
            f"descriptor version {version!r}; this Portal reads version {DESCRIPTOR_VERSION}"
        )
    publicKeyHex = _field(fields, "publicKey", lambda v: isinstance(v, str), "hex")
    try:
        publicKey = bytes.fromhex(publicKeyHex)
        signatureBytes = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        raise DescriptorError("the public key or the signature is not well encoded")
    if len(publicKey) != PUBLIC_KEY_LENGTH:
        raise DescriptorError("the public key is not a compressed secp256k1 key")
    try:
        message = signedMessage(fields)
    except ValueError:
        raise DescriptorError("the descriptor holds a value with no canonical encoding")
    if not verifySignature(publicKey, signatureBytes, message):
        raise DescriptorError("the signature does not verify for the descriptor's public key")
    relayId = _field(fields, "id", lambda v: isinstance(v, str), "a string")
    if relayId != identityId(publicKey):
        raise DescriptorError("the descriptor's id does not belong to its public key")
    if relayId != expectedId:
        raise DescriptorError(f"the descriptor is relay {relayId}'s, not {expectedId}'s")

    def port(value: object) -> bool:
        return _isInt(value) and 0 < value <= 65535  # type: ignore[operator]

    def text(value: object) -> bool:
        return isinstance(value, str)

    def optionalText(value: object) -> bool:
        return value is None or isinstance(value, str)

    def modes(value: object) -> bool:
        # Modes this code does not know may come from a newer relay: kept, never matched.
        return isinstance(value, list) and all(isinstance(m, str) for m in value)

    descriptor = RelayDescriptor(
        id=relayId,
        publicKey=publicKey,
        domain=_field(fields, "domain", text, "a string"),
        tunnelDomain=_field(fields, "tunnelDomain", text, "a string"),
        publicPort=_field(fields, "publicPort", port, "a port number"),
        controlPort=_field(fields, "controlPort", port, "a port number"),
        modes=tuple(_field(fields, "modes", modes, "a list of mode names")),
        tcpPorts=_field(fields, "tcpPorts", optionalText, "a port range or null"),
        udpPorts=_field(fields, "udpPorts", optionalText, "a port range or null"),
        software=_field(fields, "software", text, "a string"),
        issued=_field(fields, "issued", _isInt, "a whole number of seconds"),
    )
    if now is not None:
        if descriptor.issued < now - MAX_AGE:
            raise DescriptorError(
                f"the descriptor was issued {now - descriptor.issued:.0f} s ago (stale)"
            )
        if descriptor.issued > now + MAX_CLOCK_SKEW:
            raise DescriptorError(
                f"the descriptor was issued {descriptor.issued - now:.0f} s in the future"
            )
    return descriptor
