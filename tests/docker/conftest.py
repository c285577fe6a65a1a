"""Fixtures of the container tests: the image under test and a per-test set of containers.

They run in CI's container stage (scripts/docker_test.sh builds ``cogen:cpu`` and starts an engine);
anywhere else they are skipped, saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from docker_engine import Containers, docker


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
