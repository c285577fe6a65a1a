#!/usr/bin/env bash
# Run cogen (default: `cogen demo`) after making sure .venv/ is set up.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
if [[ $# -eq 0 ]]; then set -- demo; fi
exec "$ROOT/.venv/bin/cogen" "$@"
