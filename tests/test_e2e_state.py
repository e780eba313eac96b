"""
End to end: the relay's state directory with real C{twistd portal-relay} and C{portal expose}
processes on 127.0.0.1: a damaged lease store stops the relay and no name changes owner, a second
relay on a state directory in use and a relay on a busy port exit 1 with one line, an earlier
relay's C{leases.json} is migrated, and port reservations cannot empty a range.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from portal.relay.sqlitestore import STORE_FILE
from portal.trust.identity import loadOrCreateIdentity
from tests.realprocesses import (
    WatchedProcess,
    freePortRange,
    homeDir,
    sleep,
    spawnRelay,
    startRelay,
    startTunnel,
    terminate,
    waitForLease,
)


def backUp(path: str, destination: str) -> None:
    """
    Copy a live SQLite store with SQLite's online backup (what C{sqlite3 FILE '.backup DEST'}
    does).

    @param path: The store.
    @param destination: The backup file.
    """
    source = sqlite3.connect(path)
    target = sqlite3.connect(destination)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


class StateDirectoryTests(TestCase):
    """
    The relay's state directory, its lease store and its start-up failures, with real processes.
    """

    timeout = 180

    def setUp(self) -> None:
        """
        A home and state directory for the relay.
        """
        self.relayHome = homeDir(self, "relay")
        self.stateDir = os.path.join(self.relayHome, "state")
        self.store = os.path.join(self.stateDir, STORE_FILE)

    @inlineCallbacks
    def failedStart(self, relay: WatchedProcess, reason: str) -> Any:
        """
        Wait for a relay that cannot start to end, and check that it exited 1 with one line giving
        C{reason} and no traceback.

        @return: A L{Deferred} firing with the relay's output.
        """
        code = yield relay.ended
        output = relay.output()
        self.assertEqual(code, 1, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in relay.lines if "portal-relay cannot start" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(reason, lines[0])
        self.assertNotIn("listening on", output)
        return output

    @inlineCallbacks
    def test_damagedStoreStopsRelay(self) -> Any:
        """
        A relay whose lease store was damaged while it was down exits 1 naming the file and how to
        recover, instead of starting empty; after a restore from a backup, another identity is
        still refused the name and its owner's tunnel gets it back.
        """
        relay, _, controlPort = yield startRelay(self, self.stateDir)
        owner = startTunnel(self, homeDir(self, "owner"), controlPort, "9", ["--name", "live"])
        lease = yield waitForLease(owner)
        self.assertTrue(lease["url"].startswith("https://live.localhost:"))
        backup = os.path.join(self.relayHome, "backup.sqlite3")
        backUp(self.store, backup)
        seen = len(owner.lines)
        yield terminate(relay)
        yield owner.waitFor(r'"event": "disconnected"', after=seen)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.store + suffix):
                with open(self.store + suffix, "r+b") as f:
                    f.write(os.urandom(4096))
        damaged = spawnRelay(self, self.stateDir, control=f"tcp:{controlPort}:interface=127.0.0.1")
        output = yield self.failedStart(damaged, f"lease store {self.store} is damaged")
        self.assertIn(f"sqlite3 {self.store} '.restore BACKUP'", output)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(self.store + suffix):
                os.remove(self.store + suffix)
        shutil.copyfile(backup, self.store)
        seen = len(owner.lines)
        yield startRelay(self, self.stateDir, control=f"tcp:{controlPort}:interface=127.0.0.1")
        squatter = startTunnel(
            self, homeDir(self, "squatter"), controlPort, "9", ["--name", "live"]
        )
        code = yield squatter.ended
        self.assertEqual(code, 1, squatter.output())
        self.assertIn("taken by another identity", squatter.output())
        again = yield waitForLease(owner, after=seen)
        self.assertTrue(again["url"].startswith("https://live.localhost:"))

    @inlineCallbacks
    def test_missingStoreStopsRelay(self) -> Any:
        """
        A relay whose lease store disappeared while it was down (its identity is still there)
        exits 1 naming the file, instead of starting empty and handing the names out again; with
        C{--new-lease-store} it starts, on a new store.
        """
        relay, _, _ = yield startRelay(self, self.stateDir)
        yield terminate(relay)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.store + suffix):
                os.remove(self.store + suffix)
        missing = spawnRelay(self, self.stateDir)
        output = yield self.failedStart(missing, f"lease store {self.store} is missing")
        self.assertIn("--new-lease-store", output)
        self.assertFalse(os.path.exists(self.store))
        yield startRelay(self, self.stateDir, extra=["--new-lease-store"])
        self.assertTrue(os.path.exists(self.store))

    @inlineCallbacks
    def test_lockedStateDirectory(self) -> Any:
        """
        A second relay on a state directory in use exits 1 saying which process holds it; the
        first keeps running.
        """
        first, _, _ = yield startRelay(self, self.stateDir)
        assert first.transport is not None
        second = spawnRelay(self, self.stateDir)
        yield self.failedStart(
            second,
            f"state directory {self.stateDir} is in use by another portal-relay (process "
            f"{first.transport.pid})",
        )
        self.assertIsNone(first.exitCode)

    @inlineCallbacks
    def test_busyPort(self) -> Any:
        """
        A relay whose public port is taken exits 1 with one line naming the port, and no
        traceback.
        """
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        relay = spawnRelay(self, self.stateDir, public=f"tcp:{port}:interface=127.0.0.1")
        yield self.failedStart(relay, f"Couldn't listen on 127.0.0.1:{port}")

    @inlineCallbacks
    def test_leasesJSONMigrated(self) -> Any:
        """
        An earlier relay's C{leases.json} is imported once and renamed: its names keep their
        owners (another identity is refused one, its owner gets it), before and after a restart.
        """
        ownerHome = homeDir(self, "owner")
        owner, _ = loadOrCreateIdentity(os.path.join(ownerHome, "identity.json"))
        os.makedirs(self.stateDir, mode=0o700)
        leases = {
            "version": 1,
            "leases": {"mine": {"owner": owner.id, "expiresAt": time.time() - 10}},
        }
        with open(os.path.join(self.stateDir, "leases.json"), "w") as f:
            json.dump(leases, f)
        relay, _, controlPort = yield startRelay(self, self.stateDir)
        yield relay.waitFor(r"imported 1 lease names from .*leases\.json into the lease store")
        self.assertTrue(os.path.exists(os.path.join(self.stateDir, "leases.json.migrated")))
        self.assertFalse(os.path.exists(os.path.join(self.stateDir, "leases.json")))
        yield terminate(relay)
        relay, _, controlPort = yield startRelay(self, self.stateDir)
        self.assertNotIn("imported", relay.output())
        squatter = startTunnel(
            self, homeDir(self, "squatter"), controlPort, "9", ["--name", "mine"]
        )
        code = yield squatter.ended
        self.assertEqual(code, 1, squatter.output())
        self.assertIn("taken by another identity", squatter.output())
        tunnel = startTunnel(self, ownerHome, controlPort, "9", ["--name", "mine"])
        lease = yield waitForLease(tunnel)
        self.assertTrue(lease["url"].startswith("https://mine.localhost:"))


class PortPressureTests(TestCase):
    """
    Raw TCP port reservations with real processes: squatters that took a whole range and left
    cannot keep it from the next tunnel for the reservation period.
    """

    timeout = 180

    @inlineCallbacks
    def test_oldestReservationGivenUp(self) -> Any:
        """
        Two identities hold both ports of a range long enough to earn reservations, then leave.
        A new tunnel is refused while the reservations are in their grace period (one lease
        lifetime), told when a port frees; after it, it gets the port of the oldest reservation,
        and the relay logs that it gave it up.
        """
        low, high = freePortRange(2)
        ttl = 8
        stateDir = os.path.join(homeDir(self, "relay"), "state")
        relay, _, controlPort = yield startRelay(
            self,
            stateDir,
            extra=[
                "--tcp-ports",
                f"{low}-{high}",
                "--lease-ttl",
                str(ttl),
                "--reserve-after",
                "1",
            ],
        )
        squatters = []
        for name in ("first", "second"):
            squatter = startTunnel(
                self, homeDir(self, name), controlPort, "9", ["--tcp", "--name", name]
            )
            yield waitForLease(squatter)
            squatters.append(squatter)
        yield sleep(1.5)
        for name, squatter in zip(("first", "second"), squatters, strict=True):
            yield terminate(squatter)
            yield relay.waitFor(rf"tcp port \d+ closed: lease {name} ended")
        released = time.monotonic()
        newcomer = homeDir(self, "newcomer")
        early = startTunnel(self, newcomer, controlPort, "9", ["--tcp", "--name", "web"])
        code = yield early.ended
        self.assertLess(time.monotonic() - released, ttl, "the first try came too late to test")
        self.assertEqual(code, 1, early.output())
        self.assertRegex(
            early.output(),
            rf"no free port in {low}-{high}: 0 live, 2 reserved; the next port frees in \d+ s",
        )
        yield sleep(max(0.0, ttl + 1 - (time.monotonic() - released)))
        late = startTunnel(self, newcomer, controlPort, "9", ["--tcp", "--name", "web"])
        lease = yield waitForLease(late)
        opened = re.search(r"tcp port (\d+) open for lease first ", relay.output())
        assert opened is not None
        self.assertTrue(lease["url"].endswith(f":{opened.group(1)}"), lease["url"])
        yield relay.waitFor(r"reserved for first of \w+ given up after \d+ s: no free port")
