"""One hostile member in a group of 4: what each aggregator lets it do to the group's model.

Four members train the communication benchmark's tiny seeded Llama (``bench.communication.model``:
cogen's inner optimizer and schedule, each member on its own shard of one domain) and average with
real :class:`cogen.node.group.GroupAverager` s, each on its own hivemind DHT on 127.0.0.1, in this
process. For every aggregator (``mean``, ``trimmed_mean``, ``centered_clip``) the same seeded run is
done all-honest, then once per attack with member 4 hostile: it trains honestly, and then tampers
with what it sends (through the averager's own inputs: the weights it hands in, the sample count,
the outer step, which is also its declared state-sharing priority):

- ``scaled``: its update times 100;  ``sign_flip``: its update negated;
- ``noise``: Gaussian noise of its update's norm instead of the update;
- ``weight``: a claimed weight of 1e30;  ``step``: a claimed outer step of 10**15.

Figures: the final validation loss of an honest member against the all-honest ``mean`` run of the
same seed (``loss_ratio_<attack>_<aggregator>``, target <= 1.05 for the robust aggregators; with
``mean`` the harm is shown), whether the hostile member ended excluded
(``excluded_<attack>_<aggregator>``), and each robust aggregator's all-honest loss against
``mean``'s (``honest_ratio_<aggregator>``, within 1 %). A round in which hivemind did not put all
four members into one group is rewound and run again (up to 3 times), so every run compares the
same rounds.

Run ``python -m bench.byzantine [--rounds N] [--inner-steps H] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from .communication.model import Data, Settings, Worker, evaluate, load_data
from .harness import new_parser, parse, ratio_line, run_main, table_lines, targets_json, write_report

AGGREGATORS = ["mean", "trimmed_mean", "centered_clip"]
ATTACKS = ["scaled", "sign_flip", "noise", "weight", "step"]
ROBUST = ["trimmed_mean", "centered_clip"]
HOSTILE = 3
TARGETS = {
    **{f"loss_ratio_{a}_{g}": ("<=", 1.05) for a in ATTACKS for g in ROBUST},
    **{f"honest_ratio_{g}": ("<=", 1.01) for g in ROBUST},
}
Tamper = Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]]


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return sum(float(t.double().pow(2).sum()) for t in tensors) ** 0.5


def _noise(delta: list[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    noise = [torch.randn(t.shape, generator=g) for t in delta]
    return [n * (_norm(delta) / _norm(noise)) for n in noise]


TAMPER: dict[str, Tamper] = {
    "scaled": lambda d, g: [t * 100 for t in d],
    "sign_flip": lambda d, g: [-t for t in d],
    "noise": _noise,
}


class Group:
    """Four members, each a worker (model, inner optimizer) with a GroupAverager on its own DHT."""

    def __init__(self, s: Settings, aggregator: str, matchmaking_s: float):
        import hivemind

        from cogen.core.config import GroupConfig
        from cogen.node.group import GroupAverager

        self.cfg = GroupConfig(
            matchmaking_s=matchmaking_s, group_size=4, averaging_timeout_s=30, sync_every=1000,
            compression="none", aggregator=aggregator, inner_steps=s.inner_steps,  # type: ignore[arg-type]
        )  # fmt: skip
        first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        self.dhts = [first] + [
            hivemind.DHT(
                host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs(), start=True
            )
            for _ in range(3)
        ]
        self.workers = [Worker(s) for _ in self.dhts]
        self.groups = [
            GroupAverager(dht, f"byzantine{aggregator}", w.params, self.cfg)
            for dht, w in zip(self.dhts, self.workers, strict=True)
        ]
        self.start = [{k: v.clone() for k, v in w.model.state_dict().items()} for w in self.workers]
        self.hostile_id = str(self.dhts[HOSTILE].peer_id)

    def reset(self, s: Settings) -> None:
        """Back to the seeded start: weights, inner optimizers, anchors, momenta, counters, exclusions."""
        from cogen.core import models
        from cogen.core.config import OptimConfig

        for w, g, start in zip(self.workers, self.groups, self.start, strict=True):
            w.model.load_state_dict(start)
            ocfg = OptimConfig(optimizer=s.optimizer, lr=s.lr, warmup_steps=s.warmup_steps)  # type: ignore[arg-type]
            w.optimizer = models.build_optimizer(w.params, ocfg)
            w.scheduler = models.warmup_schedule(w.optimizer, s.warmup_steps)
            with torch.no_grad():
                g.restore(
                    [p.detach().float() for p in w.params], [torch.zeros_like(p) for p in w.params], 0, 0
                )
            g.exclusions.clear()

    def shutdown(self) -> None:
        for g in self.groups:
            g.shutdown()
        for d in self.dhts:
            d.shutdown()


def _outer_round(group: Group, attack: str | None, samples: list[int], g: torch.Generator) -> list[Any]:
    """One outer step on all four at once; rewound and retried while not all four met in one group."""
    hostile = group.groups[HOSTILE]
    params = [[p.detach().clone() for p in w.params] for w in group.workers]
    snaps = [(m.anchor_state(), m.momentum_state(), m.outer_step, m.samples_at_anchor) for m in group.groups]
    if attack in TAMPER:  # the hostile member hands in the weights that make its delta the tampered one
        anchor = hostile.anchor_state()
        sent = TAMPER[attack]([a - p for a, p in zip(anchor, params[HOSTILE], strict=True)], g)
        params[HOSTILE] = [a - d for a, d in zip(anchor, sent, strict=True)]
    for attempt in range(3):
        for w, saved in zip(group.workers, params, strict=True):
            with torch.no_grad():
                for p, v in zip(w.params, saved, strict=True):
                    p.copy_(v)
        totals = list(samples)
        if attack == "weight":
            totals[HOSTILE] = hostile.samples_at_anchor + 10**30
        if attack == "step":
            hostile.outer_step = 10**15
        with ThreadPoolExecutor(4) as pool:
            reports = list(
                pool.map(lambda mt: mt[0].outer_step_now(mt[1]), zip(group.groups, totals, strict=True))
            )
        dropped = [group.hostile_id in r.rejected or group.hostile_id in r.excluded for r in reports]
        torn = ("incomplete", "did not", "no group", "failed", "no groupmates", "missing")
        if all(
            r.group_size + d >= 4 and not any(t in r.reason for t in torn)
            for r, d in zip(reports, dropped, strict=True)
        ):
            return reports
        if attempt < 2:
            for m, (a, mom, step, done) in zip(group.groups, snaps, strict=True):
                m.restore(a, mom, step, done)
    return reports


def run_one(group: Group, s: Settings, data: Data, rounds: int, attack: str | None) -> dict[str, Any]:
    group.reset(s)
    g = torch.Generator().manual_seed(s.seed + 1)
    samples = [0] * 4
    applied = 0
    for r in range(rounds):
        for i, w in enumerate(group.workers):
            for k in range(s.inner_steps):
                w.step([data.shards[i][r * s.inner_steps + k]])
            samples[i] += s.inner_steps * s.batch_size
        reports = _outer_round(group, attack, samples, g)
        applied += reports[0].ok
    with torch.no_grad():
        loss = evaluate(group.workers[0].model, data.validation)
    excluded = any(m.exclusions.is_excluded(group.hostile_id) for m in group.groups[:HOSTILE])
    return {"loss": loss, "excluded": excluded, "rounds_applied": applied}


def run_benchmark(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    # every honest member logs every rejection and refused round: the table below says it once
    logging.getLogger("cogen.node").setLevel(logging.ERROR)
    s = replace(
        Settings(), inner_steps=args.inner_steps, eval_blocks=args.eval_blocks, warmup_steps=5, seed=args.seed
    )
    print(f"byzantine benchmark: 4 members (1 hostile), {args.rounds} rounds of H={s.inner_steps}, "
          f"batch {s.batch_size}x{s.block_size}, domain {s.domain}", flush=True)  # fmt: skip
    data = load_data(s, args.rounds * s.inner_steps, 4)
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    for aggregator in AGGREGATORS:
        group = Group(s, aggregator, args.matchmaking_s)
        try:
            for attack in [None, *ATTACKS]:
                name = f"{attack or 'honest'}_{aggregator}"
                results[name] = run_one(group, s, data, args.rounds, attack)
                print(f"  {name:<24} loss {results[name]['loss']:.4f}  excluded {results[name]['excluded']}  "
                      f"rounds applied {results[name]['rounds_applied']}/{args.rounds}  "
                      f"({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
        finally:
            group.shutdown()
    base = results["honest_mean"]["loss"]
    figures: dict[str, Any] = {}
    for aggregator in AGGREGATORS:
        figures[f"honest_ratio_{aggregator}"] = results[f"honest_{aggregator}"]["loss"] / base
        for attack in ATTACKS:
            figures[f"loss_ratio_{attack}_{aggregator}"] = results[f"{attack}_{aggregator}"]["loss"] / base
            figures[f"excluded_{attack}_{aggregator}"] = results[f"{attack}_{aggregator}"]["excluded"]
    rows = [["attack", *AGGREGATORS]]
    for attack in ["honest", *ATTACKS]:
        key = "honest_ratio_{g}" if attack == "honest" else f"loss_ratio_{attack}_{{g}}"
        cells = []
        for g in AGGREGATORS:
            excluded = (
                "" if attack == "honest" else (" excl" if figures[f"excluded_{attack}_{g}"] else "     ")
            )
            cells.append(f"{figures[key.format(g=g)]:.3f}{excluded}")
        rows.append([attack, *cells])
    print("\nfinal validation loss / the all-honest mean run's (excl: the hostile member ended excluded)")
    print("\n".join(table_lines(rows)))
    print(f"\nall-honest mean run: validation loss {base:.4f}")
    for key in TARGETS:
        print(ratio_line(key, figures[key], TARGETS, width=30))
    ok = all((figures[k] <= v) if op == "<=" else figures[k] >= v for k, (op, v) in TARGETS.items())
    ok = ok and all(abs(figures[f"honest_ratio_{g}"] - 1) <= 0.01 for g in ROBUST)
    settings = {"rounds": args.rounds, "inner_steps": s.inner_steps, "seed": s.seed}
    report = {**figures, "runs": results, "targets": targets_json(TARGETS), "meets_targets": ok}
    write_report(args.json, {**report, "settings": settings})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser(__doc__, {"quick": ("2 rounds of H=4: a smoke run", {"rounds": 2, "inner_steps": 4})})
    parser.add_argument("--rounds", type=int, default=5, help="outer steps per run")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner steps (H) per outer step")
    parser.add_argument("--eval-blocks", type=int, default=128, help="validation blocks of 64 tokens")
    parser.add_argument("--matchmaking-s", type=float, default=1.0, help="the groups' matchmaking time")
    parser.add_argument("--seed", type=int, default=0)
    args = parse(parser, argv)
    return run_main("byzantine", lambda: run_benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
