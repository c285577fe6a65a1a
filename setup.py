"""Packaging: the checkout's root is the ``cogen`` namespace, so ``cogen.X.Y`` lives at ``X/Y.py``.

Metadata is in pyproject.toml; this only finds the packages in the tree and gives them the
``cogen.`` prefix (setuptools' own finder cannot). Tests, benchmarks and scripts are not installed.
"""

from setuptools import find_packages, setup

NOT_INSTALLED = ["tests", "tests.*", "bench", "bench.*", "scripts", "scripts.*", "build", "build.*", "docs"]

setup(packages=[f"cogen.{name}" for name in find_packages(exclude=NOT_INSTALLED)])
