"""Bytes on the wire per training token: per-step fp32 data-parallel averaging against cogen's outer steps.

An *algorithmic* benchmark, in one process: ``--workers`` simulated workers, each with its own copy of
the trainable weights, its own inner optimizer and its own data shard (``cogen.core.data.train_batches``
shard ``i`` of ``W``), train the same model from the same seeded start on the same total tokens in
these arms:

- ``baseline`` (data parallel): every inner step, the workers' gradients are averaged in fp32 and one
  shared optimizer steps; bytes per step = what one member sends in a butterfly all-reduce of the
  fp32 gradients (``estimate_bytes_sent(grads, NoCompression(), W)``).
- ``cogen`` (DiLoCo, as ``cogen.node.group.GroupAverager``): each worker runs H inner steps alone;
  then every pseudo-gradient (anchor - weights) goes once through the real wire format
  (``wire_compression("8bit", 4096)``: hivemind ``compress`` → ``deserialize_torch_tensor``), the
  decoded deltas are averaged weighted by samples, the mean makes the return trip through the wire
  format as the butterfly's reduced parts do, and ``GroupAverager._apply`` itself (Nesterov SGD,
  lr 0.7, momentum 0.9 by default) moves the shared anchor; every worker continues from it. Bytes per
  round = ``estimate_bytes_sent(deltas, wire_compression(...), W)``, as ``GroupAverager`` reports.
- ``cogen overlap`` (a node's ``--overlap``; ``--no-overlap-arm`` skips it): the same rounds, but each
  average lands one round late, as ``GroupAverager.begin_round(keep_progress=True)`` and
  ``finish_round`` do: the weights become the new anchor plus the progress made while the round ran,
  and that progress goes into the next round's pseudo-gradient. Its loss is taken on the anchor once
  the round in flight lands (what a node saves when it stops).

Real-network behaviour (matchmaking, verification, partial rounds, state sync) is covered by the
tests and ``bench.averaging``; this benchmark measures the algorithm and its bytes.

The model is a randomly initialised Llama whose every weight is trainable. The tokenizer is GPT-2's
(50257 tokens), whose embedding would dwarf a 0.3M-parameter model, so token ids are folded into a
small vocabulary (``id % --vocab``, for training and validation alike); the learning curve stays
meaningful, the task a little harder. Both arms use the same inner optimizer (cogen's
``models.build_optimizer`` and ``models.warmup_schedule``) and the same step code.

The pieces: ``model.py`` (settings, model, data, a worker's inner steps), ``flags.py`` (one flag per
setting), ``outer.py`` (the wire trip and cogen's outer step), ``arms.py`` (the arms) and ``report.py``
(figures, targets, table); this module parses and runs them.

Run ``python -m bench.communication --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..harness import BenchError, new_parser, parse, run_main, targets_json, write_report
from .arms import run_baseline, run_cogen
from .flags import add_settings_flags, settings_from
from .model import Settings, build_model, load_data
from .report import AIMS, TARGETS, figures, format_report, meets


def run_benchmark(s: Settings, json_path: Path | None, overlap_arm: bool = True) -> int:
    torch.set_num_threads(s.threads)
    if s.steps < 2 or s.steps % 2:
        raise BenchError("--steps must be even and at least 2")
    print(
        f"communication benchmark: {s.workers} workers x {s.steps} inner steps, batch {s.batch_size}x"
        f"{s.block_size}, H={s.inner_steps}, outer lr {s.outer_lr} momentum {s.outer_momentum}, "
        f"{s.compression} wire, domain {s.domain}",
        flush=True,
    )
    data = load_data(s, s.steps, s.workers)
    params = sum(p.numel() for p in build_model(s).parameters())
    print(f"model: Llama, {params:,} parameters (all trainable), vocabulary folded to {s.vocab}", flush=True)
    arms = 3 if overlap_arm else 2
    print(f"[1/{arms}] baseline: per-step fp32 gradient averaging ...", flush=True)
    base = run_baseline(s, data, s.steps)
    print(f"[2/{arms}] cogen: DiLoCo outer steps through the 8-bit wire format ...", flush=True)
    cogen = run_cogen(s, data, s.steps)
    overlap = None
    if overlap_arm:
        print(f"[3/{arms}] cogen overlap: each outer step applied one round late ...", flush=True)
        overlap = run_cogen(s, data, s.steps, overlap=True)
    report = figures(s, base, cogen, s.steps, overlap)
    print()
    print(format_report(s, report), flush=True)
    write_report(json_path, {
        **report,
        "targets": targets_json(TARGETS),
        "aims": AIMS,
        "meets_targets": {k: meets(k, report[k]) for k in ("bytes_ratio", "loss_gap_pct")},
        "curves": {"baseline": base.curve, "cogen": cogen.curve,
                   **({"cogen_overlap": overlap.curve} if overlap else {})},
        "settings": {**asdict(s), "parameters": params, "torch": torch.__version__,
                     "platform": platform.platform()},
    })  # fmt: skip
    return 0


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None, bool]:
    parser = new_parser(__doc__)
    add_settings_flags(parser, Settings())
    parser.add_argument(
        "--overlap-arm", action=argparse.BooleanOptionalAction, default=True,
        help="also run cogen with --overlap: each outer step applied one round late",
    )  # fmt: skip
    args = parse(parser, argv)
    return settings_from(args, parser), args.json, args.overlap_arm


def main(argv: list[str] | None = None) -> int:
    settings, json_path, overlap_arm = parse_args(argv)
    return run_main("communication", lambda: run_benchmark(settings, json_path, overlap_arm))


if __name__ == "__main__":
    sys.exit(main())
