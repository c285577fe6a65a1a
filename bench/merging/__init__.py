"""Merging N experts: ``python -m bench.merging.cost``, ``.quality``, ``.fusion`` and ``.ranking``.

- ``cost.py``    — time and peak memory of a merge against loading the N experts once;
  ``cost_child.py`` — one measurement (the floor or a merge) inside its own fresh process
- ``quality.py`` — experts, every merge method, the routed mixture and one centralised model, per domain;
  ``quality_train.py`` — training the experts and the centralised model with the node's trainer;
  ``quality_merges.py`` — every dense merge, the routed mixture and ``fuse``, evaluated per domain
- ``fusion.py``  — two sources of other tokenizers (a GPT-2-tokenizer model, the base's own expert) fused
  into the base, scored per byte: the share of each source's gap closed, the regression elsewhere
- ``ranking.py`` — the cheap ranking (prequential claims, spot-checks) against the full evaluation;
  ``ranking_experts.py`` — honest experts at two budgets per domain and four flawed ones
"""
