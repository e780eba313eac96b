"""
C{portal relays}: check every relay of a registry (health check, and the signed descriptor when the
registry gives its URL) and show the result as a table or as JSON lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults

from portal.registry.descriptor import MAX_DESCRIPTOR_BYTES, DescriptorError, verifyDescriptor
from portal.registry.document import REGISTRY_MODES, FetchError, Registry, RegistryEntry, fetch
from portal.registry.health import Health, checkRelay


class HTTPSWithCA:
    """
    What C{portal relays --cacert} fetches with: C{https://} URLs with a client that trusts the
    given CA, plain C{http://} ones (descriptors may be served so) with an ordinary client.
    """

    def __init__(self, https: Any, plain: Any) -> None:
        """
        @param https: The client for C{https://} URLs (C{treq}'s C{get}).
        @param plain: The client for the others.
        """
        self._https = https
        self._plain = plain

    def get(self, url: str, *args: Any, **kwargs: Any) -> Any:
        """
        GET C{url} with the client for its scheme.
        """
        client = self._https if url.lower().startswith("https://") else self._plain
        return client.get(url, *args, **kwargs)


@attrs.frozen
class RelayStatus:
    """
    What C{portal relays} found out about one registry relay.

    @ivar entry: The relay, as the registry lists it.
    @ivar health: Its health check.
    @ivar descriptor: C{"ok"} when its descriptor verified and agrees with the entry, why not
        otherwise, or L{None} when the registry gives no descriptor URL.
    """

    entry: RegistryEntry
    health: Health
    descriptor: str | None = None

    @property
    def ok(self) -> bool:
        """
        Whether the relay is healthy and its descriptor, if any, checked out.
        """
        return self.health.ok and self.descriptor in (None, "ok")

    @property
    def reason(self) -> str:
        """
        C{"ok"}, or the first thing found wrong.
        """
        if not self.health.ok:
            return self.health.reason
        if self.descriptor not in (None, "ok"):
            return f"descriptor: {self.descriptor}"
        return "ok"


def orderedModes(modes: frozenset[str]) -> list[str]:
    """
    @return: C{modes} in the order of L{REGISTRY_MODES}.
    """
    return [mode for mode in REGISTRY_MODES if mode in modes]


async def checkDescriptor(reactor: Any, entry: RegistryEntry, http: Any = None) -> str:
    """
    Fetch the entry's descriptor and check it: signature, that it is the entry's relay, that it was
    issued within a day (by this machine's clock), and that it offers every mode the entry lists.

    @param reactor: The reactor (fetching, and the current time).
    @param entry: A registry entry with a descriptor URL.
    @param http: See L{portal.registry.document.fetch}.
    @return: C{"ok"}, or why the descriptor does not check out.
    """
    assert entry.descriptor is not None
    try:
        content = await fetch(reactor, entry.descriptor, http, limit=MAX_DESCRIPTOR_BYTES)
        descriptor = verifyDescriptor(content, entry.id, now=reactor.seconds())
    except (FetchError, DescriptorError) as e:
        return str(e)
    missing = [mode for mode in orderedModes(entry.modes) if mode not in descriptor.modes]
    if missing:
        return f"the registry lists {', '.join(missing)} mode, which the relay does not offer"
    return "ok"


def surveyRegistry(
    reactor: Any,
    registry: Registry,
    check: Callable[..., Deferred[Health]] = checkRelay,
    http: Any = None,
) -> Deferred[list[RelayStatus]]:
    """
    Check every relay of a registry at once.

    @param reactor: The reactor.
    @param registry: The registry.
    @param check: The health check (L{checkRelay}), called with the reactor, an entry and its modes.
    @param http: See L{portal.registry.document.fetch}, for descriptors.
    @return: A L{Deferred} firing with a status per relay, in the registry's order.
    """

    async def one(entry: RegistryEntry) -> RelayStatus:
        health = await check(reactor, entry, entry.modes)
        descriptor = None
        if entry.descriptor is not None:
            descriptor = await checkDescriptor(reactor, entry, http)
        return RelayStatus(entry, health, descriptor)

    return gatherResults([Deferred.fromCoroutine(one(entry)) for entry in registry.relays])


def statusJSON(status: RelayStatus) -> dict[str, Any]:
    """
    @return: One relay's status as a JSON object (a line of C{portal relays --json}).
    """
    latency = status.health.latency
    return {
        "address": status.entry.address,
        "id": status.entry.id,
        "modes": orderedModes(status.entry.modes),
        "region": status.entry.region,
        "ok": status.ok,
        "health": status.reason,
        "latencyMs": None if latency is None else round(latency * 1000, 1),
        "descriptor": status.descriptor,
        "software": status.health.software,
    }


def formatJSON(statuses: Sequence[RelayStatus]) -> str:
    """
    @return: One JSON object per relay, one per line, keys sorted.
    """
    return "".join(json.dumps(statusJSON(s), sort_keys=True) + "\n" for s in statuses)


def formatTable(registry: Registry, statuses: Sequence[RelayStatus]) -> str:
    """
    @return: A summary line and a table of the relays: address, short id, modes, region, latency,
        health (C{ok} or the reason).
    """
    rows = [["ADDRESS", "ID", "MODES", "REGION", "LATENCY", "HEALTH"]]
    for status in statuses:
        latency = status.health.latency
        rows.append(
            [
                status.entry.address,
                status.entry.shortId,
                ",".join(orderedModes(status.entry.modes)),
                status.entry.region or "-",
                "-" if latency is None else f"{latency * 1000:.1f} ms",
                status.reason,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    healthy = sum(1 for s in statuses if s.ok)
    lines = [f"registry {registry.source}: {len(statuses)} relays, {healthy} healthy"]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines) + "\n"
