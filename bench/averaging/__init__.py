"""``python -m bench.averaging``: cogen's outer-step averaging against a raw copy of the same bytes.

- ``__main__.py`` — the measurement over every path and group size, and its report
- ``report.py``   — the figures (the JSON keys), targets and the printed table
- ``procs.py``    — the parent side: worker processes, where they run, timed rounds among them
- ``workers.py``  — what runs inside a worker: a group member, or one end of the raw TCP copy
"""
