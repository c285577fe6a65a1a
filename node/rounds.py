"""How one averaging round runs, for each kind of aggregator; :class:`~cogen.node.group.GroupAverager`
does the outer step around it.

Both kinds form the group with a hivemind ``DecentralizedAverager`` and all-gather every member's
:class:`~cogen.protocols.group_round.RoundClaim` in its ``step(gather=...)``; what follows differs.

:class:`ButterflyRounds` (``mean``): hivemind's butterfly all-reduce averages the deltas, weighted
by the claimed samples; nobody sees another's delta. After its all-reduce a member reveals its
nonce over the :class:`~cogen.node.exchange.RoundExchange`, the round's probe seed is the hash of
all nonces (:func:`cogen.node.wire.round_seed`), and then each member reveals its probe projections
under that seed; the average is applied only if it matches them (:class:`~cogen.node.wire.RoundVerifier`),
no member's update norm is an outlier, no claim is over its cap and no excluded member took part:
the all-reduce cannot leave a member out after the fact, so such a round is refused.

:class:`~cogen.node.robust_rounds.ExchangeRounds` (``trimmed_mean``, ``centered_clip``) exchanges
whole deltas instead, on the same base (:class:`RoundsBase`: the claim, the exchange, exclusions).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind import DHT
from hivemind.compression import CompressionBase
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from cogen.core.averagers import MemberAverager
from cogen.core.config import GroupConfig
from cogen.node.exchange import Post, Received, RoundExchange
from cogen.node.screening import (
    Exclusions,
    Screened,
    parse_claims,
    reject_outlier_norms,
    reject_steps_ahead,
    weight_caps,
)
from cogen.node.wire import RoundChecks, RoundVerifier, all_finite, estimate_bytes_sent, round_seed
from cogen.protocols import RoundReport
from cogen.protocols.group_round import RoundClaim, RoundRejected, RoundReveal, parse_reveal
from cogen.protocols.keys import delta_prefix

MAX_LISTED = 32  # peers a round report names as rejected or excluded, at most
Apply = Callable[[Sequence[torch.Tensor]], None]
Write = Callable[[list[torch.Tensor]], None]


@dataclass
class Started:
    """What a round keeps from its start: hivemind's StepControl, the nonce and this member's data."""

    control: Any
    nonce: bytes
    claim: RoundClaim
    own: list[torch.Tensor]  # this member's delta (as every member decodes it, in ExchangeRounds)
    serialized: list[runtime_pb2.Tensor] = field(default_factory=list)


@dataclass
class Outcome:
    """How a round ended: its screened claims, why it was refused (``None``: applied), its size."""

    screened: Screened
    problem: str | None = None
    group_size: int = 0


def tensors_digest(tensors: Sequence[runtime_pb2.Tensor]) -> str:
    """sha256 of serialized tensors: their encoding, dtype, shape and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        header = f"{t.compression}|{t.dtype}|{','.join(map(str, t.size))}|{len(t.buffer)};"
        h.update(header.encode())
        h.update(t.buffer)
    return h.hexdigest()


def averager_options(cfg: GroupConfig) -> dict[str, Any]:
    """The options of a group's hivemind averagers."""
    return dict(
        target_group_size=cfg.group_size, min_group_size=2, min_matchmaking_time=cfg.matchmaking_s,
        request_timeout=cfg.matchmaking_s / 2, allreduce_timeout=cfg.averaging_timeout_s,
        next_chunk_timeout=min(30.0, cfg.averaging_timeout_s), start=True,
    )  # fmt: skip


class RoundsBase:
    """What both kinds share: the exchange, exclusions, the claim of a round."""

    averager: MemberAverager

    def __init__(self, dht: DHT, cfg: GroupConfig, exchange: RoundExchange, exclusions: Exclusions):
        self.cfg, self.exchange, self.exclusions = cfg, exchange, exclusions
        self.me = str(dht.peer_id)
        self.timeout = cfg.averaging_timeout_s

    def _start(self, fields: dict[str, Any], weight: float, own: list[torch.Tensor], timeout: float,
               serialized: list[runtime_pb2.Tensor] | None = None) -> Started:  # fmt: skip
        nonce = secrets.token_bytes(32)
        claim = RoundClaim.model_validate({**fields, "commit": hashlib.sha256(nonce).hexdigest()})
        control = self.averager.step(
            gather=claim.model_dump(), weight=weight, timeout=timeout, allow_retries=False, wait=False
        )
        return Started(control, nonce, claim, own, serialized or [])

    def _post_and_fetch(self, started: Started, gathered: Mapping[PeerID, Any], suffix: bytes, post: Post,
                        screened: Screened, members: Sequence[str]) -> dict[str, Received | str]:  # fmt: skip
        """Serve ``post`` for this round, and fetch the same post of each of ``members`` but this one."""
        self.exchange.post(bytes.fromhex(started.claim.commit) + suffix, post)
        peers = {str(p): p for p in gathered}
        wanted = {
            peers[p]: bytes.fromhex(screened.claims[p].commit) + suffix for p in members if p != self.me
        }
        return {str(p): got for p, got in self.exchange.fetch(wanted, self.timeout).items()}

    def _finish(self, screened: Screened, problem: str | None, size: int) -> Outcome:
        self.exclusions.record(screened)
        return Outcome(screened, problem, size)


