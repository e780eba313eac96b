"""
Requests between peers, signed with the caller's Portal identity: HTTP Message Signatures
(RFC 9421) over the method, authority, path, query and the C{Content-Digest} (RFC 9530) of the body.

The signer (the local peer endpoint, L{portal.gateway.peerendpoint}) adds four header fields:

    Content-Digest: sha-256=:<base64 SHA-256 of the body>:
    Signature-Input: portal=("@method" "@authority" "@path" "@query" "content-digest");
        created=<unix time>;nonce="<random>";keyid="<full identity id>";
        alg="ecdsa-secp256k1-sha256";tag="portal-peer"
    Signature: portal=:<base64 r||s>:
    Portal-Peer-Key: :<base64 compressed public key>:

secp256k1 is not in RFC 9421's algorithm registry, so the algorithm is named
C{ecdsa-secp256k1-sha256} here and defined like the registry's C{ecdsa-p256-sha256}: ECDSA over the
SHA-256 of the signature base, the signature sent as the 64 bytes r||s.  An identity id is a hash of
the public key, which cannot be recovered from it, so the key travels in C{Portal-Peer-Key} and the
verifier checks that it hashes to C{keyid}.

L{PeerAuthenticator} is the gateway's L{Authenticator <portal.gateway.caller.Authenticator>} for
peers: it rebuilds the signature base from the request the gateway received (and the body it
buffered), and answers with a C{peer} L{Caller} for a good signature by a contact.  docs/peers.md
describes the format and the threat model.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import secrets
from collections.abc import Container
from typing import Any, Protocol

import attrs
import http_sf
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from portal.gateway.caller import AuthenticationFailed, Caller, GatewayRequest
from portal.gateway.contacts import Contact, ContactsError
from portal.trust.identity import PUBLIC_KEY_LENGTH, Identity, identityId, verifySignature

#: The signature algorithm's name (not in RFC 9421's registry; see the module docstring).
ALGORITHM = "ecdsa-secp256k1-sha256"

#: The label of Portal's signature in C{Signature-Input} and C{Signature}.
LABEL = "portal"

#: The C{tag} parameter: says the signature is for a call between peers, and nothing else.
TAG = "portal-peer"

#: The header field carrying the signer's compressed public key.
KEY_HEADER = b"portal-peer-key"

#: The components every Portal signature covers, in this order.
COVERED_COMPONENTS = ("@method", "@authority", "@path", "@query", "content-digest")

#: The header fields that carry a peer's credentials; the gateway strips them before the app.
#: C{Content-Digest} is not among them: it describes the body, which reaches the app unchanged.
CREDENTIAL_HEADERS = frozenset({b"signature", b"signature-input", KEY_HEADER})

#: Seconds a signature's C{created} time may be from the verifier's clock, either way.
WINDOW = 300

#: Random bytes in a nonce made by L{signRequest}.
NONCE_BYTES = 16

#: Shortest and longest nonce a verifier accepts, in characters.
MIN_NONCE_LENGTH = 16
MAX_NONCE_LENGTH = 128

#: Most (keyid, nonce) pairs a L{ReplayCache} holds by default.
REPLAY_CACHE_SIZE = 100_000

#: Length of a signature: r and s, 32 bytes each.
SIGNATURE_LENGTH = 64

#: The parameters of a Portal signature.
_PARAMETERS = frozenset({"created", "nonce", "keyid", "alg", "tag"})


class ContactLookup(Protocol):
    """
    Where the authenticator looks callers up: a L{ContactList <portal.gateway.contacts.ContactList>}.
    """

    def get(self, identityId: str) -> Contact | None:
        """
        @return: The contact with this full identity id, or L{None}.
        @raise ContactsError: If the contacts cannot be read.
        """


def contentDigest(body: bytes) -> str:
    """
    @param body: A message body, exactly as sent.
    @return: Its C{Content-Digest} field value (RFC 9530): C{sha-256=:<base64>:}.
    """
    return http_sf.ser({"sha-256": (hashlib.sha256(body).digest(), {})})


def normalizeAuthority(authority: bytes | str) -> str:
    """
    Normalise an authority for C{@authority} (RFC 9421 section 2.2.3): lowercase, and without the
    default port, 443 (peers are always called over https).

    @param authority: C{host[:port]}, from a URL or a C{Host}/C{:authority} field.
    @return: The normalised authority.
    @raise ValueError: If it is empty, not ASCII, or holds characters an authority cannot.
    """
    text = authority.decode("ascii") if isinstance(authority, bytes) else authority
    text = text.strip().lower()
    if not text or not text.isascii() or any(c in text for c in "/?#@ \t\r\n,\\\"'"):
        raise ValueError(f"{text!r} is not an authority")
    if text.endswith(":443"):
        text = text[: -len(":443")]
    return text


def authorityHost(authority: str) -> str:
    """
    @param authority: A normalised authority (L{normalizeAuthority}).
    @return: Its host, without the port; an IPv6 address without its brackets.
    """
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.rpartition(":")[0] if ":" in authority else authority


def splitTarget(target: bytes) -> tuple[str, str]:
    """
    Split a request target into the values of C{@path} and C{@query} (RFC 9421 sections 2.2.6 and
    2.2.7), without decoding them.

    @param target: The request target in origin form: C{/path?query}.
    @return: The path (C{/} when empty) and the query with its leading C{?}, or C{?} alone when
        there is no query.
    @raise ValueError: If the target is not ASCII or not in origin form.
    """
    text = target.decode("ascii")
    path, _, query = text.partition("?")
    path = path or "/"
    if not path.startswith("/") or "#" in text:
        raise ValueError(f"{text!r} is not an origin-form request target")
    return path, "?" + query


@attrs.frozen
class SignatureParameters:
    """
    The parameters of a Portal signature, which are signed too (C{@signature-params}).

    @ivar created: When the signature was made, in seconds since the epoch.
    @ivar nonce: A random string, never used twice by the signer.
    @ivar keyid: The signer's full identity id.
    """

    created: int
    nonce: str
    keyid: str

    def serialize(self) -> str:
        """
        @return: The C{Signature-Input} member's value, which is also C{@signature-params}'s:
            the covered components and the parameters as a Structured Field inner list.
        """
        value: Any = (
            [(name, {}) for name in COVERED_COMPONENTS],
            {
                "created": self.created,
                "nonce": self.nonce,
                "keyid": self.keyid,
                "alg": ALGORITHM,
                "tag": TAG,
            },
        )
        return http_sf.ser({LABEL: value})[len(LABEL) + 1 :]


def signatureBase(
    method: str, authority: str, path: str, query: str, digest: str, parameters: str
) -> bytes:
    """
    Build the signature base (RFC 9421 section 2.5) of a Portal signature: one line per covered
    component, then the C{@signature-params} line, with no newline at the end.

    @param method: The method.
    @param authority: The normalised authority (L{normalizeAuthority}).
    @param path: The C{@path} value (L{splitTarget}).
    @param query: The C{@query} value.
    @param digest: The C{Content-Digest} field value.
    @param parameters: The serialised signature parameters (L{SignatureParameters.serialize}).
    @return: The bytes that are signed.
    @raise ValueError: If a value holds a line break or is not ASCII.
    """
    values = (method, authority, path, query, digest)
    if any("\n" in value or "\r" in value for value in (*values, parameters)):
        raise ValueError("a signed component holds a line break")
    lines = [f'"{name}": {value}' for name, value in zip(COVERED_COMPONENTS, values, strict=True)]
    lines.append(f'"@signature-params": {parameters}')
    return "\n".join(lines).encode("ascii")


def newNonce() -> str:
    """
    @return: A fresh random nonce: L{NONCE_BYTES} random bytes in unpadded base64url.
    """
    return base64.urlsafe_b64encode(secrets.token_bytes(NONCE_BYTES)).rstrip(b"=").decode("ascii")


def signRequest(
    identity: Identity,
    method: bytes,
    authority: str,
    target: bytes,
    body: bytes,
    created: int,
    nonce: str | None = None,
) -> list[tuple[bytes, bytes]]:
    """
    Sign a request to a peer.

    @param identity: The caller's identity.
    @param method: The request method.
    @param authority: The peer's authority, as the request will carry it in C{Host}.
    @param target: The request target exactly as it will be sent (C{/path?query}).
    @param body: The whole body (C{b""} for none).
    @param created: The current time, in whole seconds since the epoch.
    @param nonce: The nonce; a fresh one (L{newNonce}) by default.
    @return: The header fields to add: C{Content-Digest}, C{Signature-Input}, C{Signature} and
        C{Portal-Peer-Key}, names lowercased.
    """
    digest = contentDigest(body)
    path, query = splitTarget(target)
    parameters = SignatureParameters(created, nonce or newNonce(), identity.id).serialize()
    base = signatureBase(
        method.decode("ascii"), normalizeAuthority(authority), path, query, digest, parameters
    )
    r, s = decode_dss_signature(identity.sign(base))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return [
        (b"content-digest", digest.encode("ascii")),
        (b"signature-input", f"{LABEL}={parameters}".encode("ascii")),
        (b"signature", http_sf.ser({LABEL: (signature, {})}).encode("ascii")),
        (KEY_HEADER, http_sf.ser((identity.publicKey, {})).encode("ascii")),
    ]


class ReplayCache:
    """
    The (keyid, nonce) pairs of the signatures accepted within the freshness window, so that none
    is accepted twice.

    A pair is forgotten once its signature is older than the window (it would be refused as stale
    anyway).  The cache never holds more than C{maxEntries} pairs: when it is full, the pair with
    the oldest C{created} time is forgotten and that time becomes a floor, at or below which every
    signature is refused.  Under a flood of signed requests the window therefore shrinks, but a
    replay is never accepted.
    """

    def __init__(self, window: float = WINDOW, maxEntries: int = REPLAY_CACHE_SIZE) -> None:
        """
        @param window: Seconds a signature stays fresh (L{WINDOW}).
        @param maxEntries: Most pairs to hold; at least 1.
        """
        if maxEntries < 1:
            raise ValueError("a replay cache holds at least one entry")
        self.window = window
        self.maxEntries = maxEntries
        self._seen: set[tuple[str, str]] = set()
        self._byAge: list[tuple[int, str, str]] = []
        self._floor: int | None = None

    def __len__(self) -> int:
        """
        @return: How many pairs are held.
        """
        return len(self._seen)

    def remember(self, keyid: str, nonce: str, created: int, now: float) -> None:
        """
        Record a signature's nonce, refusing one seen before.

        @param keyid: The signer.
        @param nonce: The signature's nonce.
        @param created: The signature's C{created} time.
        @param now: The current time.
        @raise AuthenticationFailed: (401) If the nonce was seen within the window, or the
            signature is at or below the floor the cache set when it was full.
        """
        while self._byAge and self._byAge[0][0] < now - self.window:
            _, oldKeyid, oldNonce = heapq.heappop(self._byAge)
            self._seen.discard((oldKeyid, oldNonce))
        if (keyid, nonce) in self._seen:
            raise AuthenticationFailed(
                401, "replayed peer request: this signature's nonce was used already"
            )
        if self._floor is not None and created <= self._floor:
            raise AuthenticationFailed(
                401,
                "peer signature too old to check for replay while this Portal receives many "
                "signed requests; sign the request again",
            )
        if len(self._seen) >= self.maxEntries:
            oldest, oldKeyid, oldNonce = heapq.heappop(self._byAge)
            self._seen.discard((oldKeyid, oldNonce))
            self._floor = oldest if self._floor is None else max(self._floor, oldest)
            if created <= self._floor:
                # Keep the nonce just forgotten refused: nothing at or below the floor passes.
                raise AuthenticationFailed(
                    401,
                    "peer signature too old to check for replay while this Portal receives many "
                    "signed requests; sign the request again",
                )
        self._seen.add((keyid, nonce))
        heapq.heappush(self._byAge, (created, keyid, nonce))


class _Malformed(Exception):
    """
    A Portal signature's fields cannot be read; the message says which.
    """


def _joined(headers: tuple[tuple[bytes, bytes], ...], name: bytes) -> bytes | None:
    """
    @return: The values of every field C{name}, combined with C{", "} (RFC 9110 section 5.3), or
        L{None} when there is none.
    """
    values = [value.strip() for key, value in headers if key == name]
    return b", ".join(values) if values else None


def _dictionary(value: bytes, field: str) -> dict[str, Any]:
    """
    Parse a Structured Field dictionary.

    @raise _Malformed: If C{value} is not one.
    """
    try:
        parsed = http_sf.parse(value, tltype="dictionary")
    except (http_sf.StructuredFieldError, ValueError, TypeError) as e:
        raise _Malformed(f"{field} is not a Structured Field dictionary ({e})")
    assert isinstance(parsed, dict)
    return parsed


def _hasLabel(value: bytes | None) -> bool:
    """
    @return: Whether C{value} is a dictionary with a L{LABEL} member.
    """
    if value is None:
        return False
    try:
        return LABEL in _dictionary(value, "")
    except _Malformed:
        return False


def _parseInput(value: bytes | None) -> tuple[SignatureParameters, str]:
    """
    Read the Portal member of C{Signature-Input}.

    @return: Its parameters, and its value serialised again (C{@signature-params}).
    @raise _Malformed: If it is missing, or does not cover exactly L{COVERED_COMPONENTS} with
        exactly Portal's parameters.
    """
    if value is None:
        raise _Malformed("no Signature-Input")
    member = _dictionary(value, "Signature-Input").get(LABEL)
    if not isinstance(member, tuple) or not isinstance(member[0], list):
        raise _Malformed(f"Signature-Input has no {LABEL}=(...) member")
    components, parameters = member
    names = tuple(item[0] if type(item[0]) is str and not item[1] else None for item in components)
    if names != COVERED_COMPONENTS:
        raise _Malformed(
            f"Signature-Input must cover {' '.join(COVERED_COMPONENTS)}, in that order"
        )
    if set(parameters) != _PARAMETERS:
        raise _Malformed(f"Signature-Input must have exactly the parameters {sorted(_PARAMETERS)}")
    created, nonce, keyid = parameters["created"], parameters["nonce"], parameters["keyid"]
    if type(created) is not int or created < 0:
        raise _Malformed("created must be a non-negative integer")
    if type(nonce) is not str or not MIN_NONCE_LENGTH <= len(nonce) <= MAX_NONCE_LENGTH:
        raise _Malformed(
            f"nonce must be a string of {MIN_NONCE_LENGTH} to {MAX_NONCE_LENGTH} characters"
        )
    if type(keyid) is not str:
        raise _Malformed("keyid must be a string")
    if parameters["alg"] != ALGORITHM or type(parameters["alg"]) is not str:
        raise _Malformed(f"alg must be {ALGORITHM!r}")
    if parameters["tag"] != TAG or type(parameters["tag"]) is not str:
        raise _Malformed(f"tag must be {TAG!r}")
    return (
        SignatureParameters(created, nonce, keyid),
        http_sf.ser({LABEL: member})[len(LABEL) + 1 :],
    )


def _parseSignature(value: bytes | None) -> bytes:
    """
    Read the Portal member of C{Signature}: the DER encoding of the signature it holds.

    @raise _Malformed: If it is missing or not 64 bytes.
    """
    if value is None:
        raise _Malformed("no Signature")
    member = _dictionary(value, "Signature").get(LABEL)
    if not isinstance(member, tuple) or type(member[0]) is not bytes:
        raise _Malformed(f"Signature has no {LABEL}=:...: member")
    raw = member[0]
    if len(raw) != SIGNATURE_LENGTH:
        raise _Malformed(f"the signature must be {SIGNATURE_LENGTH} bytes (r||s)")
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def _parseKey(value: bytes | None) -> bytes:
    """
    Read C{Portal-Peer-Key}.

    @raise _Malformed: If it is missing or not a 33-byte byte sequence.
    """
    if value is None:
        raise _Malformed("no Portal-Peer-Key")
    try:
        item = http_sf.parse(value, tltype="item")
    except (http_sf.StructuredFieldError, ValueError, TypeError) as e:
        raise _Malformed(f"Portal-Peer-Key is not a Structured Field item ({e})")
    key = item[0] if isinstance(item, tuple) else item
    if type(key) is not bytes or len(key) != PUBLIC_KEY_LENGTH:
        raise _Malformed(f"Portal-Peer-Key must be a {PUBLIC_KEY_LENGTH}-byte compressed key")
    return key


def _digestMatches(value: bytes, body: bytes) -> bool:
    """
    @param value: The C{Content-Digest} field value.
    @param body: The body received.
    @return: Whether its C{sha-256} member is the SHA-256 of C{body}.
    @raise _Malformed: If it has no C{sha-256} member.
    """
    member = _dictionary(value, "Content-Digest").get("sha-256")
    if not isinstance(member, tuple) or type(member[0]) is not bytes:
        raise _Malformed("Content-Digest has no sha-256=:...: member")
    return hmac.compare_digest(member[0], hashlib.sha256(body).digest())


class PeerAuthenticator:
    """
    The gateway's authenticator for peers: checks a Portal signature on the request the gateway
    received, and says which contact made it.

    The checks, in order (every refusal but the last two is a 401): the signature fields are
    well formed; C{Portal-Peer-Key} hashes to C{keyid}; C{created} is within L{WINDOW} of now;
    C{Content-Digest} is the body's; the authority is one of this tunnel's hostnames; the
    signature verifies over the base rebuilt from the request; C{keyid} is a contact (else 403);
    the nonce is new (L{ReplayCache}).  Nonces are remembered only for contacts' valid signatures,
    so strangers cannot fill the cache.
    """

    _log = Logger()

    credentialHeaders = CREDENTIAL_HEADERS
    credentialCookies: frozenset[bytes] = frozenset()
    needsBody = True

    def __init__(
        self,
        contacts: ContactLookup,
        clock: IReactorTime,
        hostnames: Container[str],
        window: float = WINDOW,
        replayCache: ReplayCache | None = None,
    ) -> None:
        """
        @param contacts: The contact list.
        @param clock: Gives the current time.
        @param hostnames: This tunnel's public hostnames (lowercase, no port); a live container,
            such as L{TunnelService.servedHostnames <portal.tunnel.service.TunnelService>}.  A
            signature for another host is refused, so that a request signed for one peer cannot
            be replayed to another.
        @param window: Seconds a signature's C{created} time may be from now, either way.
        @param replayCache: Where nonces are remembered; a new L{ReplayCache} by default.
        """
        self.contacts = contacts
        self.clock = clock
        self.hostnames = hostnames
        self.window = window
        self.replayCache = replayCache if replayCache is not None else ReplayCache(window)

    def authenticate(self, request: GatewayRequest) -> Deferred[Caller | None]:
        """
        @param request: The L{GatewayRequest <portal.gateway.caller.GatewayRequest>}, with the
            whole body when it carries a Portal signature.
        @return: A L{Deferred} firing with a C{peer} L{Caller}, or L{None} when the request
            carries no Portal signature; failing with L{AuthenticationFailed} otherwise.
        """
        try:
            caller = self.verify(request)
        except AuthenticationFailed as e:
            self._log.info(
                "refused a peer request from {peer}: {status} {reason}",
                peer=request.peer,
                status=e.status,
                reason=e.message,
            )
            return fail(e)
        return succeed(caller)

    def verify(self, request: GatewayRequest) -> Caller | None:
        """
        Check a request's Portal signature synchronously; see L{authenticate}.

        @raise AuthenticationFailed: If the request carries a Portal signature that is not good.
        """
        headers = request.headers
        signatureInput = _joined(headers, b"signature-input")
        signature = _joined(headers, b"signature")
        key = _joined(headers, KEY_HEADER)
        if key is None and not _hasLabel(signatureInput) and not _hasLabel(signature):
            return None
        try:
            parameters, serialized = _parseInput(signatureInput)
            der = _parseSignature(signature)
            publicKey = _parseKey(key)
            if identityId(publicKey) != parameters.keyid:
                raise AuthenticationFailed(
                    401, f"Portal-Peer-Key is not the key of identity {parameters.keyid!r}"
                )
            now = self.clock.seconds()
            age = now - parameters.created
            if age > self.window:
                raise AuthenticationFailed(
                    401,
                    f"stale peer signature: created {age:.0f} s ago, more than {self.window:.0f} s "
                    f"(is the caller's clock right?)",
                )
            if -age > self.window:
                raise AuthenticationFailed(
                    401,
                    f"peer signature created {-age:.0f} s in the future, more than "
                    f"{self.window:.0f} s (is the caller's clock right?)",
                )
            digest = _joined(headers, b"content-digest")
            if digest is None:
                raise _Malformed("no Content-Digest")
            if not _digestMatches(digest, request.body or b""):
                raise AuthenticationFailed(401, "Content-Digest does not match the body received")
            try:
                authority = normalizeAuthority(request.authority)
                path, query = splitTarget(request.path)
                base = signatureBase(
                    request.method.decode("ascii"),
                    authority,
                    path,
                    query,
                    digest.decode("ascii"),
                    serialized,
                )
            except (ValueError, UnicodeDecodeError) as e:
                raise _Malformed(f"the request cannot be signed ({e})")
            host = authorityHost(authority)
            if host not in self.hostnames:
                raise AuthenticationFailed(
                    401, f"the peer signature is for {authority}, which is not this Portal's"
                )
            if not verifySignature(publicKey, der, base):
                raise AuthenticationFailed(
                    401, "the peer signature does not verify: a signed part of the request differs"
                )
        except _Malformed as e:
            raise AuthenticationFailed(401, f"malformed peer signature: {e}")
        try:
            contact = self.contacts.get(parameters.keyid)
        except ContactsError as e:
            self._log.error("cannot check a peer: {error}", error=str(e))
            raise AuthenticationFailed(500, "this Portal cannot read its contact list")
        if contact is None:
            raise AuthenticationFailed(
                403, f"identity {parameters.keyid} is not a contact of this Portal"
            )
        self.replayCache.remember(parameters.keyid, parameters.nonce, parameters.created, now)
        return Caller("peer", contact.id, contact.name)
