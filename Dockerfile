# cogen node / coordinator images. Two targets:
#   docker build --target cpu  -t cogen:cpu  .   # slim, the CPU build of torch (what CI builds and tests)
#   docker build --target cuda -t cogen:cuda .   # the CUDA build of torch; run with --gpus all
# Dependencies are installed in their own stage from requirements/ only, so a change to cogen's source
# rebuilds the last few layers, never torch. BASE must provide python3.11 (with venv); WHEELS names an
# image holding a wheelhouse at /wheels (then nothing is fetched from an index: see scripts/docker_test.sh,
# which builds both where no registry can be reached).
ARG BASE=python:3.11-slim-bookworm
ARG WHEELS=no-wheels

# ---- an empty wheelhouse: dependencies come from the package index --------------------------------------
FROM ${BASE} AS no-wheels
RUN mkdir /wheels

FROM ${WHEELS} AS wheels

# ---- what every stage shares: the interpreter, the unprivileged user, the state and cache dirs ----------
FROM ${BASE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    COGEN_CACHE_DIR=/cache \
    COGEN_OUTPUT_DIR=/state \
    COGEN_OUT_DIR=/state \
    COGEN_HOST=0.0.0.0 \
    COGEN_PORT=31337 \
    COGEN_METRICS_HOST=0.0.0.0 \
    COGEN_METRICS_PORT=9100 \
    COGEN_API_HOST=0.0.0.0 \
    COGEN_API_PORT=8765
RUN groupadd --system --gid 10001 cogen \
    && useradd --system --uid 10001 --gid cogen --home-dir /state --shell /usr/sbin/nologin cogen \
    && mkdir -p /state /cache /join /opt/cogen \
    && chown cogen:cogen /state /cache /join

# ---- dependencies: requirements/ and a wheelhouse in, a virtual environment out --------------------------
FROM runtime AS deps-input
COPY --from=wheels /wheels /wheels
COPY requirements/ /opt/cogen/requirements/
COPY scripts/docker_deps.sh /opt/cogen/

FROM deps-input AS deps
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN /opt/cogen/docker_deps.sh +cpu "${TORCH_INDEX}"

# ---- cogen's own source: the checkout root is the cogen namespace ---------------------------------------
FROM runtime AS source
WORKDIR /opt/cogen/src
COPY pyproject.toml setup.py README.md ./
COPY core/ core/
COPY app/ app/
COPY node/ node/
COPY coordinator/ coordinator/
COPY protocols/ protocols/
COPY scripts/docker_entrypoint.sh scripts/container.py /opt/cogen/bin/

# ---- the images ------------------------------------------------------------------------------------------
FROM runtime AS cpu
COPY --from=deps /opt/venv /opt/venv
COPY --from=source /opt/cogen /opt/cogen
RUN pip install --no-index --no-deps --no-build-isolation /opt/cogen/src \
    && rm -rf /opt/cogen/src/build
USER 10001:10001
WORKDIR /state
# the node's training state (a replaced spot instance resumes from it) and the model cache
VOLUME ["/state", "/cache"]
# DHT, node metrics + /healthz + /readyz, coordinator dashboard + API
EXPOSE 31337 9100 8765
# docker stop sends SIGTERM: the node abandons any averaging round, saves its state within --grace-s
# (COGEN_GRACE_S) and exits 0; give `docker stop --time` more than that
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/cogen/bin/container.py", "health"]
ENTRYPOINT ["/opt/cogen/bin/docker_entrypoint.sh"]
CMD ["cogen-node"]

# the classic builder builds every stage up to --target: the CUDA stages come last, so `--target cpu`
# never fetches the CUDA build of torch
FROM deps-input AS deps-cuda
RUN /opt/cogen/docker_deps.sh ""

FROM runtime AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=deps-cuda /opt/venv /opt/venv
COPY --from=source /opt/cogen /opt/cogen
RUN pip install --no-index --no-deps --no-build-isolation /opt/cogen/src \
    && rm -rf /opt/cogen/src/build
USER 10001:10001
WORKDIR /state
VOLUME ["/state", "/cache"]
EXPOSE 31337 9100 8765
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/cogen/bin/container.py", "health"]
ENTRYPOINT ["/opt/cogen/bin/docker_entrypoint.sh"]
CMD ["cogen-node"]
