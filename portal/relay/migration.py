"""
The one-time move of an earlier relay's C{leases.json} and C{ports.json} into the lease store.

Earlier relays rewrote these files whole after every change.  At start, a relay that finds them
imports their names and ports into its table and allocators (and so into the store), then renames
each file to C{*.migrated}, so that the import happens once.  A file that cannot be read or parsed
stops the relay instead: starting without it would give its names to whoever registered first.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs

from portal.relay.leases import LeaseTable
from portal.relay.ports import PortAllocator, PortStateError
from portal.relay.store import StoreDamaged

#: The files of earlier relays, in the state directory.
LEASES_JSON = "leases.json"
PORTS_JSON = "ports.json"

#: What a file is renamed to once imported.
MIGRATED_SUFFIX = ".migrated"


@attrs.frozen
class Migrated:
    """
    What one file gave the store.

    @ivar path: The file (now renamed to C{path + ".migrated"}).
    @ivar what: What was imported, for a log line (C{"lease names"}, C{"tcp port assignments"}).
    @ivar count: How many records were imported.
    """

    path: str
    what: str
    count: int


def _read(path: str) -> Any:
    """
    Read a JSON file of an earlier relay.

    @param path: The file.
    @return: Its parsed content.
    @raise StoreDamaged: If it cannot be read or parsed, naming the file and what to do.
    """
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise _cannotImport(path, e) from e


def _cannotImport(path: str, error: Exception) -> StoreDamaged:
    """
    @param path: A file of an earlier relay.
    @param error: Why it cannot be imported.
    @return: The error that stops the relay.
    """
    return StoreDamaged(
        f"cannot import {path} into the lease store ({error}); restore it from a backup, or "
        f"move it aside to start without the names and ports it holds"
    )


def importJSONState(
    stateDir: str, leases: LeaseTable, allocators: dict[str, PortAllocator]
) -> list[Migrated]:
    """
    Import C{leases.json} and C{ports.json} from C{stateDir}, if present, and rename them.

    @param stateDir: The relay's state directory.
    @param leases: The lease table, built on the store.
    @param allocators: The port allocators by kind (C{"tcp"}, C{"udp"}), built on the store; the
        assignments of a kind the relay does not offer now are not imported.
    @return: What was imported, one entry per kind of record.
    @raise StoreDamaged: If a file cannot be read or is not in the format earlier relays wrote.
    @raise portal.relay.store.StoreError: If the store cannot be written.
    """
    done: list[Migrated] = []
    path = os.path.join(stateDir, LEASES_JSON)
    if os.path.exists(path):
        try:
            count = leases.importJSON(_read(path))
        except ValueError as e:
            raise _cannotImport(path, e) from e
        os.replace(path, path + MIGRATED_SUFFIX)
        done.append(Migrated(path, "lease names", count))
    path = os.path.join(stateDir, PORTS_JSON)
    if os.path.exists(path):
        saved = _read(path)
        if not isinstance(saved, dict):
            raise _cannotImport(path, ValueError("not a JSON object"))
        for kind, allocator in sorted(allocators.items()):
            if kind in saved:
                try:
                    count = allocator.importJSON(saved[kind])
                except PortStateError as e:
                    raise _cannotImport(path, e) from e
                done.append(Migrated(path, f"{kind} port assignments", count))
        os.replace(path, path + MIGRATED_SUFFIX)
    return done
