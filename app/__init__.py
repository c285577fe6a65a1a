"""The application layer: the commands that start and combine the two sides of a swarm.

- ``cli.py``  — the umbrella ``cogen`` command (``cogen node``, ``cogen coordinator``, ``cogen demo``,
  ``cogen merge``, ...), dispatching to :mod:`cogen.node` and :mod:`cogen.coordinator`
- ``verify.py`` — ``cogen verify GEN_DIR [--recompute]``: a generation's signature, files and arithmetic
- ``swarm.py`` — ``cogen swarm``: a permissioned swarm's owner key, credentials and revocations
- ``demo.py`` — ``cogen demo``: a coordinator and one node per domain on this machine, two generations
- ``demo_results.py`` — the demo's evaluation: per-domain losses from the manifests, the table, the JSON

It is the only layer that imports both :mod:`cogen.node` and :mod:`cogen.coordinator`; the shared core
(:mod:`cogen.core`) imports neither.
"""
