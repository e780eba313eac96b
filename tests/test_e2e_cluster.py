"""
End to end: a relay cluster on a real etcd (docs/cluster.md). Three real C{twistd portal-relay}
members serve one tunnel domain; real C{portal expose} tunnels register on one member; visitors arrive
at the others and are forwarded, still encrypted, over member links.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.wire import Echo
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from portal.relay.udpmode import RELAY_MAX_FLOWS
from portal.trust.identity import Identity
from portal.wire.control import RegistrationRefused
from tests.etcdprocess import startEtcd, startWorkerRelay
from tests.realprocesses import (
    WatchedProcess,
    freePortRange,
    homeDir,
    listenLocal,
    pollUntil,
    spawnRelay,
    startExpose,
    startRelay,
    tlsRequest,
    waitForLease,
)
from tests.test_e2e import PAGE, _hostPort, _Page
from tests.test_e2e_registration import FAST, register

#: Members A's and B's public addresses in the two-member tests (two machines' addresses).
MEMBER_HOSTS = ("127.0.0.2", "127.0.0.3")


@inlineCallbacks
def startTwoMembers(case: TestCase, cluster: str, extra: list[str]) -> Any:
    """
    Start members C{a} and C{b} of C{cluster} (tunnel domain C{cluster.localhost}), their public
    listeners on L{MEMBER_HOSTS}, with C{extra} options, and wait until both have joined.

    @return: A L{Deferred} firing with each member's process and control port, A first.
    """
    started: list[tuple[WatchedProcess, int]] = []
    for name, host in zip(("a", "b"), MEMBER_HOSTS, strict=True):
        relay = spawnRelay(
            case,
            os.path.join(homeDir(case, f"relay-{name}"), "state"),
            public=f"tcp:0:interface={host}",
            extra=[
                "--tunnel-domain",
                "cluster.localhost",
                "--cluster",
                cluster,
                "--node-name",
                name,
                *extra,
            ],
        )
        control = yield relay.waitFor(r"control listening on 127\.0\.0\.1:(\d+)")
        yield relay.waitFor(r"joined relay cluster")
        started.append((relay, int(control.group(1))))
    return started


def fetchAt(port: int, url: str, cafile: str) -> bytes:
    """
    GET / for C{url}'s hostname from the relay member whose public port is C{port}.

    @return: The raw response.
    """
    host, _ = _hostPort(url)
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    response, _ = tlsRequest(port, host, request, cafile)
    return response


class ClusterTests(TestCase):
    """
    Three relay members on one etcd.
    """

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        """
        Start etcd, three members with the same tunnel domain, and a local page.
        """
        nodes = yield startEtcd(self)
        self.etcd = nodes[0]
        self.cluster = f"etcd://127.0.0.1:{self.etcd.clientPort}"
        self.members: list[tuple[WatchedProcess, int, int]] = []
        for name in ("a", "b", "c"):
            state = os.path.join(homeDir(self, f"relay-{name}"), "state")
            member = yield startRelay(
                self,
                state,
                extra=[
                    "--tunnel-domain",
                    "cluster.localhost",
                    "--cluster",
                    self.cluster,
                    "--node-name",
                    name,
                    "--cluster-ttl",
                    "3",
                ],
            )
            yield member[0].waitFor(r"joined relay cluster")
            self.members.append(member)
        port = yield listenLocal(self, Site(_Page()))
        self.target = str(port)

    @inlineCallbacks
    def expose(self, member: int, home: str, *extra: str) -> Any:
        """
        Start a tunnel on one member and wait for its lease.

        @return: A L{Deferred} firing with (tunnel, lease event).
        """
        tunnel = startExpose(self, home, self.members[member][2], [self.target, *extra])
        lease = yield waitForLease(tunnel)
        return tunnel, lease

    @inlineCallbacks
    def test_visitorsAtEveryMember(self) -> Any:
        """
        A tunnel on member A serves visitors who arrive at B and C; the members' logs hold no page
        content (they forward ciphertext).
        """
        _, lease = yield self.expose(0, homeDir(self, "alice"), "--name", "blog")
        self.assertIn("blog.cluster.localhost", lease["url"])
        for _, public, _ in self.members:
            response = yield pollUntil(
                lambda public=public: deferToThread(
                    fetchAt, public, lease["url"], lease["ca"]
                ).addErrback(lambda f: None),
                f"the page through the member on port {public}",
                timeout=20,
            )
            self.assertTrue(response.endswith(PAGE), response[-200:])
        for relay, _, _ in self.members:
            self.assertNotIn(PAGE.decode().strip(), relay.output())
        forwardedLogs = self.members[1][0].output() + self.members[2][0].output()
        self.assertNotIn("GET /", forwardedLogs)

    @inlineCallbacks
    def test_nameRaceOnTwoMembers(self) -> Any:
        """
        Two identities asking two members for one name: exactly one owns it.
        """
        alice = startExpose(
            self, homeDir(self, "alice"), self.members[0][2], [self.target, "--name", "race"]
        )
        bob = startExpose(
            self, homeDir(self, "bob"), self.members[1][2], [self.target, "--name", "race"]
        )

        def outcome(tunnel: WatchedProcess) -> str | None:
            text = tunnel.output()
            if '"event": "lease"' in text:
                return "lease"
            if "taken by another identity" in text:
                return "taken"
            return None

        yield pollUntil(lambda: outcome(alice) and outcome(bob), "both tunnels decided", timeout=30)
        self.assertEqual(sorted([outcome(alice), outcome(bob)]), ["lease", "taken"])

    @inlineCallbacks
    def test_etcdAway(self) -> Any:
        """
        With etcd stopped, existing routes keep working across members and new registrations get
        "cluster store unavailable"; when etcd returns, registrations work again.
        """
        _, lease = yield self.expose(0, homeDir(self, "alice"), "--name", "steady")
        public = self.members[1][1]
        yield pollUntil(
            lambda: deferToThread(fetchAt, public, lease["url"], lease["ca"]).addErrback(
                lambda f: None
            ),
            "the page through member b",
            timeout=20,
        )
        assert self.etcd.process is not None
        yield self.etcd.process.stop()
        yield self.members[1][0].waitFor(r"cluster store unavailable", timeout=30)
        response = yield deferToThread(fetchAt, public, lease["url"], lease["ca"])
        self.assertTrue(response.endswith(PAGE))
        late = startExpose(
            self, homeDir(self, "carol"), self.members[2][2], [self.target, "--name", "late"]
        )
        yield late.waitFor(r"cluster store unavailable", timeout=30)
        from tests.etcdprocess import startNode

        yield startNode(self, self.etcd, f"{self.etcd.name}={self.etcd.peerURL}")
        lateLease = yield waitForLease(late)
        self.assertIn("late.cluster.localhost", lateLease["url"])

    @inlineCallbacks
    def test_memberDies(self) -> Any:
        """
        A tunnel on members A and B (a pool): when A dies (SIGKILL), visitors at C reach the tunnel
        through B within the cluster TTL, and a tenant on B alone is served throughout.
        """
        home = homeDir(self, "alice")
        tunnel = startExpose(
            self,
            home,
            self.members[0][2],
            [self.target, "--name", "shared", "--relay", f"127.0.0.1:{self.members[1][2]}"],
        )
        lease = yield waitForLease(tunnel)
        yield pollUntil(
            lambda: sum('"event": "lease"' in line for line in tunnel.lines) >= 2,
            "leases on members a and b",
        )
        _, other = yield self.expose(1, homeDir(self, "bob"), "--name", "other")
        atC = self.members[2][1]

        def fetched(url: str, ca: str) -> Any:
            return deferToThread(fetchAt, atC, url, ca).addErrback(lambda f: None)

        yield pollUntil(lambda: fetched(lease["url"], lease["ca"]), "shared via C", timeout=20)
        self.members[0][0].signal("KILL")
        yield self.members[0][0].ended
        response = yield pollUntil(
            lambda: fetched(lease["url"], lease["ca"]), "shared via C after A died", timeout=20
        )
        self.assertTrue(response.endswith(PAGE))
        response = yield deferToThread(fetchAt, self.members[1][1], other["url"], other["ca"])
        self.assertTrue(response.endswith(PAGE))

    @inlineCallbacks
    def test_alternativeAddresses(self) -> Any:
        """
        A tunnel given two members' control addresses as one relay (C{--relay A,B}) holds its
        lease through A only; when A dies (SIGKILL), its next attempts reach B, the lease comes back
        there with the same URL, and visitors at C are served again.
        """
        a, b = self.members[0][2], self.members[1][2]
        tunnel = startExpose(
            self,
            homeDir(self, "alice"),
            a,
            [self.target, "--name", "moving"],
            relay=f"127.0.0.1:{a},127.0.0.1:{b}",
        )
        lease = yield waitForLease(tunnel)
        self.assertEqual(lease["relay"], f"127.0.0.1:{a}")
        atC = self.members[2][1]

        def fetched() -> Any:
            return deferToThread(fetchAt, atC, lease["url"], lease["ca"]).addErrback(lambda f: None)

        yield pollUntil(fetched, "moving via C", timeout=20)
        self.assertEqual(sum('"event": "lease"' in line for line in tunnel.lines), 1)
        mark = len(tunnel.lines)
        self.members[0][0].signal("KILL")
        yield self.members[0][0].ended
        moved = yield waitForLease(tunnel, after=mark)
        # The same name; the port differs only because each member of this test has a public
        # port of its own (members behind one address share it).
        self.assertEqual(
            (moved["relay"], _hostPort(moved["url"])[0]),
            (f"127.0.0.1:{b}", _hostPort(lease["url"])[0]),
        )
        self.assertIn('"event": "alternative"', "\n".join(tunnel.lines[mark:]))
        response = yield pollUntil(fetched, "moving via C after A died", timeout=20)
        self.assertTrue(response.endswith(PAGE))


class ThreeNodeEtcdTests(TestCase):
    """
    Members on a three-node etcd cluster.
    """

    timeout = 120

    @inlineCallbacks
    def test_oneEtcdNodeDown(self) -> Any:
        """
        With one etcd node of three stopped, routes still work across members and a new tunnel
        registers.
        """
        nodes = yield startEtcd(self, members=3)
        cluster = "etcd://" + ",".join(f"127.0.0.1:{n.clientPort}" for n in nodes)
        members = []
        for name in ("a", "b"):
            state = os.path.join(homeDir(self, f"relay-{name}"), "state")
            member = yield startRelay(
                self,
                state,
                extra=["--tunnel-domain", "cluster.localhost", "--cluster", cluster],
            )
            yield member[0].waitFor(r"joined relay cluster")
            members.append(member)
        port = yield listenLocal(self, Site(_Page()))
        first = startExpose(
            self, homeDir(self, "alice"), members[0][2], [str(port), "--name", "one"]
        )
        lease = yield waitForLease(first)
        # The first endpoint is the one the members talk to: stop it.
        assert nodes[0].process is not None
        yield nodes[0].process.stop()
        second = startExpose(
            self, homeDir(self, "bob"), members[0][2], [str(port), "--name", "two"]
        )
        other = yield waitForLease(second)
        for event in (lease, other):
            response = yield pollUntil(
                lambda event=event: deferToThread(
                    fetchAt, members[1][1], event["url"], event["ca"]
                ).addErrback(lambda f: None),
                f"{event['url']} through member b",
                timeout=30,
            )
            self.assertTrue(response.endswith(PAGE))


class WorkersTests(TestCase):
    """
    C{--workers 2}: two member processes of one relay sharing its ports.
    """

    timeout = 120

    @inlineCallbacks
    def test_twoWorkersServeOneURL(self) -> Any:
        """
        Both workers serve the tunnel's URL: every visitor gets the page, whichever worker the
        kernel hands it to, and the worker without the tunnel hands the visitor's socket to the
        one with it; the workers share the relay's identity. A worker killed with SIGKILL is
        started again and serves again.
        """
        relay, public, control, state = yield startWorkerRelay(self)
        port = yield listenLocal(self, Site(_Page()))
        tunnel = startExpose(self, homeDir(self, "alice"), control, [str(port), "--name", "w"])
        lease = yield waitForLease(tunnel)
        for _ in range(30):
            response = yield deferToThread(fetchAt, public, lease["url"], lease["ca"])
            self.assertTrue(response.endswith(PAGE))
        # The worker without the tunnel hands the visitor's socket to the one with it.
        self.assertIn("handed a visitor for w.cluster.localhost to worker", relay.output())
        # As it was accepted, from its ClientHello peeked at (portal.relay.earlyhandoff).
        self.assertIn("as it was accepted", relay.output())
        self.assertNotIn("forwarded a visitor for w.cluster.localhost", relay.output())
        self.assertEqual(relay.output().count("created relay identity"), 1)
        # A worker that dies is started again by the first one, and serves again.
        started = yield relay.waitFor(r"started worker 1 \(pid (\d+)\)")
        mark = len(relay.lines)
        os.kill(int(started.group(1)), signal.SIGKILL)
        yield relay.waitFor(
            r"worker 1 ended after [\d.]+ s; restarting it in 1 s", timeout=30, after=mark
        )
        yield relay.waitFor(r"joined relay cluster .* as \S+-w1 ", timeout=60, after=mark)
        # If the tunnel's control session was on the killed worker, it reconnects; if it
        # reconnected to the other worker meanwhile, its next data sessions reach the restarted
        # one and fail until it reconnects again (portal.tunnel.data, onStuck). Visitors see at
        # most that gap: then ten visits in a row succeed.
        deadline = time.monotonic() + 45
        inARow = 0
        while inARow < 10:
            try:
                response = yield deferToThread(fetchAt, public, lease["url"], lease["ca"])
                self.assertTrue(response.endswith(PAGE))
                inARow += 1
            except OSError:
                if time.monotonic() > deadline:
                    raise
                inARow = 0
                yield deferLater(reactor, 0.5, lambda: None)
        yield relay.stop()
        # The first worker stops the others before it exits.
        self.assertIn("worker 1 ended", relay.output())


def echoAt(host: str, port: int, line: bytes) -> bytes | None:
    """
    Send C{line} to a raw TCP port at C{host} and read as many bytes back.

    @return: What came back, or L{None} when the connection failed or closed early.
    """
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(line)
            reply = b""
            while len(reply) < len(line):
                chunk = s.recv(len(line) - len(reply))
                if not chunk:
                    return None
                reply += chunk
            return reply
    except OSError:
        return None


def _tcpPort(url: str, scheme: str = "tcp") -> int:
    """
    @return: The port of a C{tcp://HOST:PORT} (or C{scheme}) URL.
    """
    parts = urlsplit(url)
    assert parts.scheme == scheme and parts.port, url
    return parts.port


#: Datagrams in the flood of L{ClusterRawTCPTests.test_udpFloodThroughAMember}, each from its own
#: port: more than a lease's port has flows.
FLOOD = RELAY_MAX_FLOWS + 200


def datagramFrom(
    source: str, target: tuple[str, int], payload: bytes
) -> tuple[bytes, tuple[str, int]] | None:
    """
    Send one datagram from a new port of C{source} to C{target}, and wait up to 2 s for one back.

    @return: The datagram that came back and where it came from, or L{None}.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.bind((source, 0))
        s.sendto(payload, target)
        try:
            data, address = s.recvfrom(65535)
        except OSError:
            return None
        return data, (address[0], address[1])


def floodFrom(source: str, target: tuple[str, int], count: int) -> int:
    """
    Send one datagram from each of C{count} ports of C{source} to C{target}.

    @return: How many were sent (a port in use is skipped).
    """
    sent = 0
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(s)
            try:
                s.bind((source, 0))
                s.sendto(b"flood", target)
            except OSError:
                continue
            sent += 1
    finally:
        for s in sockets:
            s.close()
    return sent


class _DatagramEcho(DatagramProtocol):
    """
    Sends every datagram back to its sender.
    """

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        Echo.
        """
        assert self.transport is not None
        self.transport.write(datagram, addr)


class ClusterRawTCPTests(TestCase):
    """
    Raw TCP and UDP leases on a cluster of two members, each with the same C{--tcp-ports} and
    C{--udp-ports} range: member A's public ports on 127.0.0.2 and member B's on 127.0.0.3 (two
    machines' public addresses).
    """

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        """
        Start etcd, members A and B, and an echo service.
        """
        nodes = yield startEtcd(self)
        cluster = f"etcd://127.0.0.1:{nodes[0].clientPort}"
        low, high = freePortRange(4)
        self.range = (low, high)
        started = yield startTwoMembers(
            self,
            cluster,
            ["--cluster-ttl", "3", "--tcp-ports", f"{low}-{high}", "--udp-ports", f"{low}-{high}"],
        )
        self.relays: list[WatchedProcess] = [relay for relay, _ in started]
        self.members: list[tuple[str, int]] = [
            (host, control) for host, (_, control) in zip(MEMBER_HOSTS, started, strict=True)
        ]
        self.echo = yield listenLocal(self, Factory.forProtocol(Echo))

    @inlineCallbacks
    def exposeTCP(self, member: int, who: str) -> Any:
        """
        Start C{portal expose ECHO --tcp} on a member.

        @return: A L{Deferred} firing with the lease's public port.
        """
        tunnel = startExpose(
            self, homeDir(self, who), self.members[member][1], [f"127.0.0.1:{self.echo}", "--tcp"]
        )
        lease = yield waitForLease(tunnel)
        port = _tcpPort(lease["url"])
        self.assertTrue(self.range[0] <= port <= self.range[1], (port, self.range))
        return port

    def echoed(self, member: int, port: int, line: bytes) -> Any:
        """
        @return: A L{Deferred} firing with the echo of C{line} at a member's address, or L{None}.
        """
        return deferToThread(echoAt, self.members[member][0], port, line)

    @inlineCallbacks
    def test_portServedByEveryMember(self) -> Any:
        """
        A raw TCP tunnel on member A is reached at the same port number on member B's address
        (forwarded over a member link) as on A's; a tunnel of another identity on B gets another
        port, reached at A's address too.
        """
        first = yield self.exposeTCP(0, "alice")
        for member in (0, 1):
            line = f"hello via member {member}\n".encode()
            reply = yield pollUntil(
                lambda member=member, line=line: self.echoed(member, first, line),
                f"the echo at port {first} of member {member}",
                timeout=20,
            )
            self.assertEqual(reply, line)
        self.assertIn(
            f"forwarding TCP port {first} to the member holding it", self.relays[1].output()
        )
        second = yield self.exposeTCP(1, "bob")
        self.assertNotEqual(first, second)
        for member in (0, 1):
            line = b"bob's echo\n" * 1000
            reply = yield pollUntil(
                lambda member=member, line=line: self.echoed(member, second, line),
                f"the echo at port {second} of member {member}",
                timeout=20,
            )
            self.assertEqual(reply, line)
        self.assertIn(
            f"forwarding TCP port {second} to the member holding it", self.relays[0].output()
        )

    @inlineCallbacks
    def test_simultaneousTunnelsGetDistinctPorts(self) -> Any:
        """
        Four raw TCP tunnels started at once, two on each member, fill the four-port range with
        four different ports, each of which echoes at both members' addresses.
        """
        tunnels = [
            startExpose(
                self,
                homeDir(self, f"tenant-{index}"),
                self.members[index % 2][1],
                [f"127.0.0.1:{self.echo}", "--tcp"],
            )
            for index in range(4)
        ]
        ports = []
        for tunnel in tunnels:
            lease = yield waitForLease(tunnel)
            ports.append(_tcpPort(lease["url"]))
        self.assertEqual(sorted(ports), list(range(self.range[0], self.range[1] + 1)))
        for port in ports:
            for member in (0, 1):
                reply = yield pollUntil(
                    lambda member=member, port=port: self.echoed(member, port, b"ping\n"),
                    f"the echo at port {port} of member {member}",
                    timeout=20,
                )
                self.assertEqual(reply, b"ping\n")

    @inlineCallbacks
    def exposeUDP(self, member: int, who: str, service: int) -> Any:
        """
        Start C{portal expose SERVICE --udp} on a member.

        @return: A L{Deferred} firing with the lease's public UDP port.
        """
        tunnel = startExpose(
            self, homeDir(self, who), self.members[member][1], [f"127.0.0.1:{service}", "--udp"]
        )
        lease = yield waitForLease(tunnel)
        port = _tcpPort(lease["url"], "udp")
        self.assertTrue(self.range[0] <= port <= self.range[1], (port, self.range))
        return port

    def udpEchoed(self, source: str, member: int, port: int, payload: bytes) -> Any:
        """
        @return: A L{Deferred} firing with the answer to C{payload} sent from C{source} to a
            member's address, if it came from that very address, else L{None}.
        """
        target = (self.members[member][0], port)

        def exchange() -> bytes | None:
            answer = datagramFrom(source, target, payload)
            return answer[0] if answer is not None and answer[1] == target else None

        return deferToThread(exchange)

    @inlineCallbacks
    def test_udpServedByEveryMember(self) -> Any:
        """
        UDP tunnels on the two members get different ports (claimed in the cluster); each port
        answers at both members' addresses, the other member relaying the datagrams over a member
        link and answering from the port the visitor wrote to; the tunnel is told the visitor's
        real address.
        """
        service = reactor.listenUDP(0, _DatagramEcho(), interface="127.0.0.1")
        self.addCleanup(service.stopListening)
        ports = []
        for member, who in [(0, "alice"), (1, "bob")]:
            ports.append((yield self.exposeUDP(member, who, service.getHost().port)))
        self.assertNotEqual(ports[0], ports[1])
        for holder, port in enumerate(ports):
            for member in (0, 1):
                payload = f"hi {port} via member {member}".encode()
                reply = yield pollUntil(
                    lambda member=member, port=port, payload=payload: self.udpEchoed(
                        "127.0.0.4", member, port, payload
                    ),
                    f"the UDP echo at port {port} of member {member}",
                    timeout=20,
                )
                self.assertEqual(reply, payload)
            other = 1 - holder
            self.assertIn(
                f"forwarding UDP port {port} to the member holding it", self.relays[other].output()
            )
            self.assertIn(f"forwards the UDP visitors of port {port}", self.relays[holder].output())

    @inlineCallbacks
    def test_udpFloodThroughAMember(self) -> Any:
        """
        A flood of datagrams from more ports of 127.0.0.2 than a lease has flows, sent to member
        B for a UDP tunnel on member A, takes no more flows than one source may have at A (which
        sees the visitors' real addresses): a visitor from 127.0.0.3 through B is still answered.
        """
        service = reactor.listenUDP(0, _DatagramEcho(), interface="127.0.0.1")
        self.addCleanup(service.stopListening)
        port = yield self.exposeUDP(0, "alice", service.getHost().port)
        reply = yield pollUntil(
            lambda: self.udpEchoed("127.0.0.2", 1, port, b"first"),
            f"the UDP echo at port {port} of member B",
            timeout=20,
        )
        self.assertEqual(reply, b"first")
        sent = yield deferToThread(floodFrom, "127.0.0.2", (self.members[1][0], port), FLOOD)
        self.assertGreater(sent, RELAY_MAX_FLOWS)
        reply = yield pollUntil(
            lambda: self.udpEchoed("127.0.0.3", 1, port, b"still here"),
            f"the UDP echo at port {port} of member B after the flood",
            timeout=20,
        )
        self.assertEqual(reply, b"still here")
        yield pollUntil(
            lambda: "refused a new flow from 127.0.0.2" in self.relays[0].output(),
            "member A's refusal of the flood's flows",
            timeout=10,
        )


class ClusterQuotaTests(TestCase):
    """
    The quotas per source address count what a source holds on every member of the cluster.
    """

    timeout = 60

    @inlineCallbacks
    def test_portQuotaAcrossMembers(self) -> Any:
        """
        Registrations from 127.0.0.2 holding its quota of two raw TCP ports on member A make its
        third refused on member B, saying so; its lease names count at B too. A registration from
        127.0.0.3 gets a port on B at once.
        """
        nodes = yield startEtcd(self)
        cluster = f"etcd://127.0.0.1:{nodes[0].clientPort}"
        low, high = freePortRange(4)
        started = yield startTwoMembers(
            self,
            cluster,
            [
                *FAST,
                "--tcp-ports",
                f"{low}-{high}",
                "--max-ports-per-source",
                "2",
                "--max-names-per-source",
                "3",
            ],
        )
        relays = [relay for relay, _ in started]
        controls = [control for _, control in started]
        held = []
        for name in ("p1", "p2"):
            answer = yield Deferred.fromCoroutine(
                register(controls[0], "127.0.0.2", Identity.generate(), name, mode="tcp")
            )
            held.append(answer["tcpPort"])
        for port in held:
            # B's copy of the directory has the port's record.
            yield relays[1].waitFor(rf"forwarding TCP port {port} to the member holding it")
        refused = yield Deferred.fromCoroutine(
            register(controls[1], "127.0.0.2", Identity.generate(), "p3", mode="tcp")
        ).addErrback(lambda f: f.value)
        self.assertIsInstance(refused, RegistrationRefused)
        self.assertIn(
            "your address already holds 2 public ports in this relay cluster (live or reserved), "
            "and at most 2 are allowed per address",
            str(refused),
        )
        yield relays[1].waitFor(r"refused 127\.0\.0\.2: your address already holds 2 public")
        legit = yield Deferred.fromCoroutine(
            register(controls[1], "127.0.0.3", Identity.generate(), "legit", mode="tcp")
        )
        self.assertIn(legit["tcpPort"], set(range(low, high + 1)) - set(held))
        # Names: two on A, the third on B; the fourth is refused at B.
        yield Deferred.fromCoroutine(register(controls[1], "127.0.0.2", Identity.generate(), "n3"))
        refused = yield Deferred.fromCoroutine(
            register(controls[1], "127.0.0.2", Identity.generate(), "n4")
        ).addErrback(lambda f: f.value)
        self.assertIn("already holds 3 lease names in this relay cluster", str(refused))

    @inlineCallbacks
    def test_leasesPerIdentityAcrossMembers(self) -> Any:
        """
        An identity holding its C{--max-leases-per-identity} of two names on member A (reserved
        after its sessions closed) is refused a third on member B, saying so; registering again a
        name it holds works on B, and another identity registers on B at once.
        """
        nodes = yield startEtcd(self)
        cluster = f"etcd://127.0.0.1:{nodes[0].clientPort}"
        started = yield startTwoMembers(self, cluster, [*FAST, "--max-leases-per-identity", "2"])
        controls = [control for _, control in started]
        identity = Identity.generate()
        for name in ("i1", "i2"):
            yield Deferred.fromCoroutine(register(controls[0], "127.0.0.2", identity, name))
        refused = yield Deferred.fromCoroutine(
            register(controls[1], "127.0.0.3", identity, "i3")
        ).addErrback(lambda f: f.value)
        self.assertIn(
            "identity already holds 2 names in this relay cluster (live or reserved), and at "
            "most 2 are allowed",
            str(refused),
        )
        yield Deferred.fromCoroutine(register(controls[1], "127.0.0.3", identity, "i1"))
        yield Deferred.fromCoroutine(register(controls[1], "127.0.0.3", Identity.generate(), "o1"))
