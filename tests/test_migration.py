"""
Tests for L{portal.relay.migration}: an earlier relay's JSON files imported into the store once.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.leases import LeaseTable
from portal.relay.migration import LEASES_JSON, PORTS_JSON, Migrated, importJSONState
from portal.relay.ports import PortAllocator, PortRange
from portal.relay.store import MemoryLeaseStore, StoreDamaged

ALICE = "a" * 52
BOB = "b" * 52


class ImportJSONStateTests(SynchronousTestCase):
    """
    Tests for L{importJSONState}.
    """

    def setUp(self) -> None:
        """
        A state directory, a store, and a table and TCP allocator on it.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.stateDir = os.path.abspath(self.mktemp())
        os.makedirs(self.stateDir)
        self.store = MemoryLeaseStore()
        self.leases = LeaseTable(self.clock, store=self.store)
        self.tcp = PortAllocator(PortRange(9000, 9009), self.clock, store=self.store, kind="tcp")

    def write(self, name: str, content: Any) -> str:
        """
        Write a file of the state directory, as JSON unless it is C{bytes}.

        @return: Its path.
        """
        path = os.path.join(self.stateDir, name)
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else json.dumps(content).encode())
        return path

    def test_importedOnce(self) -> None:
        """
        Names and ports of the kinds offered are imported into the store and the files renamed
        to C{*.migrated}; a second run finds nothing to do.
        """
        leases = self.write(
            LEASES_JSON,
            {"version": 1, "leases": {"web": {"owner": ALICE, "expiresAt": 1050}}},
        )
        ports = self.write(
            PORTS_JSON,
            {
                "tcp": {"version": 1, "ports": [{"port": 9004, "identity": BOB, "name": "ssh"}]},
                "udp": {"version": 1, "ports": [{"port": 7000, "identity": BOB, "name": "dns"}]},
            },
        )
        done = importJSONState(self.stateDir, self.leases, {"tcp": self.tcp})
        self.assertEqual(
            done,
            [Migrated(leases, "lease names", 1), Migrated(ports, "tcp port assignments", 1)],
        )
        self.assertEqual([r.owner for r in self.store.names()], [ALICE])
        self.assertEqual([r.port for r in self.store.ports("tcp")], [9004])
        self.assertEqual(self.tcp.portFor(BOB, "ssh"), 9004)
        for path in (leases, ports):
            self.assertFalse(os.path.exists(path))
            self.assertTrue(os.path.exists(path + ".migrated"))
        self.assertEqual(importJSONState(self.stateDir, self.leases, {"tcp": self.tcp}), [])

    def test_nothingToImport(self) -> None:
        """
        Without the files nothing happens.
        """
        self.assertEqual(importJSONState(self.stateDir, self.leases, {}), [])
        self.assertEqual(os.listdir(self.stateDir), [])

    def test_damagedLeaseFile(self) -> None:
        """
        A C{leases.json} that cannot be parsed, or is not a lease table, stops the import with
        L{StoreDamaged} naming the file; it is not renamed and nothing is imported.
        """
        for content in [b"{not json", b"", {"version": 1}, ["x"]]:
            path = self.write(LEASES_JSON, content)
            error = self.assertRaises(StoreDamaged, importJSONState, self.stateDir, self.leases, {})
            self.assertIn(f"cannot import {path} into the lease store", str(error))
            self.assertIn("restore it from a backup, or move it aside", str(error))
            self.assertTrue(os.path.exists(path))
            self.assertEqual(list(self.store.names()), [])

    def test_damagedPortFile(self) -> None:
        """
        A C{ports.json} that is not what earlier relays wrote stops the import, naming the file.
        """
        for content in [b"[1, 2]", {"tcp": {"version": 1, "ports": [{"port": "x"}]}}]:
            path = self.write(PORTS_JSON, content)
            error = self.assertRaises(
                StoreDamaged, importJSONState, self.stateDir, self.leases, {"tcp": self.tcp}
            )
            self.assertIn(f"cannot import {path}", str(error))
            self.assertTrue(os.path.exists(path))
