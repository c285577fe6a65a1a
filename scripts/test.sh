#!/usr/bin/env bash
# The test suite: lint, type-check, then pytest. Sets up .venv/ first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
ruff check core node coordinator protocols tests bench
ruff format --check core node coordinator protocols tests bench
# from outside the source tree, so mypy reads the installed cogen.* (node/, coordinator/, protocols/ mapped in)
(cd "$ROOT/build" && mypy --config-file "$ROOT/pyproject.toml" -p cogen)
exec pytest "$@"
