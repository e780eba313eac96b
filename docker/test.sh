#!/usr/bin/env bash
# The container test (run by .ci/run; docs/deploy.md): build the Portal image on a Debian base made
# here, start the compose demo with podman-compose, and check it from outside:
#   1. curl gets the sample app's page at the URL the tunnel printed;
#   2. the relay's /healthz answers, and the image's HEALTHCHECK passes in the relay container;
#   3. after a restart of the relay container the tunnel prints the same URL again and it works
#      (the relay's identity and leases are in its state volume).
# The last line is "container test: PASS" or "container test: FAIL (why)"; the exit code says the same.
#
# No image registry is reachable here, so the base image is built locally:
# `debootstrap --variant=minbase bookworm` (plus python3 and python3-venv) from the mirror apt uses,
# then `podman import`. The root file system is kept as a tarball in PORTAL_CI_CACHE
# (default /var/cache/portal-ci) so that later runs skip debootstrap.
#
# This machine's quirks stay here, not in the image or the compose file: podman runs containers with
# runc (crun rejects the mixed cgroup set-up) and with explicit ulimits (the machine cannot raise
# them, and podman's defaults try to).
set -u
cd "$(dirname "$0")/.."
repo=$(pwd)

CACHE=${PORTAL_CI_CACHE:-/var/cache/portal-ci}
BASE=localhost/portal-ci-base:bookworm
IMAGE=localhost/portal:ci
PROJECT=portalci$$
WAIT=${PORTAL_CI_WAIT:-120}
work=$(mktemp -d)
started=0

say() { echo "container test: $*"; }

cleanup() {
  if [ "$started" = 1 ]; then
    timeout "$WAIT" "${compose[@]}" down -v >"$work/down.log" 2>&1 || cat "$work/down.log"
    podman volume rm -f "${PROJECT}_relay-state" "${PROJECT}_tunnel-state" >/dev/null 2>&1
  fi
  rm -rf "$work"
}

fail() {
  say "FAIL ($*)"
  if [ "$started" = 1 ]; then
    for service in relay tunnel app; do
      echo "--- logs of $service"
      podman logs "${PROJECT}_${service}_1" 2>&1 | tail -n 30
    done
  fi
  cleanup
  exit 1
}

# Wait up to $WAIT seconds for a command to succeed.
waitFor() {
  local what=$1
  shift
  local deadline=$((SECONDS + WAIT))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within ${WAIT}s"
    sleep 1
  done
}

# --- tools -----------------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") \
    >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "could not install ${missing[*]}"; }
fi
export PATH="$PATH:/usr/sbin:/sbin"
mkdir -p "$CACHE"
if [ ! -x "$CACHE/tools/bin/podman-compose" ]; then
  say "installing podman-compose (PyPI) in $CACHE/tools"
  python3 -m venv "$CACHE/tools" && "$CACHE/tools/bin/pip" install -q podman-compose \
    || fail "could not install podman-compose"
fi

podmanArgs=(--runtime runc)
runArgs="--ulimit nofile=$(ulimit -Sn):$(ulimit -Hn) --ulimit nproc=4096:4096"
compose=("$CACHE/tools/bin/podman-compose" -p "$PROJECT" -f "$repo/docker/compose.yaml"
  --podman-args "${podmanArgs[*]}" --podman-run-args "$runArgs")