class ButterflyRounds(RoundsBase):
    """``mean``: hivemind's all-reduce, verified with probes seeded by the round (module docstring)."""

    def __init__(self, dht: DHT, prefix: str, anchor: Sequence[torch.Tensor], cfg: GroupConfig,
                 compression: CompressionBase, exchange: RoundExchange, exclusions: Exclusions,
                 **common: Any):  # fmt: skip
        super().__init__(dht, cfg, exchange, exclusions)
        self.verifier = RoundVerifier(anchor, cfg.compression)
        self.anchor, self.compression = anchor, compression  # for the byte estimate (shapes only)
        self.averager = MemberAverager(  # admits members only, in a permissioned swarm
            [torch.zeros_like(a) for a in anchor], dht, prefix=delta_prefix(prefix), compression=compression,
            allow_state_sharing=False, **common,
        )  # fmt: skip

    def start(self, write: Write, fields: dict[str, Any], timeout: float) -> Started | None:
        with self.averager.get_tensors() as delta:
            write(delta)
            if not all_finite(delta):
                return None
            own = [d.clone() for d in delta]  # revealed projections are taken once the seed is known
        return self._start(fields, max(float(fields["weight"]), 1e-6), own, timeout)

    def finish(self, started: Started, gathered: Mapping[PeerID, Any], apply: Apply) -> Outcome:
        screened = parse_claims(gathered)
        members = sorted(str(p) for p in gathered)
        if screened.rejected:  # the average holds a member whose claims cannot even be read
            return self._finish(screened, "a member sent malformed round metadata", len(members))
        reject_steps_ahead(screened)
        peers = frozenset(members)
        got = self._post_and_fetch(started, gathered, b"n", Post(peers, {"nonce": started.nonce.hex()}),
                                   screened, members)  # fmt: skip
        nonces = {self.me: started.nonce}
        for peer, received in got.items():
            nonce = _nonce(received, screened.claims[peer])
            if nonce is None:
                return self._finish(screened, f"member {peer} did not reveal its nonce", len(members))
            nonces[peer] = nonce
        probe = self.verifier.probe(round_seed([nonces[p] for p in members]))
        mine = self.verifier.checks(started.own, probe)
        reveal = RoundReveal(nonce=started.nonce.hex(), proj=mine.projections, sq=mine.sq_norms)
        got = self._post_and_fetch(
            started, gathered, b"p", Post(peers, reveal.model_dump()), screened, members
        )
        checks = {self.me: mine}
        for peer, received in got.items():
            try:
                if isinstance(received, str):
                    raise RoundRejected(received)
                r = parse_reveal(received.metadata)
            except RoundRejected as e:
                return self._finish(screened, f"member {peer} did not reveal its checks: {e}", len(members))
            checks[peer] = RoundChecks(r.proj, r.sq)
        norms = {
            p: math.sqrt(max(sum(c.sq_norms), sum(x * x for x in c.projections))) for p, c in checks.items()
        }
        reject_outlier_norms(screened, norms, self.cfg)
        caps = weight_caps(screened, self.cfg)
        weights = [screened.claims[p].weight for p in members]
        with self.averager.get_tensors() as averaged:
            problem = self.verifier.verify(averaged, weights, [checks[p] for p in members], probe)
            if problem is None:
                problem = self._refusal(screened, caps, members)
            if problem is None:
                apply(averaged)
        return self._finish(screened, problem, len(members))

    def bytes_sent(self, group_size: int) -> int:
        """What this member sends in a round: its parts out, the reduced parts back."""
        return estimate_bytes_sent(self.anchor, self.compression, group_size)

    def _refusal(self, screened: Screened, caps: Mapping[str, float], members: Sequence[str]) -> str | None:
        """Why a verified average must not be applied: it holds an update that the checks refuse."""
        excluded = [p for p in members if self.exclusions.is_excluded(p)]
        if screened.rejected:
            peer, why = sorted(screened.rejected.items())[0]
            return f"refused: the average holds a rejected update ({peer}: {why})"
        if excluded:
            return f"refused: the average holds the update of excluded member {excluded[0]}"
        over = [p for p in members if screened.claims[p].weight > caps.get(p, 0.0) * (1 + 1e-9)]
        if over:
            return f"refused: member {over[0]} claimed more weight than the group's cap"
        return None


def _nonce(received: Received | str, claim: RoundClaim) -> bytes | None:
    """The nonce a member revealed, if it is the one it committed to."""
    metadata = received.metadata if isinstance(received, Received) else None
    raw = metadata.get("nonce") if isinstance(metadata, dict) else None
    if not isinstance(raw, str) or len(raw) != 64:
        return None
    try:
        nonce = bytes.fromhex(raw)
    except ValueError:
        return None
    return nonce if hashlib.sha256(nonce).hexdigest() == claim.commit else None


def round_report(step: int, ok: bool, reason: str, group_size: int, duration_s: float, sent: int,
                  weight: float, rejected: list[str], excluded: list[str]) -> RoundReport:  # fmt: skip
    """What a member reports of a round (the peers it names bounded, as the record requires)."""
    return RoundReport(
        outer_step=step, ok=ok, reason=reason[:200], group_size=group_size, duration_s=duration_s,
        bytes_sent=sent, weight=float(weight), time=get_dht_time(), rejected=rejected[:MAX_LISTED],
        excluded=excluded[:MAX_LISTED],
    )  # fmt: skip
