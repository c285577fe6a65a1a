"""The arms of the communication benchmark: per-step fp32 data parallel, and cogen's DiLoCo rounds
(blocking, or with each average landing one round late as a node's ``--overlap``)."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from hivemind.compression import NoCompression

from cogen.node.wire import estimate_bytes_sent, wire_compression

from .model import GROUP_DEFAULTS, Data, Settings, Worker, evaluate
from .outer import OuterState, average_on_wire, wire_trip

logger = logging.getLogger("cogen.bench.communication")


def round_lengths(s: Settings, steps: int) -> list[int]:
    """H of each round: constant, or doubling from ``h_start``; a round also ends at half the budget."""
    lengths: list[int] = []
    done, h = 0, (s.h_start or s.inner_steps)
    while done < steps:
        end = min(done + h, steps)
        if done < steps // 2 < end:
            end = steps // 2
        lengths.append(end - done)
        done = end
        h = min(2 * h, s.inner_steps)
    return lengths


def outer_lr_at(s: Settings, round_index: int) -> float:
    """The outer learning rate of a round (linear warm-up over ``outer_lr_warmup`` rounds)."""
    if s.outer_lr_warmup <= 0:
        return s.outer_lr
    return s.outer_lr * min(1.0, (round_index + 1) / s.outer_lr_warmup)


@dataclass
class ArmResult:
    """Validation losses at half and full budget, bytes one member sent, and how long it took."""

    loss_half: float = math.nan
    loss: float = math.nan
    bytes_sent: int = 0
    bytes_measured: int = 0  # from the serialized messages (cogen arm), with the butterfly's factor
    rounds: int = 0
    seconds: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, validation loss)


def run_baseline(s: Settings, data: Data, steps: int) -> ArmResult:
    """Data parallel: every step, the workers' fp32 gradients are averaged; one shared optimizer."""
    start, result = time.perf_counter(), ArmResult()
    worker = Worker(s)
    tokens_per_step = s.workers * s.batch_size * s.block_size
    for i in range(steps):
        worker.step([shard[i] for shard in data.shards])
        result.bytes_sent += estimate_bytes_sent(worker.params, NoCompression(), s.workers)
        result.rounds += 1
        if i + 1 in (steps // 2, steps):
            loss = evaluate(worker.model, data.validation)
            result.curve.append(((i + 1) * tokens_per_step, loss))
            logger.info("baseline: step %d/%d, validation loss %.4f", i + 1, steps, loss)
    result.bytes_measured = result.bytes_sent
    result.loss_half, result.loss = result.curve[0][1], result.curve[-1][1]
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class Round:
    """One finished round of the cogen arm: where it stands, what it cost, and a model to evaluate."""

    index: int
    done: int  # inner steps per worker so far
    compute_seconds: float  # the slowest worker's inner steps in this round (CPU time)
    averaging_seconds: float  # the simulated exchange: wire trips of every member, mean, outer step (CPU)
    bytes_sent: int  # what one member sent (estimate, as GroupAverager reports)
    bytes_measured: int  # the same from the serialized messages
    model: torch.nn.Module  # worker 0's model, at the new anchor (overlap: once the round in flight lands)


@dataclass
class InFlight:
    """An overlapped round (``GroupAverager.begin_round(keep_progress=True)``): the average it will
    deliver, each worker's weights when it began (to keep the progress made since) and its index."""

    averaged: list[torch.Tensor]
    snapshots: list[list[torch.Tensor]]
    index: int


def land(state: OuterState, workers: Sequence[Worker], flight: InFlight, lr: float, momentum: float) -> None:
    """``GroupAverager.finish_round`` of an overlapped round, on every member: the outer step moves the
    shared anchor (cogen's ``_apply``) and each worker's weights become the new anchor plus the progress
    it made while the round ran, which the next pseudo-gradient (anchor - weights) then carries."""
    with torch.no_grad():
        progress = [
            [p.detach().float() - snap for p, snap in zip(w.params, snaps, strict=True)]
            for w, snaps in zip(workers, flight.snapshots, strict=True)
        ]
    state.params = workers[0].params
    state.apply(flight.averaged, lr, momentum, progress[0])
    with torch.no_grad():
        for worker, prog in zip(workers[1:], progress[1:], strict=True):
            for p, a, d in zip(worker.params, state.anchor, prog, strict=True):
                p.copy_(a + d)


def landed_model(
    state: OuterState, template: torch.nn.Module, flight: InFlight, lr: float, momentum: float
) -> torch.nn.Module:
    """A copy of the model at the anchor a node holds when it stops now: its final ``outer_step_now``
    lands the round in flight (the zero-weight round it then tries is rejected by the round checks,
    "members sent invalid weights", so nothing else moves). The training state is left untouched."""
    model = copy.deepcopy(template)
    scratch = copy.copy(state)
    scratch.anchor = [a.clone() for a in state.anchor]
    scratch.momentum = [m.clone() for m in state.momentum]
    scratch.state_averager = scratch
    scratch.params = [p for p in model.parameters() if p.requires_grad]
    scratch.apply(flight.averaged, lr, momentum)
    return model


def diloco_rounds(s: Settings, data: Data, steps: int, overlap: bool = False) -> Iterator[Round]:
    """DiLoCo as cogen runs it: H local steps per worker, then one outer step through the wire format.
    A single worker trains alone (cogen's ``solo``): no outer step, nothing sent.

    With ``overlap`` (a node's ``--overlap``), a round's average lands one round late, at the next
    boundary, as :func:`land` describes; the yielded model is the anchor once the round in flight lands.
    """
    workers = [Worker(s) for _ in range(s.workers)]
    state = OuterState(workers[0].params, GROUP_DEFAULTS)
    compression = wire_compression(s.compression, s.threshold)
    if s.workers > 1:  # the first trip imports and initialises bitsandbytes: keep it out of the timings
        wire_trip([torch.zeros(s.threshold)], compression)
    done, flight = 0, None
    for r, h in enumerate(round_lengths(s, steps)):
        before = [w.seconds for w in workers]
        for i in range(done, done + h):
            for w, worker in enumerate(workers):
                worker.step([data.shards[w][i]])
        done += h
        compute = max(w.seconds - b for w, b in zip(workers, before, strict=True))
        start, sent, measured = time.process_time(), 0, 0
        model = workers[0].model
        if s.workers > 1:
            if overlap and flight is not None:  # finish_round: the round begun H steps ago lands first
                land(state, workers, flight, outer_lr_at(s, flight.index), s.outer_momentum)
            deltas = [state.pseudo_gradient(w.params) for w in workers]
            averaged, size = average_on_wire(deltas, [float(h * s.batch_size)] * s.workers, compression)
            if overlap:  # begin_round(keep_progress=True): the average lands at the next boundary
                with torch.no_grad():
                    snapshots = [[p.detach().float().clone() for p in w.params] for w in workers]
                flight = InFlight(averaged, snapshots, r)
                model = landed_model(state, workers[0].model, flight, outer_lr_at(s, r), s.outer_momentum)
            else:
                state.params = workers[0].params
                state.apply(averaged, outer_lr_at(s, r), s.outer_momentum)
                with torch.no_grad():
                    for worker in workers[1:]:
                        for p, a in zip(worker.params, state.anchor, strict=True):
                            p.copy_(a)
            sent = estimate_bytes_sent(deltas[0], compression, s.workers)
            measured = int(2 * size * (s.workers - 1) / s.workers)
        yield Round(r, done, compute, time.process_time() - start, sent, measured, model)


def run_cogen(s: Settings, data: Data, steps: int, overlap: bool = False) -> ArmResult:
    """The cogen arm: :func:`diloco_rounds` (blocking, or overlapped), evaluated at half and full budget."""
    start, result = time.perf_counter(), ArmResult()
    tokens_per_step = s.workers * s.batch_size * s.block_size
    name = "cogen overlap" if overlap else "cogen"
    for rnd in diloco_rounds(s, data, steps, overlap):
        result.bytes_sent += rnd.bytes_sent
        result.bytes_measured += rnd.bytes_measured
        result.rounds += 1
        if rnd.done in (steps // 2, steps):
            loss = evaluate(rnd.model, data.validation)
            result.curve.append((rnd.done * tokens_per_step, loss))
            logger.info(
                "%s: step %d/%d (round %d), validation loss %.4f", name, rnd.done, steps, rnd.index + 1, loss
            )
    result.loss_half, result.loss = result.curve[0][1], result.curve[-1][1]
    result.seconds = time.perf_counter() - start
    return result
