"""
The tunnel's half of L{portal.wire.control.Hello}, shared by control sessions and hops: what the tunnel
sends, and the check of the relay's answer (its identity signature over this TLS session, then the
pin of its id for the address the user gave).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.ssl import CertificateOptions, TLSVersion

import portal
from portal.trust.identity import identityId, verifySignature
from portal.trust.pinning import KnownRelays, RelayIdentityChanged
from portal.trust.relayaddress import RelayAddress
from portal.wire.control import (
    CAPABILITIES,
    EXPORTER_HELLO,
    MAX_VERSION,
    MIN_VERSION,
    exportKeyingMaterial,
    helloSignatureMessage,
)


class RelayAuthenticationFailed(Exception):
    """
    The relay's signature over this TLS session does not verify: someone is in the middle.
    """


class FatalRelayError(Exception):
    """
    An error reconnecting cannot fix (a changed relay identity, a name taken by another identity, a
    hop the relay will never forward); the tunnel stops with a message.
    """


class ReportsState(Protocol):
    """
    Where a pin is reported (L{portal.tunnel.report.Reporter}).
    """

    def state(self, event: str, relay: str, message: str, **extra: Any) -> None:
        """
        Report a state change of C{relay}.
        """


def relayTLSOptions() -> CertificateOptions:
    """
    The TLS options of every connection from the tunnel to a relay's control port (control sessions,
    TLS data sessions, hops). The certificate is not checked against a CA: the relay proves its
    secp256k1 identity inside the session (L{checkHello}), and TLS data sessions bind their attach
    to their own TLS session (L{portal.wire.attach.attachProof}).

    @return: Options requiring TLS 1.3, whose exporter is a sound channel binding (RFC 9266)
        without further conditions.
    """
    return CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3)


def helloArguments() -> dict[str, Any]:
    """
    @return: The arguments of the tunnel's L{portal.wire.control.Hello}.
    """
    return {
        "minVersion": MIN_VERSION,
        "maxVersion": MAX_VERSION,
        "capabilities": list(CAPABILITIES),
        "software": f"portal/{portal.__version__}",
    }


def verifyHello(transport: object, response: dict[str, Any], address: str) -> str:
    """
    Verify that the relay holds its identity key on this very TLS session: its L{portal.wire.control.Hello}
    signature must verify, for the key it sent, over this session's exporter value. Nothing is
    pinned (L{checkHello} does that; registry health checks compare the id themselves).

    @param transport: The TLS transport the answer came over.
    @param response: The answer.
    @param address: The relay's C{host:port}, for the message.
    @return: The relay's identity id, derived from the key it sent.
    @raise RelayAuthenticationFailed: When the signature does not verify.
    """
    exporter = exportKeyingMaterial(transport, EXPORTER_HELLO)
    relayKey = response["relayKey"]
    if not verifySignature(relayKey, response["signature"], helloSignatureMessage(exporter)):
        raise RelayAuthenticationFailed(
            f"the identity signature of relay {address} does not match this connection"
        )
    return identityId(relayKey)


def checkHello(
    transport: object,
    response: dict[str, Any],
    relay: RelayAddress,
    pins: KnownRelays,
    reporter: ReportsState,
    flag: str = "--relay",
) -> str:
    """
    Verify that the relay holds its identity key on this very TLS session, and check or pin its id.

    @param transport: The TLS transport the L{portal.wire.control.Hello} answer came over.
    @param response: The answer.
    @param relay: The address the user gave for this relay, and the id it must have, if given.
    @param pins: The known relays.
    @param reporter: Told about a new pin.
    @param flag: The option the relay was given with (C{--relay} or C{--via}), for messages.
    @return: The relay's verified identity id.
    @raise RelayAuthenticationFailed: When the signature does not verify.
    @raise FatalRelayError: When the relay presents another identity than the one pinned or given,
        or the known relays file cannot be read.
    """
    relayId = verifyHello(transport, response, relay.address)
    try:
        if pins.check(relay.address, relayId, relay.expectedId, flag=flag):
            reporter.state(
                "pinned",
                relay.address,
                f"pinned relay identity {relayId} "
                f"({f'as given with {flag}' if relay.expectedId else 'first use'})",
                relayId=relayId,
            )
    except (RelayIdentityChanged, ValueError) as e:
        # A changed identity, or a known relays file that cannot be read: reconnecting cannot help.
        raise FatalRelayError(str(e))
    return relayId
