"""``python -m bench.averaging``: cogen's outer-step averaging against a raw copy of the same bytes.

- ``__main__.py`` — the measurement over every path and group size, and its report
- ``report.py``   — the figures (the JSON keys), targets and the printed table
- ``children.py`` — the parent's worker processes (killed with their group) and where they run
- ``rounds.py``   — the parent side: starting the peers, timed rounds among them, per wire format
- ``workers.py``  — what runs inside a worker: a group member, or one end of the raw TCP copy
"""
