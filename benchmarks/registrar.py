"""
Registers many leases on one relay over one control session, for the lease-scale scenario.

C{python -m benchmarks.registrar HOST:PORT COUNT PREFIX} prints C{registered COUNT in SECONDS} and keeps
the session (and so the leases) until killed.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols import amp

from portal.trust.challenge import signRegistration
from portal.trust.identity import Identity, identityId
from portal.wire.control import MAX_VERSION, MIN_VERSION, Challenge, Hello, Register

#: Names per Register (the relay's default limit).
BATCH = 16


async def register(address: str, count: int, prefix: str) -> None:
    """
    Connect, then Challenge + Register C{count} names in batches.
    """
    host, _, port = address.rpartition(":")
    endpoint = wrapClientTLS(
        CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3),
        HostnameEndpoint(reactor, host, int(port), timeout=10),
    )
    client: Any = await connectProtocol(endpoint, amp.AMP())
    hello = await client.callRemote(
        Hello,
        minVersion=MIN_VERSION,
        maxVersion=MAX_VERSION,
        capabilities=["stream"],
        software="bench",
    )
    relayId = identityId(hello["relayKey"])
    identity = Identity.generate()
    start = time.perf_counter()
    for first in range(0, count, BATCH):
        names = [f"{prefix}{i}" for i in range(first, min(count, first + BATCH))]
        challenge = await client.callRemote(Challenge, names=names)
        await client.callRemote(
            Register,
            publicKey=identity.publicKey,
            names=names,
            nonce=challenge["nonce"],
            signature=signRegistration(identity, relayId, challenge["nonce"], names),
            mode="stream",
        )
    print(f"registered {count} in {time.perf_counter() - start:.6f}", flush=True)


def main(argv: list[str]) -> None:
    """
    Register, report, then keep the session open until killed.
    """

    def run() -> None:
        d = ensureDeferred(register(argv[0], int(argv[1]), argv[2]))
        d.addErrback(
            lambda f: (print(f"failed: {f.getErrorMessage()}", flush=True), reactor.stop())
        )

    reactor.callWhenRunning(run)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
