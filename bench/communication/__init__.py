"""``python -m bench.communication`` (bytes per token) and ``python -m bench.communication.scaling``.

- ``__main__.py`` — the communication benchmark: runs the arms and writes the report
- ``scaling.py``  — loss against wall time for groups of 1, 2 and 4 on the same token budget
- ``model.py``    — settings, the folded-vocabulary Llama, data and a worker's inner steps
- ``flags.py``    — one flag per setting, shared by both benchmarks
- ``outer.py``    — the wire trip (hivemind's compression) and cogen's own outer step
- ``arms.py``     — the arms: per-step fp32 data parallel, cogen's rounds, rounds landing one late
- ``report.py``   — the figures (the JSON keys), targets and the printed table
"""
