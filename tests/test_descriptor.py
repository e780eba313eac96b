"""
Tests for L{portal.registry.descriptor} (signing and verifying relay descriptors) and the relay's
C{/.well-known/portal-relay.json} page in L{portal.relay.site}.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.registry.descriptor import (
    DESCRIPTOR_PATH,
    DESCRIPTOR_PURPOSE,
    MAX_AGE,
    MAX_CLOCK_SKEW,
    DescriptorError,
    RelayDescriptor,
    signDescriptor,
    signedMessage,
    verifyDescriptor,
)
from portal.relay.ports import PortAllocator, PortRange
from portal.relay.rawtcp import tcpPorts
from portal.relay.router import Router
from portal.relay.site import httpSite, relaySite
from portal.relay.udpmode import UDPMode
from portal.trust.identity import Identity, verifySignature

ISSUED = 1_800_000_000


def describe(identity: Identity, **changes: Any) -> RelayDescriptor:
    """
    @return: A descriptor of a relay with C{identity}, with C{changes}.
    """
    fields: dict[str, Any] = dict(
        id=identity.id,
        publicKey=identity.publicKey,
        domain="relay.example.net",
        tunnelDomain="t.example.net",
        publicPort=443,
        controlPort=4017,
        modes=("stream", "tcp"),
        tcpPorts="20000-20999",
        udpPorts=None,
        software="portal-relay/0.1.0",
        issued=ISSUED,
    )
    fields.update(changes)
    return RelayDescriptor(**fields)


def edit(content: bytes, change: Any) -> bytes:
    """
    @return: The document C{content} after C{change} was applied to its decoded JSON.
    """
    document = json.loads(content)
    change(document)
    return json.dumps(document).encode("utf-8")


class SignVerifyTests(SynchronousTestCase):
    """
    L{signDescriptor} and L{verifyDescriptor}.
    """

    def setUp(self) -> None:
        self.identity = Identity.generate()
        self.descriptor = describe(self.identity)
        self.document = signDescriptor(self.identity, self.descriptor)

    def assertInvalid(self, content: bytes, fragment: str, **kw: Any) -> None:
        """
        Check that C{content} is refused with a message holding C{fragment}.
        """
        kw.setdefault("expectedId", self.identity.id)
        error = self.assertRaises(DescriptorError, verifyDescriptor, content, **kw)
        self.assertIn(fragment, str(error))

    def test_roundTrip(self) -> None:
        """
        A signed descriptor verifies against its relay's id and gives back every field.
        """
        self.assertEqual(verifyDescriptor(self.document, self.identity.id), self.descriptor)
        self.assertEqual(
            verifyDescriptor(self.document, self.identity.id, now=ISSUED + 10), self.descriptor
        )

    def test_format(self) -> None:
        """
        The document is C{{"descriptor": {...}, "signature": BASE64}}, and the signature covers the
        purpose string and the canonical JSON of the descriptor object.
        """
        document = json.loads(self.document)
        self.assertEqual(sorted(document), ["descriptor", "signature"])
        fields = document["descriptor"]
        self.assertEqual(fields["version"], 1)
        self.assertEqual(fields["publicKey"], self.identity.publicKey.hex())
        self.assertEqual(fields["modes"], ["stream", "tcp"])
        message = signedMessage(fields)
        self.assertTrue(message.startswith(DESCRIPTOR_PURPOSE + b'{"controlPort":4017,"domain":'))
        self.assertNotIn(b" ", message)
        self.assertTrue(
            verifySignature(
                self.identity.publicKey, base64.b64decode(document["signature"]), message
            )
        )
        self.assertFalse(
            verifySignature(
                self.identity.publicKey,
                base64.b64decode(document["signature"]),
                message[len(DESCRIPTOR_PURPOSE) :],
            )
        )

    def test_tamperAnyField(self) -> None:
        """
        Changing any one field, or adding one, breaks the signature.
        """
        replacements = {
            "version": 1,
            "id": Identity.generate().id,
            "publicKey": Identity.generate().publicKey.hex(),
            "domain": "evil.example.net",
            "tunnelDomain": "evil.example.net",
            "publicPort": 444,
            "controlPort": 4018,
            "modes": ["stream", "tcp", "udp"],
            "tcpPorts": "20000-20001",
            "udpPorts": "30000-30999",
            "software": "portal-relay/9.9.9",
            "issued": ISSUED + 1,
        }
        fields = json.loads(self.document)["descriptor"]
        self.assertEqual(sorted(replacements), sorted(fields))
        for name, value in replacements.items():
            if name == "version":
                # Another version is refused before the signature is looked at (test_malformed).
                continue

            def change(document: dict[str, Any], name: str = name, value: Any = value) -> None:
                document["descriptor"][name] = value

            self.assertInvalid(edit(self.document, change), "signature does not verify")

        def add(document: dict[str, Any]) -> None:
            document["descriptor"]["extra"] = 1

        self.assertInvalid(edit(self.document, add), "signature does not verify")

    def test_tamperSignature(self) -> None:
        """
        Another signature, or one that is not base64, is refused.
        """

        def other(document: dict[str, Any]) -> None:
            document["signature"] = base64.b64encode(self.identity.sign(b"other")).decode()

        self.assertInvalid(edit(self.document, other), "signature does not verify")

        def garbled(document: dict[str, Any]) -> None:
            document["signature"] = "not base64!"

        self.assertInvalid(edit(self.document, garbled), "not well encoded")

    def test_wrongKey(self) -> None:
        """
        The relay's descriptor signed by another key does not verify; another relay's own descriptor
        verifies but is refused as not the expected relay's.
        """
        impostor = Identity.generate()
        fields = self.descriptor.fields()
        forged = json.dumps(
            {
                "descriptor": fields,
                "signature": base64.b64encode(impostor.sign(signedMessage(fields))).decode(),
            }
        ).encode()
        self.assertInvalid(forged, "signature does not verify")
        theirs = signDescriptor(impostor, describe(impostor))
        self.assertInvalid(theirs, f"is relay {impostor.id}'s, not {self.identity.id}'s")

    def test_idNotOfKey(self) -> None:
        """
        A descriptor whose id is not derived from its public key is refused even when its signature
        verifies.
        """
        otherId = Identity.generate().id
        fields = describe(self.identity, id=otherId).fields()
        document = json.dumps(
            {
                "descriptor": fields,
                "signature": base64.b64encode(self.identity.sign(signedMessage(fields))).decode(),
            }
        ).encode()
        self.assertInvalid(document, "id does not belong to its public key", expectedId=otherId)

    def test_wrongExpectedId(self) -> None:
        """
        A genuine descriptor is refused when another relay was expected.
        """
        expected = Identity.generate().id
        self.assertInvalid(
            self.document, f"is relay {self.identity.id}'s, not {expected}'s", expectedId=expected
        )

    def test_freshness(self) -> None:
        """
        With the current time given, a descriptor older than L{MAX_AGE} or issued more than
        L{MAX_CLOCK_SKEW} ahead is refused.
        """
        verifyDescriptor(self.document, self.identity.id, now=ISSUED + MAX_AGE)
        verifyDescriptor(self.document, self.identity.id, now=ISSUED - MAX_CLOCK_SKEW)
        self.assertInvalid(self.document, "(stale)", now=ISSUED + MAX_AGE + 1)
        self.assertInvalid(self.document, "in the future", now=ISSUED - MAX_CLOCK_SKEW - 1)

    def test_malformed(self) -> None:
        """
        Documents that are not descriptors are refused with what is wrong.
        """
        self.assertInvalid(b"{", "not a JSON document")
        self.assertInvalid(b"[]", "expected a JSON object")
        self.assertInvalid(b'{"descriptor": {}}', '"descriptor" (an object) and "signature"')

        def version(document: dict[str, Any]) -> None:
            document["descriptor"]["version"] = 2

        self.assertInvalid(edit(self.document, version), "descriptor version 2")

        def key(document: dict[str, Any]) -> None:
            document["descriptor"]["publicKey"] = "00" * 32

        self.assertInvalid(edit(self.document, key), "not a compressed secp256k1 key")

    def test_badTypes(self) -> None:
        """
        A correctly signed descriptor with an ill-typed field is refused, naming the field.
        """
        for name, value, problem in [
            ("publicPort", "443", "is not a port number"),
            ("controlPort", 0, "is not a port number"),
            ("controlPort", True, "is not a port number"),
            ("modes", "stream", "is not a list of mode names"),
            ("tcpPorts", 1, "is not a port range or null"),
            ("issued", 1.5, "is not a whole number of seconds"),
            ("domain", None, "is not a string"),
        ]:
            fields = self.descriptor.fields()
            fields[name] = value
            document = json.dumps(
                {
                    "descriptor": fields,
                    "signature": base64.b64encode(
                        self.identity.sign(signedMessage(fields))
                    ).decode(),
                }
            ).encode()
            self.assertInvalid(document, f'"{name}" {problem}')

    def test_signWithOtherIdentity(self) -> None:
        """
        A relay cannot sign a descriptor naming another identity.
        """
        self.assertRaises(ValueError, signDescriptor, Identity.generate(), self.descriptor)


class DescriptorPageTests(SynchronousTestCase):
    """
    The relay serves its descriptor at L{DESCRIPTOR_PATH} on its own hostname (and on the plain-HTTP
    listener).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(ISSUED)
        self.identity = Identity.generate()
        self.router = Router(self.identity, self.clock, "relay.example.net", "t.example.net")
        self.router.publicPort = 8443
        self.router.controlPort = 4017

    def get(self, site: Any) -> tuple[int, dict[str, list[bytes]], bytes]:
        """
        GET the descriptor from C{site}.

        @return: The status, headers and body.
        """
        stub = StubTreq(site.resource)
        results: list[Any] = []
        stub.get(f"https://relay.example.net{DESCRIPTOR_PATH}").addCallback(results.append)
        stub.flush()
        [response] = results
        body: list[bytes] = []
        stub.content(response).addCallback(body.append)
        stub.flush()
        return response.code, dict(response.headers.getAllRawHeaders()), body[0]

    def test_streamOnly(self) -> None:
        """
        A relay without port ranges offers stream mode; the descriptor verifies for its id, fresh.
        """
        code, headers, body = self.get(relaySite(self.router))
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"Content-Type"], [b"application/json"])
        descriptor = verifyDescriptor(body, self.identity.id, now=self.clock.seconds())
        self.assertEqual(
            descriptor,
            RelayDescriptor(
                id=self.identity.id,
                publicKey=self.identity.publicKey,
                domain="relay.example.net",
                tunnelDomain="t.example.net",
                publicPort=8443,
                controlPort=4017,
                modes=("stream",),
                tcpPorts=None,
                udpPorts=None,
                software=descriptor.software,
                issued=ISSUED,
            ),
        )
        self.assertTrue(descriptor.software.startswith("portal-relay/"))

    def test_modesFromRanges(self) -> None:
        """
        With TCP and UDP port ranges, the descriptor offers those modes and gives the ranges.
        """
        self.router.tcp = tcpPorts(self.clock, PortAllocator(PortRange(20000, 20009), self.clock))
        self.router.udp = UDPMode(self.clock, PortAllocator(PortRange(30000, 30009), self.clock))
        descriptor = verifyDescriptor(self.get(relaySite(self.router))[2], self.identity.id)
        self.assertEqual(descriptor.modes, ("stream", "tcp", "udp"))
        self.assertEqual((descriptor.tcpPorts, descriptor.udpPorts), ("20000-20009", "30000-30009"))

    def test_issuedNow(self) -> None:
        """
        Each request gets a descriptor issued at the time of the request.
        """
        self.clock.advance(3600)
        descriptor = verifyDescriptor(self.get(relaySite(self.router))[2], self.identity.id)
        self.assertEqual(descriptor.issued, ISSUED + 3600)

    def test_plainHTTP(self) -> None:
        """
        The plain-HTTP listener serves the descriptor too, rather than redirecting it.
        """
        code, _, body = self.get(httpSite(self.router))
        self.assertEqual(code, 200)
        self.assertEqual(verifyDescriptor(body, self.identity.id).id, self.identity.id)