# --- the base image ---------------------------------------------------------------------------------
if ! podman image exists "$BASE"; then
  tarball="$CACHE/bookworm-python3.tar"
  if [ ! -s "$tarball" ]; then
    # The mirror apt already uses (deb822 or one-line sources), else Debian's own.
    mirror=$(grep -rhoE '^URIs: *https?://[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | grep -v security | head -n 1 | sed 's/^URIs: *//')
    [ -n "$mirror" ] || mirror=$(grep -rhoE '^deb +https?://[^ ]+' /etc/apt/sources.list \
      /etc/apt/sources.list.d/*.list 2>/dev/null | grep -v security | head -n 1 | awk '{print $2}')
    mirror=${mirror:-http://deb.debian.org/debian}
    say "building the base image: debootstrap bookworm from $mirror"
    rootfs="$CACHE/rootfs.tmp"
    rm -rf "$rootfs"
    start=$SECONDS
    timeout 1200 debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror" \
      >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log"; fail "debootstrap failed"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/locale
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball" || fail "could not save $tarball"
    rm -rf "$rootfs"
    say "debootstrap took $((SECONDS - start)) s"
  fi
  podman import "$tarball" "$BASE" >/dev/null || fail "podman import failed"
fi

# --- the image --------------------------------------------------------------------------------------
python=python3
[ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python"
start=$SECONDS
ENGINE=podman IMAGE="$IMAGE" PYTHON="$python" timeout 900 "$repo/docker/build.sh" --runtime runc $runArgs \
  --build-arg BASE="$BASE" >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log"; fail "image build failed"; }
buildSeconds=$((SECONDS - start))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "image $IMAGE built in ${buildSeconds} s (wheels and build), $((size / 1000000)) MB"
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$user" = portal ] || fail "the image runs as '$user', not as the portal user"

# --- the compose demo -------------------------------------------------------------------------------
# Two ports the OS says are free; another process may take one before podman binds it, so a start
# that fails is retried with new ports. Every podman-compose call is bounded: it waits for
# containers it depends on without a limit of its own.
freePorts() {
  python3 -c '
import socket
held = [socket.socket() for _ in range(2)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))'
}
export PORTAL_IMAGE="$IMAGE"
started=1
for attempt in 1 2 3; do
  read -r publicPort httpPort < <(freePorts)
  export PORTAL_PORT="$publicPort" PORTAL_HTTP_PORT="$httpPort"
  if timeout "$WAIT" "${compose[@]}" up -d >"$work/up.log" 2>&1 \
    && [ "$(podman inspect --format '{{.State.Running}}' "${PROJECT}_relay_1" 2>/dev/null)" = true ]; then
    break
  fi
  if [ "$attempt" = 3 ] || ! grep -q "address already in use" "$work/up.log"; then
    tail -n 20 "$work/up.log"
    fail "podman-compose up failed"
  fi
  say "port $publicPort or $httpPort was taken meanwhile; again with new ports"
  timeout "$WAIT" "${compose[@]}" down -v >"$work/down.log" 2>&1
done

forwardingLines() { podman logs "${PROJECT}_tunnel_1" 2>/dev/null | grep -cE '(^| )Forwarding https://'; }
hasForwarding() { [ "$(forwardingLines)" -ge "$1" ]; }
waitFor "the tunnel printed its URL" hasForwarding 1
url=$(podman logs "${PROJECT}_tunnel_1" 2>/dev/null | grep -oE 'Forwarding https://[^ ]+' | head -n 1 | cut -d' ' -f2)
caPath=$(podman logs "${PROJECT}_tunnel_1" 2>/dev/null | grep -oE 'local CA [^;]+' | head -n 1 | cut -d' ' -f3)
say "the tunnel printed $url"
podman cp "${PROJECT}_tunnel_1:$caPath" "$work/ca.pem" || fail "could not copy the tunnel's CA $caPath"

page() { curl -sS --max-time 10 --cacert "$work/ca.pem" "$url/"; }
hasPage() { page | grep -q 'Hello from the Portal demo app'; }
waitFor "curl got the sample page at $url" hasPage
say "curl got the sample page at $url"

health=$(curl -sS --max-time 10 "http://127.0.0.1:$httpPort/healthz") || fail "/healthz did not answer"
[ "$health" = ok ] || fail "/healthz answered '$health'"
waitFor "the image's HEALTHCHECK passed in the relay container" podman healthcheck run "${PROJECT}_relay_1"
waitFor "the image's HEALTHCHECK passed in the tunnel container" podman healthcheck run "${PROJECT}_tunnel_1"
say "/healthz answers; HEALTHCHECK passes in the relay and tunnel containers"

before=$(forwardingLines)
timeout "$WAIT" podman "${podmanArgs[@]}" restart "${PROJECT}_relay_1" >/dev/null 2>"$work/restart.log" || fail "could not restart the relay"
waitFor "the tunnel printed its URL again after the relay's restart" hasForwarding $((before + 1))
again=$(podman logs "${PROJECT}_tunnel_1" 2>/dev/null | grep -oE 'Forwarding https://[^ ]+' | tail -n 1 | cut -d' ' -f2)
[ "$again" = "$url" ] || fail "after the relay's restart the URL is $again, not $url"
waitFor "curl got the sample page again after the relay's restart" hasPage
say "after a restart of the relay container the same URL works: $again"

cleanup
say "PASS (build ${buildSeconds} s, image $((size / 1000000)) MB)"
