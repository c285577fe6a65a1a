"""cogen's benchmarks: each measures its baseline in the same run and prints the ratio (``README.md``).

Run one from the checkout's root as ``python -m bench.<family>[.<name>]``; every one shares one harness.

- ``harness.py``      — arguments (``--json PATH``, presets such as ``--quick``), the numbered exit codes,
  child processes that answer with one JSON line, tables, targets and ratios, the JSON report
- ``byzantine.py``  — one hostile member in a group of 4: each attack against each aggregator, in loss
- ``averaging/``      — an outer step's averaging among peer processes against a raw TCP copy
- ``communication/``  — bytes per token of per-step averaging against outer steps, and group scaling
- ``merging/``        — what a merge costs (``cost``) and what it is worth per domain (``quality``)
- ``node/``           — what a node's training step costs against a bare loop and fp32 (``overhead``)
- ``swarm/``          — whole swarms: the API under load, a WAN link, chaos across namespace hosts
"""
