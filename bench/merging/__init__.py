"""Merging N experts: ``python -m bench.merging.cost``, ``.quality`` and ``.ranking``.

- ``cost.py``    — time and peak memory of a merge against loading the N experts once;
  ``cost_child.py`` — one measurement (the floor or a merge) inside its own fresh process
- ``quality.py`` — experts, every merge method, the routed mixture and one centralised model, per domain;
  ``quality_train.py`` — training the experts and the centralised model with the node's trainer;
  ``quality_merges.py`` — every dense merge and the routed mixture, evaluated per domain
- ``ranking.py`` — the cheap ranking (prequential claims, spot-checks) against the full evaluation;
  ``ranking_experts.py`` — honest experts at two budgets per domain and four flawed ones
"""
