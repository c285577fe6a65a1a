#!/bin/sh
# The images' entrypoint: runs a cogen command (default cogen-node; arguments that start with "-" are
# cogen-node's flags). With JOIN_READY_FILE naming a coordinator's --ready-file (a volume the
# coordinator writes, as in compose.yaml) and no COGEN_INITIAL_PEERS, it waits up to JOIN_WAIT_S
# (default 300) for that file and joins the swarm through the non-loopback addresses in it.
set -eu
case "${1:-}" in
  "" | -*) set -- cogen-node "$@" ;;
esac
if [ -n "${JOIN_READY_FILE:-}" ] && [ -z "${COGEN_INITIAL_PEERS:-}" ]; then
  COGEN_INITIAL_PEERS="$(python /opt/cogen/bin/container.py peers "$JOIN_READY_FILE" \
    --wait-s "${JOIN_WAIT_S:-300}")"
  export COGEN_INITIAL_PEERS
fi
exec "$@"
