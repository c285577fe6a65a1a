#!/usr/bin/env bash
# The test suite: lint, type-check, then pytest. Sets up .venv/ first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
ruff check core app node coordinator protocols tests bench scripts setup.py
ruff format --check core app node coordinator protocols tests bench scripts setup.py
mypy  # the packages named in pyproject.toml, read in place (see scripts/bootstrap.sh)
# the dashboard's browser test drives Debian's headless Chromium through Playwright; the cross-host
# tests build hosts from network namespaces (iproute2) and put one behind NAT (nftables); a real Prometheus
# scrapes a coordinator and a node with docs/prometheus.yml (prometheus: only its binary is run, never its service)
missing=()
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
if (( ${#missing[@]} )) && [[ $(id -u) == 0 ]]; then
  echo "[test] installing Debian's ${missing[*]} for the browser and cross-host tests" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
exec pytest "$@"
