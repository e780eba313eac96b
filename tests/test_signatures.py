"""
Tests for L{portal.gateway.signatures}: signing requests to peers, and L{PeerAuthenticator}'s
checks of what the gateway received.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import attrs
import coincurve
import http_sf
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.gateway.caller import AuthenticationFailed, Authenticator, Caller, GatewayRequest
from portal.gateway.contacts import Contact, ContactsError
from portal.gateway.signatures import (
    ALGORITHM,
    CREDENTIAL_HEADERS,
    LABEL,
    PeerAuthenticator,
    ReplayCache,
    SignatureParameters,
    contentDigest,
    normalizeAuthority,
    signatureBase,
    signRequest,
    splitTarget,
)
from portal.trust.identity import Identity

#: The verifier's clock in these tests.
NOW = 1_700_000_000

#: The tunnel's own hostname in these tests.
HOST = "app.peer.example"

#: The order of the curve, for forging a high-S twin of a signature.
_CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

#: The identity of the example in docs/peers.md.
EXAMPLE_IDENTITY = Identity(coincurve.PrivateKey(hashlib.sha256(b"portal peers example").digest()))


class FakeContacts:
    """
    A contact list in memory.
    """

    def __init__(self, contacts: Sequence[Contact] = (), broken: bool = False) -> None:
        self._contacts = {contact.id: contact for contact in contacts}
        self._broken = broken

    def get(self, identityId: str) -> Contact | None:
        """
        @return: The contact, or L{None}.
        """
        if self._broken:
            raise ContactsError("peers.json is not valid JSON")
        return self._contacts.get(identityId)


def signed(
    identity: Identity,
    method: bytes = b"POST",
    authority: str = HOST,
    target: bytes = b"/inbox?page=2",
    body: bytes = b'{"hello": "world"}',
    created: int = NOW,
    nonce: str = "n0nce-n0nce-n0nce-1",
) -> GatewayRequest:
    """
    A request as the gateway would receive it from a peer that signed it.
    """
    headers = [(b"content-type", b"application/json")]
    headers += signRequest(identity, method, authority, target, body, created, nonce)
    return GatewayRequest(
        method, authority.encode("ascii"), target, tuple(headers), body, ("192.0.2.7", 4711)
    )


def replaceHeader(request: GatewayRequest, name: bytes, value: bytes) -> GatewayRequest:
    """
    @return: C{request} with the value of header C{name} replaced.
    """
    headers = tuple((k, value if k == name else v) for k, v in request.headers)
    return attrs.evolve(request, headers=headers)


def header(request: GatewayRequest, name: bytes) -> bytes:
    """
    @return: The value of header C{name}, which must be there.
    """
    value = request.header(name)
    assert value is not None
    return value


class SigningTests(SynchronousTestCase):
    """
    Tests for the signature format: L{contentDigest}, L{signatureBase}, L{signRequest}.
    """

    def test_contentDigest(self) -> None:
        """
        C{Content-Digest} is RFC 9530's C{sha-256} member; this is the RFC's own example.
        """
        self.assertEqual(
            contentDigest(b'{"hello": "world"}'),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
        )

    def test_targetSplit(self) -> None:
        """
        C{@path} and C{@query} are taken undecoded; a missing query is C{?} (RFC 9421 2.2.7), an
        empty path C{/}.
        """
        self.assertEqual(splitTarget(b"/a%20b?x=1&y"), ("/a%20b", "?x=1&y"))
        self.assertEqual(splitTarget(b"/a"), ("/a", "?"))
        self.assertEqual(splitTarget(b""), ("/", "?"))
        self.assertRaises(ValueError, splitTarget, b"https://h/a")

    def test_authority(self) -> None:
        """
        C{@authority} is lowercased, without the default https port.
        """
        self.assertEqual(normalizeAuthority(b"App.Example:443"), "app.example")
        self.assertEqual(normalizeAuthority("x.localhost:8443"), "x.localhost:8443")
        self.assertRaises(ValueError, normalizeAuthority, b"a/b")
        self.assertRaises(ValueError, normalizeAuthority, b"")

    def test_exampleBase(self) -> None:
        """
        The signature base and headers of the example in docs/peers.md, which must stay true.
        """
        request = signed(EXAMPLE_IDENTITY, nonce="Xr5ZGlz4W6yhLg7l3lJ6sA")
        self.assertEqual(
            EXAMPLE_IDENTITY.id, "mgbogd23iwegntnic7j4hqm2d3qgxnty4dmcgfnnijkrc4fnllva"
        )
        parameters = SignatureParameters(NOW, "Xr5ZGlz4W6yhLg7l3lJ6sA", EXAMPLE_IDENTITY.id)
        base = signatureBase(
            "POST",
            HOST,
            "/inbox",
            "?page=2",
            contentDigest(b'{"hello": "world"}'),
            parameters.serialize(),
        )
        self.assertEqual(
            base.decode("ascii").split("\n"),
            [
                '"@method": POST',
                '"@authority": app.peer.example',
                '"@path": /inbox',
                '"@query": ?page=2',
                '"content-digest": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:',
                '"@signature-params": ("@method" "@authority" "@path" "@query" '
                '"content-digest");created=1700000000;nonce="Xr5ZGlz4W6yhLg7l3lJ6sA";'
                'keyid="mgbogd23iwegntnic7j4hqm2d3qgxnty4dmcgfnnijkrc4fnllva";'
                'alg="ecdsa-secp256k1-sha256";tag="portal-peer"',
            ],
        )
        self.assertEqual(header(request, b"signature-input"), b"portal=" + base.split(b": ")[-1])
        self.assertEqual(
            header(request, b"portal-peer-key"), b":AvPwYbW4JoniNd/+Fll8LZoSYzDYghVyyirtm6I1N6NY:"
        )
        # libsecp256k1 signs deterministically (RFC 6979): the example's signature is fixed.
        self.assertEqual(
            header(request, b"signature"),
            b"portal=:E5vJ6sN/9v7bdlRjWxCh9pxHIY7hA35FV+87639/HWxWk5m5Qb5aKxloTD4qrPyHoaomTa3JEw"
            b"cN5aoaZDk+Nw==:",
        )

    def test_credentialHeaders(self) -> None:
        """
        The gateway strips C{Signature}, C{Signature-Input} and C{Portal-Peer-Key}; it leaves
        C{Content-Digest}, which describes the body the app receives.
        """
        self.assertEqual(
            CREDENTIAL_HEADERS, frozenset({b"signature", b"signature-input", b"portal-peer-key"})
        )
        self.assertNotIn(b"content-digest", CREDENTIAL_HEADERS)


class PeerAuthenticatorTests(SynchronousTestCase):
    """
    Tests for L{PeerAuthenticator}.
    """

    def setUp(self) -> None:
        """
        A contact, Alice, calling a tunnel whose hostname is L{HOST}, at L{NOW}.
        """
        self.alice = Identity.generate()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.contacts = FakeContacts([Contact.create(self.alice.id, "Alice")])
        self.hostnames = {HOST, "app.other-relay.example"}
        self.authenticator = PeerAuthenticator(self.contacts, self.clock, self.hostnames)

    def accepted(self, request: GatewayRequest) -> Caller | None:
        """
        @return: What the authenticator says of C{request}, which it must accept.
        """
        return self.successResultOf(self.authenticator.authenticate(request))

    def refused(self, request: GatewayRequest, status: int = 401) -> str:
        """
        @return: The message of the authenticator's refusal of C{request}, which must have
            C{status}.
        """
        failure = self.failureResultOf(
            self.authenticator.authenticate(request), AuthenticationFailed
        )
        self.assertEqual(failure.value.status, status, failure.value.message)
        return str(failure.value.message)

    def test_isAnAuthenticator(self) -> None:
        """
        L{PeerAuthenticator} provides the gateway's L{Authenticator} protocol and needs the body.
        """
        authenticator: Authenticator = self.authenticator
        self.assertTrue(authenticator.needsBody)
        self.assertEqual(authenticator.credentialCookies, frozenset())
        self.assertEqual(authenticator.credentialHeaders, CREDENTIAL_HEADERS)

    def test_roundTrip(self) -> None:
        """
        A contact's signed request is accepted as a C{peer} caller with the contact's full id
        and name.
        """
        self.assertEqual(self.accepted(signed(self.alice)), Caller("peer", self.alice.id, "Alice"))

    def test_variants(self) -> None:
        """
        Requests without a query or body, any method, a port in the authority and the default
        port written out all verify.
        """
        self.assertIsNotNone(self.accepted(signed(self.alice, b"GET", target=b"/", body=b"")))
        self.assertIsNotNone(
            self.accepted(
                signed(self.alice, b"DELETE", HOST + ":8443", nonce="n0nce-n0nce-n0nce-2")
            )
        )
        request = signed(self.alice, nonce="n0nce-n0nce-n0nce-3")
        self.assertIsNotNone(
            self.accepted(attrs.evolve(request, authority=b"APP.peer.example:443"))
        )

    def test_noSignature(self) -> None:
        """
        A request without a Portal signature is not for this authenticator: L{None}, even when it
        carries another kind of C{Signature} (an ActivityPub server's, say).
        """
        plain = GatewayRequest(b"GET", HOST.encode(), b"/", ())
        self.assertIsNone(self.accepted(plain))
        other = attrs.evolve(
            plain,
            headers=((b"signature", b'keyId="https://x/actor#key",signature="AAAA"'),),
        )
        self.assertIsNone(self.accepted(other))

    def test_tamperMethod(self) -> None:
        """
        Changing the method breaks the signature.
        """
        message = self.refused(attrs.evolve(signed(self.alice), method=b"PUT"))
        self.assertIn("does not verify", message)

    def test_tamperAuthority(self) -> None:
        """
        A request signed for one of this tunnel's hostnames does not verify at another.
        """
        request = attrs.evolve(signed(self.alice), authority=b"app.other-relay.example")
        self.assertIn("does not verify", self.refused(request))

    def test_otherPortal(self) -> None:
        """
        A request signed for another Portal (its authority is not one of this tunnel's
        hostnames) is refused, so that a peer cannot replay what it received to a third Portal.
        """
        request = signed(self.alice, authority="app.someone-else.example")
        self.assertIn("not this Portal's", self.refused(request))

    def test_tamperPath(self) -> None:
        """
        Changing the path breaks the signature.
        """
        request = attrs.evolve(signed(self.alice), path=b"/admin?page=2")
        self.assertIn("does not verify", self.refused(request))

    def test_tamperQuery(self) -> None:
        """
        Changing, removing or adding a query breaks the signature.
        """
        for target in (b"/inbox?page=3", b"/inbox", b"/inbox?"):
            request = attrs.evolve(signed(self.alice), path=target)
            self.assertIn("does not verify", self.refused(request))
        request = attrs.evolve(signed(self.alice, target=b"/inbox"), path=b"/inbox?admin=1")
        self.assertIn("does not verify", self.refused(request))

    def test_tamperBody(self) -> None:
        """
        A body that is not the one digested is refused.
        """
        request = attrs.evolve(signed(self.alice), body=b'{"hello": "mallory"}')
        self.assertIn("Content-Digest does not match", self.refused(request))

    def test_missingBody(self) -> None:
        """
        A body the gateway did not pass on counts as empty, which does not match a digest of a
        non-empty body.
        """
        request = attrs.evolve(signed(self.alice), body=None)
        self.assertIn("Content-Digest does not match", self.refused(request))

    def test_tamperDigest(self) -> None:
        """
        A new body with its own, correct, Content-Digest breaks the signature, which covers the
        digest.
        """
        body = b'{"hello": "mallory"}'
        request = replaceHeader(
            attrs.evolve(signed(self.alice), body=body),
            b"content-digest",
            contentDigest(body).encode("ascii"),
        )
        self.assertIn("does not verify", self.refused(request))

    def test_noDigest(self) -> None:
        """
        A signed request without C{Content-Digest}, or with one lacking C{sha-256}, is malformed.
        """
        request = signed(self.alice)
        stripped = attrs.evolve(
            request, headers=tuple(h for h in request.headers if h[0] != b"content-digest")
        )
        self.assertIn("no Content-Digest", self.refused(stripped))
        other = replaceHeader(request, b"content-digest", b"sha-512=:AAAA:")
        self.assertIn("no sha-256", self.refused(other))

    def tamperInput(self, request: GatewayRequest, old: bytes, new: bytes) -> GatewayRequest:
        """
        @return: C{request} with C{old} replaced by C{new} in C{Signature-Input}.
        """
        value = header(request, b"signature-input")
        self.assertIn(old, value)
        return replaceHeader(request, b"signature-input", value.replace(old, new))

    def test_tamperCreated(self) -> None:
        """
        Changing the C{created} parameter breaks the signature.
        """
        request = signed(self.alice)
        tampered = self.tamperInput(request, b"created=1700000000", b"created=1700000001")
        self.assertIn("does not verify", self.refused(tampered))

    def test_tamperNonce(self) -> None:
        """
        Changing the nonce (to get past the replay cache) breaks the signature.
        """
        request = signed(self.alice)
        tampered = self.tamperInput(request, b"n0nce-n0nce-n0nce-1", b"n0nce-n0nce-n0nce-2")
        self.assertIn("does not verify", self.refused(tampered))

    def test_tamperKeyid(self) -> None:
        """
        Claiming another identity fails: with Alice's key the key does not match the keyid, and
        with Bob's key (a contact too) the signature does not verify.
        """
        bob = Identity.generate()
        self.contacts._contacts[bob.id] = Contact.create(bob.id, "Bob")
        request = signed(self.alice)
        tampered = self.tamperInput(request, self.alice.id.encode(), bob.id.encode())
        self.assertIn("is not the key of identity", self.refused(tampered))
        bobKey = http_sf.ser((bob.publicKey, {})).encode("ascii")
        tampered = replaceHeader(tampered, b"portal-peer-key", bobKey)
        self.assertIn("does not verify", self.refused(tampered))

    def test_tamperSignature(self) -> None:
        """
        A changed signature, or the high-S twin of a valid one, does not verify.
        """
        request = signed(self.alice)
        member = http_sf.parse(header(request, b"signature"), tltype="dictionary")
        assert isinstance(member, dict)
        raw = member[LABEL][0]
        flipped = bytes([raw[0] ^ 1]) + raw[1:]
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        twin = r.to_bytes(32, "big") + (_CURVE_ORDER - s).to_bytes(32, "big")
        for bad in (flipped, twin):
            value = http_sf.ser({LABEL: (bad, {})}).encode("ascii")
            self.assertIn(
                "does not verify", self.refused(replaceHeader(request, b"signature", value))
            )

    def test_malformed(self) -> None:
        """
        Signatures that do not follow Portal's profile exactly are refused as malformed: another
        algorithm or tag, fewer components, a missing key or signature, a short nonce.
        """
        request = signed(self.alice)
        cases = [
            self.tamperInput(request, ALGORITHM.encode(), b"ecdsa-p256-sha256"),
            self.tamperInput(request, b'tag="portal-peer"', b'tag="other"'),
            self.tamperInput(request, b' "content-digest")', b")"),
            self.tamperInput(request, b"n0nce-n0nce-n0nce-1", b"short"),
            self.tamperInput(request, b";tag=", b";expires=1700000300;tag="),
            replaceHeader(request, b"signature", b"portal=:AAAA:"),
            replaceHeader(request, b"portal-peer-key", b"not a key"),
            attrs.evolve(
                request, headers=tuple(h for h in request.headers if h[0] != b"signature")
            ),
            attrs.evolve(
                request, headers=tuple(h for h in request.headers if h[0] != b"portal-peer-key")
            ),
        ]
        for case in cases:
            self.assertIn("malformed peer signature", self.refused(case))

    def test_replay(self) -> None:
        """
        The same signed request is accepted once; its replay is refused, while a new signature
        (another nonce) is accepted.
        """
        request = signed(self.alice)
        self.assertIsNotNone(self.accepted(request))
        self.clock.advance(10)
        self.assertIn("replayed", self.refused(request))
        self.assertIsNotNone(self.accepted(signed(self.alice, nonce="another-nonce-123")))

    def test_stale(self) -> None:
        """
        A signature created more than 300 s ago is refused as stale; one exactly 300 s old passes.
        """
        self.assertIsNotNone(self.accepted(signed(self.alice, created=NOW - 300)))
        message = self.refused(signed(self.alice, created=NOW - 301, nonce="n0nce-n0nce-n0nce-2"))
        self.assertIn("stale peer signature: created 301 s ago", message)

    def test_replayAfterWindow(self) -> None:
        """
        Once a signature's nonce has been forgotten, its replay is refused as stale.
        """
        request = signed(self.alice)
        self.assertIsNotNone(self.accepted(request))
        self.clock.advance(301)
        self.assertIsNotNone(self.accepted(signed(self.alice, created=NOW + 301, nonce="x" * 16)))
        self.assertEqual(len(self.authenticator.replayCache), 1)
        self.assertIn("stale", self.refused(request))

    def test_future(self) -> None:
        """
        A signature created more than 300 s in the future is refused.
        """
        self.assertIsNotNone(self.accepted(signed(self.alice, created=NOW + 300)))
        message = self.refused(signed(self.alice, created=NOW + 301, nonce="n0nce-n0nce-n0nce-2"))
        self.assertIn("301 s in the future", message)

    def test_notAContact(self) -> None:
        """
        A valid signature by an identity that is not a contact is refused with 403, and uses no
        room in the replay cache.
        """
        stranger = Identity.generate()
        message = self.refused(signed(stranger), 403)
        self.assertIn(f"identity {stranger.id} is not a contact", message)
        self.assertEqual(len(self.authenticator.replayCache), 0)

    def test_badSignatureFromStranger(self) -> None:
        """
        A stranger's bad signature is a 401, not a 403: the contact list is consulted only for
        signatures that verify.
        """
        stranger = Identity.generate()
        self.refused(attrs.evolve(signed(stranger), method=b"PUT"), 401)

    def test_unreadableContacts(self) -> None:
        """
        When the contact list cannot be read, a valid signature is refused (500), never accepted.
        """
        self.authenticator.contacts = FakeContacts(broken=True)
        self.assertIn("cannot read its contact list", self.refused(signed(self.alice), 500))


class ReplayCacheTests(SynchronousTestCase):
    """
    Tests for L{ReplayCache}.
    """

    def test_bounded(self) -> None:
        """
        The cache never holds more than its size limit, however many signatures arrive.
        """
        cache = ReplayCache(window=300, maxEntries=3)
        for i in range(10):
            cache.remember("k", f"nonce-{i}", NOW + i, NOW + i)
            self.assertLessEqual(len(cache), 3)
        self.assertEqual(len(cache), 3)

    def test_fullCacheNeverAcceptsReplay(self) -> None:
        """
        A nonce pushed out of a full cache is still refused: every signature at or below the
        created time of the forgotten one is refused from then on.
        """
        cache = ReplayCache(window=300, maxEntries=2)
        cache.remember("k", "first", NOW, NOW)
        cache.remember("k", "second", NOW + 1, NOW + 1)
        cache.remember("k", "third", NOW + 2, NOW + 2)
        e = self.assertRaises(AuthenticationFailed, cache.remember, "k", "first", NOW, NOW + 3)
        self.assertIn("sign the request again", e.message)
        self.assertRaises(AuthenticationFailed, cache.remember, "k", "other", NOW, NOW + 3)
        self.assertRaises(AuthenticationFailed, cache.remember, "k", "second", NOW + 1, NOW + 3)
        self.assertRaises(AuthenticationFailed, cache.remember, "k", "third", NOW + 2, NOW + 3)
        cache.remember("k", "fourth", NOW + 3, NOW + 3)

    def test_olderThanEvictedRefused(self) -> None:
        """
        When the cache is full, a signature older than everything it holds is refused rather than
        pushing out a newer nonce.
        """
        cache = ReplayCache(window=300, maxEntries=1)
        cache.remember("k", "new", NOW + 5, NOW + 5)
        self.assertRaises(AuthenticationFailed, cache.remember, "k", "old", NOW, NOW + 5)
        self.assertRaises(AuthenticationFailed, cache.remember, "k", "new", NOW + 5, NOW + 5)

    def test_expiry(self) -> None:
        """
        Entries older than the window are forgotten, freeing room without raising a floor.
        """
        cache = ReplayCache(window=300, maxEntries=2)
        cache.remember("k", "a", NOW, NOW)
        cache.remember("k", "b", NOW, NOW)
        cache.remember("k", "c", NOW + 301, NOW + 301)
        self.assertEqual(len(cache), 1)
        cache.remember("k", "d", NOW + 1 + 300, NOW + 301)

    def test_perSigner(self) -> None:
        """
        Nonces are remembered per signer: two signers may use the same nonce.
        """
        cache = ReplayCache()
        cache.remember("alice", "same-nonce", NOW, NOW)
        cache.remember("bob", "same-nonce", NOW, NOW)
        self.assertRaises(AuthenticationFailed, cache.remember, "bob", "same-nonce", NOW, NOW)

    def test_atLeastOne(self) -> None:
        """
        A cache must hold at least one entry.
        """
        self.assertRaises(ValueError, ReplayCache, 300, 0)
