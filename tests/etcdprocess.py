"""
A real etcd for tests: single nodes and three-node clusters on 127.0.0.1 with free ports, in a
temporary directory, stopped when the test ends.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.realprocesses import WatchedProcess, pollUntil, spawn


def freePort() -> int:
    """
    @return: A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcdProgram() -> str:
    """
    @return: The path of C{etcd}.
    @raise AssertionError: When it is missing (C{.ci/run} installs Debian's C{etcd-server}).
    """
    program = shutil.which("etcd")
    if program is None:
        raise AssertionError("etcd is needed (Debian etcd-server; .ci/run installs it)")
    return program


class EtcdNode:
    """
    One etcd member: its process, client URL and data directory.
    """

    def __init__(self, name: str, clientPort: int, peerPort: int, dataDir: str) -> None:
        self.name = name
        self.clientPort = clientPort
        self.peerPort = peerPort
        self.dataDir = dataDir
        self.process: WatchedProcess | None = None

    @property
    def clientURL(self) -> str:
        """
        @return: C{http://127.0.0.1:PORT} of its client (and JSON gateway) listener.
        """
        return f"http://127.0.0.1:{self.clientPort}"

    @property
    def peerURL(self) -> str:
        """
        @return: Its peer URL.
        """
        return f"http://127.0.0.1:{self.peerPort}"


def _healthy(url: str) -> bool:
    """
    @return: Whether C{url}/health says the member is healthy (a blocking check, tiny and local).
    """
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return b'"true"' in response.read()
    except OSError:
        return False


@inlineCallbacks
def startNode(testCase: TestCase, node: EtcdNode, cluster: str) -> Any:
    """
    Start (or restart) one member and wait until it reports healthy.
    """
    argv = [
        etcdProgram(),
        "--name",
        node.name,
        "--data-dir",
        node.dataDir,
        "--listen-client-urls",
        node.clientURL,
        "--advertise-client-urls",
        node.clientURL,
        "--listen-peer-urls",
        node.peerURL,
        "--initial-advertise-peer-urls",
        node.peerURL,
        "--initial-cluster",
        cluster,
        "--initial-cluster-state",
        "new",
        "--log-level",
        "warn",
    ]
    node.process = spawn(testCase, f"etcd-{node.name}", argv, os.path.dirname(node.dataDir))
    yield pollUntil(lambda: _healthy(node.clientURL), f"etcd {node.name} healthy")
    return node


@inlineCallbacks
def startEtcd(testCase: TestCase, members: int = 1) -> Any:
    """
    Start an etcd cluster of C{members} nodes.

    @return: A L{Deferred} firing with the list of L{EtcdNode}.
    """
    base = testCase.mktemp()
    os.makedirs(base)
    nodes = [
        EtcdNode(f"n{i}", freePort(), freePort(), os.path.join(base, f"n{i}"))
        for i in range(members)
    ]
    cluster = ",".join(f"{n.name}={n.peerURL}" for n in nodes)
    if members == 1:
        yield startNode(testCase, nodes[0], cluster)
    else:
        from twisted.internet.defer import gatherResults

        yield gatherResults([startNode(testCase, n, cluster) for n in nodes])
    return nodes


@inlineCallbacks
def startWorkerRelay(testCase: TestCase, extra: Sequence[str] = ()) -> Any:
    """
    Start a real etcd and a C{twistd -n portal-relay --workers 2} in a cluster on it (tunnel domain
    C{cluster.localhost}), and wait until its second worker has joined.

    @param extra: More relay options.
    @return: A L{Deferred} firing with the relay process, its public and control ports, and its
        state directory.
    """
    from tests.realprocesses import homeDir, startRelay

    nodes = yield startEtcd(testCase)
    state = os.path.join(homeDir(testCase, "relay"), "state")
    relay, public, control = yield startRelay(
        testCase,
        state,
        extra=[
            "--tunnel-domain",
            "cluster.localhost",
            "--cluster",
            f"etcd://127.0.0.1:{nodes[0].clientPort}",
            "--workers",
            "2",
            *extra,
        ],
    )
    yield relay.waitFor(r"joined relay cluster .* as \S+-w1 ")
    return relay, public, control, state
