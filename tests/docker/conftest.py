"""Fixtures of the container tests: the image under test and a per-test set of containers.

They run in CI's container stage (scripts/docker_test.sh builds ``cogen:cpu`` and starts an engine);
anywhere else they are skipped, saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from docker_engine import Containers, docker

# every node in these tests: the tiny model, small batches, one thread (the machine has 2 cores)
TINY = {
    "COGEN_MODEL": "tiny", "COGEN_BLOCK_SIZE": "32", "COGEN_BATCH_SIZE": "2", "COGEN_LR": "1e-2",
    "COGEN_WARMUP_STEPS": "1", "COGEN_THREADS": "1", "COGEN_LOG_INTERVAL_S": "1", "COGEN_RECORD_TTL_S": "10",
    "COGEN_NUM_SHARDS": "4",
}  # fmt: skip


def env_options(env: dict[str, str]) -> tuple[str, ...]:
    return tuple(arg for key, value in env.items() for arg in ("-e", f"{key}={value}"))


@pytest.fixture(scope="session")
def image() -> str:
    name = os.environ.get("COGEN_DOCKER_IMAGE", "cogen:cpu")
    try:
        docker("image", "inspect", name, timeout_s=30)
    except AssertionError as e:
        pytest.skip(f"no image {name} in a running Docker engine (scripts/docker_test.sh builds it): {e}")
    return name


@pytest.fixture
def containers(request: pytest.FixtureRequest) -> Iterator[Containers]:
    made = Containers(f"cogentest-{os.getpid()}-{request.node.name.removeprefix('test_')[:24]}")
    try:
        yield made
    finally:
        made.remove()
