"""
Tests for L{portal.tunnel.relaypool}: picking registry relays by rank and health, and replacing one
that stays down, on a memory reactor's clock with fake registry loading and health checks; and the
C{--registry} / C{--max-relays} options.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from portal.cli.exposeoptions import TunnelOptions
from portal.registry.document import Registry, RegistryEntry, RegistryError, rank
from portal.registry.health import Health
from portal.trust.identity import Identity, saveIdentity
from portal.tunnel.config import DEFAULT_MAX_RELAYS, RelayAddress, TunnelConfig, buildConfig
from portal.tunnel.relaypool import (
    CHECK_INTERVAL,
    REPLACE_AFTER,
    SEARCH_INTERVAL,
    PoolLink,
    RelayPool,
)
from portal.tunnel.report import Reporter
from portal.tunnel.service import RelayLink, TunnelService

SOURCE = "relays.json"


class FakeProtocol:
    """
    Stands in for a registered control session.
    """

    def unregister(self) -> Deferred[None]:
        """
        End the leases: done at once.
        """
        return succeed(None)


class RelayPoolTests(SynchronousTestCase):
    """
    L{RelayPool} holds leases on the best healthy registry relays and replaces those that stay down.
    """

    def setUp(self) -> None:
        """
        A tunnel identity, six registry relays on 127.0.0.1 (all healthy unless a test says otherwise)
        in the tunnel's rank order, and a memory reactor.
        """
        self.reactor = MemoryReactorClock()
        self.identityPath = os.path.join(self.mktemp(), "identity.json")
        self.identity = Identity.generate()
        saveIdentity(self.identity, self.identityPath)
        entries = [
            RegistryEntry(
                "127.0.0.1",
                4001 + i,
                Identity.generate().id,
                frozenset({"stream", "tcp"} if i % 2 else {"stream"}),
            )
            for i in range(6)
        ]
        self.entries = entries
        #: The relays, best first for the tunnel.
        self.ranked = rank(self.identity.id, entries)
        self.health: dict[str, Health] = {}
        self.checks: list[tuple[str, list[str]]] = []
        self.fatals: list[str] = []
        self.registryError: RegistryError | None = None
        #: Health checks of these relays wait until the test fires them.
        self.slow: dict[str, list[Deferred[Health]]] = {}

    def load(self, reactor: Any, source: str) -> Deferred[Registry]:
        """
        The fake registry loader.
        """
        if self.registryError is not None:
            return fail(self.registryError)
        return succeed(Registry(source, tuple(self.entries)))

    def check(self, reactor: Any, entry: RegistryEntry, modes: list[str]) -> Deferred[Health]:
        """
        The fake health check: healthy unless set otherwise.
        """
        self.checks.append((entry.address, modes))
        if entry.id in self.slow:
            d: Deferred[Health] = Deferred()
            self.slow[entry.id].append(d)
            return d
        return succeed(self.health.get(entry.id, Health(True, "ok", 0.002, entry.id)))

    def down(self, entry: RegistryEntry) -> None:
        """
        Make C{entry} fail its health check from now on.
        """
        self.health[entry.id] = Health(False, "cannot connect: refused")

    def start(self, count: int = 2, **config: Any) -> RelayPool:
        """
        Start a tunnel with a relay pool of C{count} relays.
        """
        tunnelConfig: TunnelConfig = attrs.evolve(
            buildConfig("8000", identityPath=self.identityPath, json=True, **config),
            **({} if "relays" in config else {"relays": ()}),
        )
        self.reporter = Reporter(io.StringIO(), asJSON=True)
        self.tunnel = TunnelService(tunnelConfig, self.reactor, self.reporter, self.fatals.append)
        pool = RelayPool(self.tunnel, SOURCE, count, load=self.load, check=self.check)
        pool.setServiceParent(self.tunnel)
        self.tunnel.startService()
        self.addCleanup(self.tunnel.stopService)
        return pool

    def events(self, name: str) -> list[dict[str, Any]]:
        """
        @return: The reported events called C{name}.
        """
        return [e for e in self.reporter.events if e["event"] == name]

    def held(self, pool: RelayPool) -> list[str]:
        """
        @return: The addresses of the relays the pool holds, in order.
        """
        return [link.relay.address for link in pool.links]

    def live(self, link: RelayLink) -> None:
        """
        Make C{link}'s lease live, as its control session would.
        """
        link.registered(FakeProtocol(), ["app.localhost"], 8443)  # type: ignore[arg-type]

    def test_picksBestHealthy(self) -> None:
        """
        The pool health-checks relays in rank order, skips an unhealthy one (reporting it), and holds
        the first healthy ones, each with the registry's id as the identity it must prove.
        """
        self.down(self.ranked[0])
        pool = self.start()
        self.assertEqual(self.held(pool), [self.ranked[1].address, self.ranked[2].address])
        self.assertEqual(
            [address for address, _ in self.checks],
            [self.ranked[0].address, self.ranked[1].address, self.ranked[2].address],
        )
        self.assertEqual(
            [link.relay for link in pool.links],
            [RelayAddress(e.host, e.port, e.id) for e in self.ranked[1:3]],
        )
        self.assertEqual(self.tunnel.links, pool.links)
        self.assertTrue(all(link.running for link in pool.links))
        [skipped] = self.events("skipped")
        self.assertEqual(skipped["relay"], self.ranked[0].address)
        self.assertEqual(skipped["relayId"], self.ranked[0].id)
        self.assertIn("cannot connect: refused", skipped["message"])
        self.assertEqual(
            [(e["relay"], e["rank"]) for e in self.events("selected")],
            [(self.ranked[1].address, 2), (self.ranked[2].address, 3)],
        )
        [summary] = self.events("registry")
        self.assertEqual((summary["relays"], summary["usable"]), (6, 6))
        self.assertEqual(self.fatals, [])

    def test_maxRelays(self) -> None:
        """
        The pool holds exactly C{count} relays, the best ones.
        """
        pool = self.start(count=3)
        self.assertEqual(self.held(pool), [e.address for e in self.ranked[:3]])
        self.assertEqual(len(self.checks), 3)

    def test_onlyRelaysOfferingTheMode(self) -> None:
        """
        Only relays whose entry offers the tunnel's modes are candidates, checked for those modes.
        """
        pool = self.start(tcp=True)
        tcpRelays = [e for e in self.ranked if "tcp" in e.modes]
        self.assertEqual(pool.candidates, tcpRelays)
        self.assertEqual(self.held(pool), [e.address for e in tcpRelays[:2]])
        self.assertEqual({tuple(modes) for _, modes in self.checks}, {("tcp",)})

    def test_explicitRelayAddedNotPicked(self) -> None:
        """
        A relay given with C{--relay} is held besides the registry's, and not picked again from the
        registry.
        """
        explicit = self.ranked[0]
        pool = self.start(relays=[explicit.address])
        self.assertEqual(self.held(pool), [e.address for e in self.ranked[1:3]])
        self.assertEqual(
            [link.relay.address for link in self.tunnel.links],
            [explicit.address, self.ranked[1].address, self.ranked[2].address],
        )
        self.assertNotIsInstance(self.tunnel.links[0], PoolLink)

    def test_unloadableRegistry(self) -> None:
        """
        A registry that cannot be loaded stops the tunnel with the reason.
        """
        self.registryError = RegistryError("relays.json: not valid JSON: boom")
        pool = self.start()
        self.assertEqual(
            self.fatals, ["cannot load the registry relays.json: not valid JSON: boom"]
        )
        self.assertEqual(pool.links, [])

    def test_noRelayForMode(self) -> None:
        """
        A registry with no relay offering the tunnel's modes stops the tunnel.
        """
        self.entries = [e for e in self.entries if "tcp" not in e.modes]
        self.start(tcp=True)
        self.assertEqual(self.fatals, [f"the registry {SOURCE} lists no relay offering tcp mode"])

    def test_replacedAfterDelay(self) -> None:
        """
        A held relay that never gets a live lease is replaced by the next healthy relay in rank order
        once L{REPLACE_AFTER} seconds have passed, not before; a live one stays.
        """
        self.down(self.ranked[2])
        pool = self.start()
        first, second = pool.links
        self.live(first)
        self.reactor.advance(REPLACE_AFTER - CHECK_INTERVAL)
        self.assertEqual(pool.links, [first, second])
        self.reactor.advance(CHECK_INTERVAL)
        self.assertEqual(self.held(pool), [self.ranked[0].address, self.ranked[3].address])
        self.assertFalse(second.running)
        self.assertNotIn(second, self.tunnel.links)
        self.assertIsNone(second.parent)
        [replaced] = self.events("replaced")
        self.assertEqual(replaced["relay"], self.ranked[1].address)
        self.assertEqual(replaced["replacement"], self.ranked[3].address)
        self.assertIn(f"for {REPLACE_AFTER:.0f} s", replaced["message"])

    def test_lostThenReplaced(self) -> None:
        """
        The delay counts from when a live lease was lost.
        """
        pool = self.start()
        first, second = pool.links
        self.live(first)
        self.live(second)
        self.reactor.advance(10)
        second.controlLost(second.protocol)  # type: ignore[arg-type]
        self.reactor.advance(REPLACE_AFTER - CHECK_INTERVAL)
        self.assertEqual(pool.links, [first, second])
        self.reactor.advance(CHECK_INTERVAL)
        self.assertEqual(self.held(pool), [self.ranked[0].address, self.ranked[2].address])

    def test_recoveredNotReplaced(self) -> None:
        """
        A relay whose lease comes back within the delay stays.
        """
        pool = self.start()
        first, second = pool.links
        self.live(first)
        self.reactor.advance(REPLACE_AFTER - CHECK_INTERVAL)
        self.live(second)
        self.reactor.advance(10 * REPLACE_AFTER)
        self.assertEqual(pool.links, [first, second])
        self.assertEqual(self.events("replaced"), [])

    def test_staleKeptWithoutReplacement(self) -> None:
        """
        When no other relay is healthy, a stale relay is kept (it may come back), the tunnel says it
        is short once, and the registry is searched again only every L{SEARCH_INTERVAL} seconds.
        """
        for entry in self.ranked[2:]:
            self.down(entry)
        pool = self.start()
        first, second = pool.links
        self.live(first)
        self.reactor.advance(REPLACE_AFTER)
        self.assertEqual(pool.links, [first, second])
        checks = len(self.checks)
        [degraded] = self.events("degraded")
        self.assertEqual((degraded["working"], degraded["wanted"]), (1, 2))
        self.assertEqual(len(self.events("skipped")), 4, "each unhealthy relay reported once")
        self.reactor.advance(SEARCH_INTERVAL - CHECK_INTERVAL)
        self.assertEqual(len(self.checks), checks)
        self.reactor.advance(CHECK_INTERVAL)
        self.assertEqual(len(self.checks), checks + 4)
        self.assertEqual(len(self.events("degraded")), 1)
        self.assertEqual(len(self.events("skipped")), 4)
        del self.health[self.ranked[4].id]
        self.reactor.advance(SEARCH_INTERVAL)
        self.assertEqual(self.held(pool), [self.ranked[0].address, self.ranked[4].address])

    def test_shortAtStart(self) -> None:
        """
        With fewer healthy relays than wanted the pool holds what it can, and adds one when it becomes
        healthy.
        """
        for entry in self.ranked[1:]:
            self.down(entry)
        pool = self.start()
        self.assertEqual(self.held(pool), [self.ranked[0].address])
        self.assertEqual(self.events("degraded")[0]["working"], 1)
        del self.health[self.ranked[3].id]
        self.reactor.advance(SEARCH_INTERVAL)
        self.assertEqual(self.held(pool), [self.ranked[0].address, self.ranked[3].address])
        self.assertEqual(self.fatals, [])

    def test_refusedDropped(self) -> None:
        """
        A relay that refuses the tunnel (an error reconnecting cannot fix) is dropped and replaced
        at the next look; the tunnel does not stop, and the relay is not tried again.
        """
        pool = self.start()
        first, second = pool.links
        second.fatal("the relay refused the lease: name 'app' is taken by another identity")
        self.assertEqual(pool.links, [first])
        self.assertFalse(second.running)
        [dropped] = self.events("dropped")
        self.assertEqual(dropped["relay"], self.ranked[1].address)
        self.assertIn("is taken by another identity", dropped["message"])
        self.reactor.advance(CHECK_INTERVAL)
        self.assertEqual(self.held(pool), [self.ranked[0].address, self.ranked[2].address])
        self.assertEqual(self.fatals, [])
        self.reactor.advance(REPLACE_AFTER * 3)
        self.assertNotIn(self.ranked[1].address, [address for address, _ in self.checks[3:]])

    def test_changesDuringSearch(self) -> None:
        """
        While a replacement is being health-checked, the stale relay may be dropped (or come back):
        the replacement is then held in addition, and nothing is dropped twice.
        """
        self.slow[self.ranked[2].id] = []
        pool = self.start()
        first, second = pool.links
        self.live(first)
        self.reactor.advance(REPLACE_AFTER)
        [pending] = self.slow[self.ranked[2].id]
        second.fatal("the relay refused the lease: nope")
        pending.callback(Health(True, "ok", 0.001, self.ranked[2].id))
        self.assertEqual(self.held(pool), [self.ranked[0].address, self.ranked[2].address])
        self.assertEqual(self.events("replaced"), [])
        self.assertEqual(len(self.events("dropped")), 1)

    def test_comesBackDuringSearch(self) -> None:
        """
        A stale relay whose lease comes back while its replacement is checked is kept; the healthy
        candidate is not added beyond C{count}.
        """
        self.slow[self.ranked[2].id] = []
        pool = self.start()
        first, second = pool.links
        self.live(first)
        self.reactor.advance(REPLACE_AFTER)
        [pending] = self.slow[self.ranked[2].id]
        self.live(second)
        pending.callback(Health(True, "ok", 0.001, self.ranked[2].id))
        self.assertEqual(pool.links, [first, second])

    def test_allRefusedFatal(self) -> None:
        """
        When every registry relay has refused the tunnel, it stops.
        """
        self.entries = self.entries[:1]
        pool = self.start(count=1)
        [link] = pool.links
        link.fatal("the relay refused the lease: nope")
        self.reactor.advance(CHECK_INTERVAL)
        self.assertEqual(self.fatals, [f"no relay in the registry {SOURCE} can serve this tunnel"])

    def test_flag(self) -> None:
        """
        Messages about a registry relay's identity name C{--registry} as where it came from.
        """
        pool = self.start()
        self.assertEqual(pool.links[0].flag, "--registry")

    def test_tunnelServiceMakesPool(self) -> None:
        """
        A tunnel configured with a registry gets a relay pool of C{--max-relays} relays, and no
        default relay.
        """
        config = buildConfig("8000", identityPath=self.identityPath, registry=SOURCE, maxRelays=3)
        tunnel = TunnelService(config, self.reactor, Reporter(io.StringIO()), self.fatals.append)
        [pool] = [s for s in tunnel if isinstance(s, RelayPool)]
        self.assertEqual((pool.source, pool.count), (SOURCE, 3))
        self.assertEqual(tunnel.links, [])


class RegistryOptionsTests(SynchronousTestCase):
    """
    C{--registry} and C{--max-relays}.
    """

    def parse(self, *arguments: str) -> TunnelConfig:
        """
        @return: The configuration of a command line.
        """
        options = TunnelOptions()
        options.parseOptions(list(arguments))
        return options.tunnelConfig

    def test_registry(self) -> None:
        """
        C{--registry} replaces the default relay; C{--max-relays} defaults to 2.
        """
        config = self.parse("8000", "--registry", "https://registry.example/relays.json")
        self.assertEqual(config.registry, "https://registry.example/relays.json")
        self.assertEqual(config.maxRelays, DEFAULT_MAX_RELAYS)
        self.assertEqual(DEFAULT_MAX_RELAYS, 2)
        self.assertEqual(config.relays, ())

    def test_withRelay(self) -> None:
        """
        C{--relay} adds explicit relays to the registry's.
        """
        config = self.parse("8000", "--registry", "r.json", "--relay", "h:1", "--max-relays", "3")
        self.assertEqual(config.relays, (RelayAddress("h", 1),))
        self.assertEqual(config.maxRelays, 3)

    def test_withoutRegistry(self) -> None:
        """
        Without C{--registry} nothing changes: the default relay, no pool.
        """
        config = self.parse("8000")
        self.assertIsNone(config.registry)
        self.assertEqual(config.relays, (RelayAddress("localhost", 4017),))

    def test_errors(self) -> None:
        """
        C{--max-relays} needs C{--registry} and a count from 1 to 16.
        """
        for arguments, message in [
            (["--max-relays", "2"], "--max-relays needs --registry"),
            (["--registry", "r.json", "--max-relays", "0"], "between 1 and 16"),
            (["--registry", "r.json", "--max-relays", "17"], "between 1 and 16"),
        ]:
            error = self.assertRaises(UsageError, self.parse, "8000", *arguments)
            self.assertIn(message, str(error))
        self.assertRaises(UsageError, self.parse, "8000", "--registry", "r", "--max-relays", "x")

    def test_jsonEvents(self) -> None:
        """
        The pool's events are JSON lines with C{--json} (one object per line).
        """
        out = io.StringIO()
        Reporter(out, asJSON=True).state("skipped", "h:1", "skipping", relayId="x")
        self.assertEqual(
            json.loads(out.getvalue()),
            {"event": "skipped", "relay": "h:1", "message": "skipping", "relayId": "x"},
        )

    def test_textEventsToErrorStream(self) -> None:
        """
        In text mode a skipped, dropped or degraded relay is reported on the error stream; a
        selection or a replacement on the output stream.
        """
        out, err = io.StringIO(), io.StringIO()
        reporter = Reporter(out, err=err)
        for event in ("skipped", "dropped", "degraded", "selected", "replaced"):
            reporter.state(event, "h:1", event)
        self.assertEqual(err.getvalue(), "[h:1] skipped\n[h:1] dropped\n[h:1] degraded\n")
        self.assertEqual(out.getvalue(), "[h:1] selected\n[h:1] replaced\n")
