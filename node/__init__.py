"""The volunteer: ``cogen-node`` trains a domain expert in the swarm.

- ``service.py``  — :class:`ExpertNode`: the node's lifecycle: join, load, claim a shard, train, leave
- ``state.py``    — :class:`NodeState`: what a running node knows, shared by the layers below
- ``announcing.py`` — :class:`NodeAnnouncing`: the node's records in each state, summaries, groupmates
- ``switching.py`` — :class:`BaseSwitching`: its base, moving to a new generation, joining the group
- ``foreign.py``  — whether the node's model is the swarm's base; else a foreign expert in its own group
- ``training.py`` — :class:`TrainingLoop`: inner steps, outer steps at the boundaries, saves, the end
- ``group.py``    — :class:`GroupAverager`: DiLoCo outer steps with the expert's group
- ``group_state.py`` — :class:`GroupState`: the group's shared state: joining, resuming, copies, exact sync
- ``wire.py``     — wire compression of pseudo-gradients and the check of each averaging round
- ``sparse.py``   — :class:`SparseCompressor`: per-chunk top-k, low-bit values, error feedback
- ``rounds.py``   — one averaging round: :class:`ButterflyRounds` (``mean``, hivemind's all-reduce) and
  the claims, reveals and exclusions every kind shares
- ``robust_rounds.py`` — :class:`ExchangeRounds`: whole deltas exchanged, one robust aggregate
- ``codecs.py``   — how a whole delta travels: hivemind's compressions, or sparse with error feedback
- ``aggregators.py`` — ``mean``, ``trimmed_mean``, ``centered_clip`` behind a registry
- ``screening.py`` — what a member believes of its groupmates' claims (step, weight, norm); exclusions
- ``exchange.py`` — :class:`RoundExchange`: round data served and fetched among a round's members (libp2p)
- ``exchange_server.py`` — the exchange's side in the DHT's process: posts served, fetches bounded
- ``trainer.py``  — :class:`ExpertTrainer`: inner steps on the expert's adapters
- ``prequential.py`` — :class:`PrequentialTracker`: losses on batches before stepping on them
- ``training_state.py`` — the node's full training state on disk (schema, atomic save, verified read)
- ``resume.py``   — which saved state a restarted node resumes from, and putting it back
- ``shards.py``   — :func:`claim_shard`: a data shard no other group member reads, renewed while training
- ``follow.py``   — :class:`BaseFollower`: newer generations found, fetched and verified; the base mirror
- ``fetch.py``    — :func:`fetch_base`: one base from one source, bounded by its signed sizes, all or nothing
- ``sources.py``  — :class:`SourceBook`: which source to try next; backoff and distrust of failed ones
- ``trust.py``    — :class:`KeyTrust`: the one manifest key it follows (given, or pinned on first use)
- ``reporting.py`` — :class:`NodeReporter`: the node's records, renewed in the background; summaries
- ``metrics.py``  — :class:`NodeMetrics`: the node's /metrics, /healthz and /readyz in one HTTP thread
- ``health.py``   — :class:`NodeHealth`: the checks behind /healthz and /readyz
- ``hardware.py`` — :func:`detect_hardware` for the NodeInfo record
- ``cli.py``      — the ``cogen-node`` command
"""

from typing import TYPE_CHECKING

from cogen.core.lazy import lazy_exports

if TYPE_CHECKING:
    from cogen.node.service import DataError, ExpertNode, expert_name
    from cogen.node.trainer import ExpertTrainer, StepStats
    from cogen.node.training import NodeResult

__getattr__ = lazy_exports(
    __name__,
    {
        "DataError": "cogen.node.service",
        "ExpertNode": "cogen.node.service",
        "NodeResult": "cogen.node.training",
        "expert_name": "cogen.node.service",
        "ExpertTrainer": "cogen.node.trainer",
        "StepStats": "cogen.node.trainer",
    },
)
__all__ = ["DataError", "ExpertNode", "ExpertTrainer", "NodeResult", "StepStats", "expert_name"]
