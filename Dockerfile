# cogen node / coordinator image. CPU by default; on a GPU host, pass --gpus all and the bootstrap
# installs the CUDA build of torch when nvidia-smi is visible at build time.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    COGEN_CACHE_DIR=/cache \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/cogen
COPY requirements/ requirements/
COPY pyproject.toml setup.py README.md ./
COPY scripts/ scripts/
COPY core/ core/
COPY app/ app/
COPY node/ node/
COPY coordinator/ coordinator/
COPY protocols/ protocols/
RUN bash scripts/bootstrap.sh \
    && .venv/bin/python -c "from cogen.core.models import resolve_model; resolve_model('smollm2-135m')"

VOLUME ["/cache", "/runs"]
EXPOSE 31337 8765
# docker stop sends SIGTERM: the node finishes its step, saves its adapter and exits 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/cogen/.venv/bin/cogen"]
CMD ["demo"]
