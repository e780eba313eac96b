#!/bin/sh
# Entry point of the Portal image (docs/deploy.md).
#
#   relay [FLAGS...]          twistd -n portal-relay, listeners and names from PORTAL_* variables;
#                             FLAGS come last, so they override the variables.
#   tunnel TARGET [FLAGS...]  portal expose TARGET, with --relay from PORTAL_RELAY and the metrics
#                             listener (/metrics, /healthz) from PORTAL_METRICS.
#   anything else             run as given (a shell, portal identity show, ...).
set -eu

mode="${1:-relay}"
[ $# -gt 0 ] && shift

logger=""
if [ "${PORTAL_LOG_FORMAT:-text}" = "json" ]; then
  logger="--logger=portal.tap.jsonlog.observer"
fi

case "$mode" in
  relay)
    exec twistd --nodaemon --pidfile= ${logger} portal-relay \
      --state-dir "${PORTAL_STATE_DIR:-/var/lib/portal/relay}" \
      --domain "${PORTAL_DOMAIN:-localhost}" \
      --tunnel-domain "${PORTAL_TUNNEL_DOMAIN:-localhost}" \
      --public "${PORTAL_PUBLIC:-tcp:8443}" \
      --control "${PORTAL_CONTROL:-tcp:4017}" \
      --http "${PORTAL_HTTP:-tcp:8080}" \
      "$@"
    ;;
  tunnel)
    if [ -n "${PORTAL_RELAY:-}" ]; then
      set -- --relay "$PORTAL_RELAY" "$@"
    fi
    if [ -n "${PORTAL_LOG_FORMAT:-}" ]; then
      set -- --log-format "$PORTAL_LOG_FORMAT" "$@"
    fi
    exec portal expose --metrics "${PORTAL_METRICS:-127.0.0.1:9090}" "$@"
    ;;
  *)
    exec "$mode" "$@"
    ;;
esac
