"""The communication benchmark's flags: one per ``Settings`` field, shared with ``scaling.py``."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from .model import Settings


def add_settings_flags(
    parser: argparse.ArgumentParser, defaults: Settings, skip: tuple[str, ...] = ()
) -> None:
    """One flag per ``Settings`` field but those in ``skip`` (shared with ``scaling.py``)."""
    helps = {
        "workers": "simulated members of the group",
        "steps": "inner steps per worker (the token budget)",
        "inner_steps": "H: inner steps between outer steps (default: cogen's GroupConfig)",
        "outer_lr": "outer Nesterov learning rate (default: cogen's)",
        "outer_momentum": "outer Nesterov momentum (default: cogen's)",
        "outer_lr_warmup": "rounds of linear outer-lr warm-up (0: none)",
        "h_start": "H of the first round, doubling each round up to --inner-steps (0: constant H)",
        "compression": "wire format of the pseudo-gradients: 8bit, fp16 or none",
        "threshold": "tensors with fewer elements travel as fp16 in the 8bit format",
        "vocab": "token ids are folded modulo this (the model's vocabulary)",
        "optimizer": "inner optimizer in every arm: adamw (torch) or adamw8bit (bitsandbytes)",
        "shuffle_blocks": "mix each worker's token blocks in a seeded order (smooth curves)",
    }
    for name, value in asdict(defaults).items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"type": type(value), "default": value, "help": helps.get(name, name)}
        if isinstance(value, bool):
            kwargs = {
                "action": argparse.BooleanOptionalAction,
                "default": value,
                "help": helps.get(name, name),
            }
        if name == "compression":
            kwargs["choices"] = ("8bit", "fp16", "none")
        if name == "optimizer":
            kwargs["choices"] = ("adamw", "adamw8bit")
        parser.add_argument(flag, **kwargs)


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    values = {name: getattr(args, name, default) for name, default in asdict(Settings()).items()}
    for name in ("workers", "steps", "inner_steps", "vocab", "hidden", "layers", "block_size", "batch_size"):
        if values[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if values["outer_lr"] <= 0 or not 0 <= values["outer_momentum"] < 1:
        parser.error("--outer-lr must be positive and --outer-momentum in [0, 1)")
    return Settings(**values)
