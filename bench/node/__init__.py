"""A node's training step: ``python -m bench.node.overhead``.

- ``overhead.py``       — runs each configuration in a fresh process, prints the table and the ratios
- ``overhead_child.py`` — one configuration, built and measured inside its own process
"""
