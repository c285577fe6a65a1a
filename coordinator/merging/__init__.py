"""Merging experts into the next base, offline or for the coordinator (issue 5).

- ``registry.py`` — :class:`MergeMethod` (ABC), :func:`register` / :func:`get`, :class:`MergeError`
- ``linear.py``, ``ties.py``, ``dare.py`` — the built-in methods (``linear``, ``ties``, ``dare``,
  ``dare_ties``), each a thin wrapper of PEFT's ``peft.utils.merge_utils``
- ``experts.py`` — find and verify expert checkpoints, stream their dense LoRA deltas module by module
- ``ranking.py`` — the full ranking's records and the cheap ranking (training loss, delta statistics);
  ``ranking_votes.py`` — domains as voters: Borda points, Bradley–Terry strengths, the bootstrap
- ``prequential.py`` — the cheap ranking from the nodes' prequential claims (own-domain gain over the
  base, relative to the achievable), its merge weights, its agreement with the full ranking
- ``spotcheck.py`` — recompute a random few claimed batch losses on the collected expert (and the base)
- ``moe/`` — ``moe``: the experts' adapters behind a learned per-sequence router (router, its
  training, the mixture, its on-disk format: one module each)
- ``fusion/`` — ``fuse``: the experts and teachers of any tokenizer distilled into the dense next base
  (cross-tokenizer alignment, the teachers, top-k target streaming, the student's training)
- ``screening.py`` — the cheap ranking every generation, the full evaluation as an audit
- ``weights.py`` — per-expert weights and per-domain ranking from an :class:`EvalMatrix`
- ``gate.py`` — the publishing gate's rule: is a candidate worse than its parent beyond the bootstrap noise
- ``gating.py`` — :func:`gated_merge`: build a candidate, judge it, leave out the most harmful expert or
  halve the delta, or keep the parent (:class:`GateRefused`)
- ``apply.py`` — add a weighted merged delta into a dense model (untying a tied output layer first)
- ``evaluate.py`` — validation losses of the base, each expert and the merge on each domain
- ``manifest.py`` — the coordinator's :class:`Identity` key that signs manifests (their schema and
  :func:`verify_manifest` are in :mod:`cogen.protocols.manifest`)
- ``publish.py`` — write a generation (HF checkpoint + manifest) atomically and swap ``OUT/latest``
- ``merge.py`` — :func:`merge_experts`, the whole offline pipeline behind ``cogen-coordinator merge``
- ``routed.py`` — the mixture built beside the dense base (trained router or Arrow), and the best of the two
- ``reproduce.py`` — the platform a merge ran on and the tolerance a recomputation elsewhere must meet
- ``recompute.py`` — re-run a published generation's merge from its manifest (``cogen verify --recompute``)
"""

from cogen.coordinator.merging import dare, linear, ties  # noqa: F401 - register the built-in methods
from cogen.coordinator.merging.manifest import Identity
from cogen.coordinator.merging.merge import merge_experts
from cogen.coordinator.merging.registry import MergeError, MergeMethod, MergeParams, get, known, register
from cogen.coordinator.merging.weights import ranking_weights
from cogen.protocols.manifest import EvalMatrix, Manifest, ManifestError, verify_manifest

__all__ = [
    "EvalMatrix",
    "Identity",
    "Manifest",
    "ManifestError",
    "MergeError",
    "MergeMethod",
    "MergeParams",
    "get",
    "known",
    "merge_experts",
    "ranking_weights",
    "register",
    "verify_manifest",
]
