"""Rounds of the robust aggregators: whole deltas exchanged among the group, one robust aggregate.

:class:`ExchangeRounds` (``trimmed_mean``, ``centered_clip``): the group's hivemind averager only
forms the group and all-gathers the claims (its all-reduce carries one number). Each member serves
its compressed delta, whose sha256 and size it claimed in the all-gather, over the
:class:`~cogen.node.exchange.RoundExchange`, and fetches every other member's; then every honest
member runs the same checks (:mod:`cogen.node.screening`) and the same robust aggregate
(:mod:`cogen.node.aggregators`) over the same members in peer-id order. A delta that does not
arrive, or does not match its digest, refuses the round, as a partial all-reduce does, and counts
against its sender (an unreachable honest member is excluded for a while too: its deltas are
ignored, it still applies the group's). A member's own delta goes through the same encoding as the
others', so every member aggregates the same numbers. The digest is committed in the all-gather,
before any delta is served: a member cannot send different deltas to different members unnoticed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hivemind import DHT
from hivemind.compression import CompressionBase, NoCompression
from hivemind.p2p import PeerID

from cogen.core.averagers import MemberAverager
from cogen.core.config import GroupConfig
from cogen.node.aggregators import get_aggregator
from cogen.node.codecs import Codec, codec_for
from cogen.node.exchange import Post, Received, RoundExchange
from cogen.node.rounds import Apply, Outcome, RoundsBase, Started, Write, tensors_digest
from cogen.node.screening import (
    Exclusions,
    parse_claims,
    reject_outlier_norms,
    reject_steps_ahead,
    weight_caps,
)
from cogen.node.wire import all_finite
from cogen.protocols.group_round import RoundClaim
from cogen.protocols.keys import roster_prefix


class ExchangeRounds(RoundsBase):
    """``trimmed_mean`` / ``centered_clip``: whole deltas exchanged, one robust aggregate (docstring)."""

    def __init__(self, dht: DHT, prefix: str, anchor: Sequence[torch.Tensor], cfg: GroupConfig,
                 compression: CompressionBase, exchange: RoundExchange, exclusions: Exclusions,
                 **common: Any):  # fmt: skip
        super().__init__(dht, cfg, exchange, exclusions)
        self.aggregator = get_aggregator(cfg.aggregator)
        self.codec = codec_for(cfg, anchor)  # ``compression`` is the dense one: the codec is built from cfg
        self.shapes = [a.shape for a in anchor]
        self.buffer = [torch.zeros_like(a) for a in anchor]
        self.max_bytes = exchange.max_bytes
        self.averager = MemberAverager(  # admits members only, in a permissioned swarm
            [torch.zeros(1)], dht, prefix=roster_prefix(prefix), compression=NoCompression(),
            allow_state_sharing=False, **common,
        )  # fmt: skip

    def start(self, write: Write, fields: dict[str, Any], timeout: float) -> Started | None:
        write(self.buffer)
        if not all_finite(self.buffer):
            return None
        serialized, own = self.codec.encode(self.buffer)
        size = sum(s.ByteSize() for s in serialized)
        fields = {**fields, "digest": tensors_digest(serialized), "nbytes": size}
        return self._start(fields, 1.0, own, timeout, serialized)

    def finish(self, started: Started, gathered: Mapping[PeerID, Any], apply: Apply) -> Outcome:
        screened = parse_claims(gathered)
        reject_steps_ahead(screened)
        for peer in screened.accepted:
            claim = screened.claims[peer]
            if claim.digest is None or claim.nbytes > self.max_bytes:
                screened.reject(peer, "claimed no delta, or one over the size limit")
        members = [p for p in screened.accepted if not self.exclusions.is_excluded(p)]
        post = Post(frozenset(str(p) for p in gathered), {}, started.serialized)
        got = self._post_and_fetch(started, gathered, b"d", post, screened, members)
        deltas = {self.me: started.own}
        missing = None
        for peer, received in got.items():
            delta = decode_delta(received, screened.claims[peer], self.codec)
            if isinstance(delta, str):
                screened.reject(peer, delta)
                missing = missing or f"the delta of member {peer} is missing or invalid: {delta}"
            else:
                deltas[peer] = delta
        if missing is not None:
            return self._finish(screened, missing, len(members))
        caps = weight_caps(screened, self.cfg)
        norms = {p: math.sqrt(sum(float(t.pow(2).sum()) for t in deltas[p])) for p in members}
        reject_outlier_norms(screened, norms, self.cfg)
        used = [p for p in members if p not in screened.rejected]
        if not used:
            return self._finish(screened, "every member's update was rejected", len(members))
        apply(self.aggregator([deltas[p] for p in used], [max(caps[p], 1e-6) for p in used]))
        self.codec.commit()  # the error feedback moves on only with an applied round
        return self._finish(screened, None, len(used))

    def bytes_sent(self, group_size: int) -> int:
        """What this member sends in a round: its delta to every other member."""
        return self.codec.nbytes() * max(group_size - 1, 0)


def decode_delta(received: Received | str, claim: RoundClaim, codec: Codec) -> list[torch.Tensor] | str:
    """A member's delta if it is the one it claimed, whole, of this model's shapes and finite."""
    if isinstance(received, str):
        return f"did not arrive ({received})"
    if tensors_digest(received.tensors) != claim.digest:
        return "does not match its claimed digest"
    return codec.decode(received.tensors)
