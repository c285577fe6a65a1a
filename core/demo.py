"""``cogen demo``: a whole swarm on this machine, start to finish.

Starts a coordinator and the nodes as separate processes on 127.0.0.1 — one per domain listed; a
domain listed twice gets a group of two nodes that average their expert with outer steps — trains
for a bounded time while printing the swarm's progress from the coordinator's API, then evaluates
the base and each domain's expert on that domain's validation split and prints the table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogen import models
from cogen.checkpoint import latest_checkpoint, load_adapter, read_metadata, write_json_atomic
from cogen.config import ModelConfig, Precision
from cogen.corpora import get_corpus
from cogen.data import validation_blocks
from cogen.evaluation import perplexity, validation_loss
from cogen.procs import ChildFailed, read_json, spawn, stop, tail, wait_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    model: str = "smollm2-135m"
    domains: tuple[str, ...] = ("medical", "medical", "legal", "code")
    inner_steps: int = 10
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    train_seconds: float = 240.0
    precision: Precision = "int8"
    block_size: int = 128
    batch_size: int = 4
    lr: float = 2e-3
    eval_blocks: int = 16
    out_dir: Path = Path("runs/demo")
    json_path: Path | None = None
    threads_per_node: int = 1
    extra_lora_targets: tuple[str, ...] = ()
    warmup_steps: int = 2


@dataclass(frozen=True)
class DomainResult:
    domain: str
    base_loss: float
    expert_loss: float
    tokens_trained: int
    steps: int
    nodes: int


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _progress_line(snapshot: dict[str, Any]) -> str:
    parts = [
        f"{p['expert']}: step {p['step']} loss {p['loss']:.3f}"
        if p["loss"] is not None
        else f"{p['expert']}: {p['state']}"
        for p in snapshot["peers"]
    ]
    return (
        f"peers {snapshot['peers_online']} | {snapshot['samples_per_second']:.1f} samples/s | "
        + " | ".join(parts)
    )


def train_swarm(opts: DemoOptions) -> dict[str, list[Path]]:
    """Run the coordinator and the nodes; return each domain's saved expert checkpoint."""
    out = opts.out_dir
    ready = out / "coordinator.json"
    ready.unlink(missing_ok=True)
    history = out / "history.sqlite3"  # this run's dashboard history, not an earlier demo's
    for stale in out.glob("history.sqlite3*"):
        stale.unlink()
    coord_log = out / "coordinator.log"
    coordinator = spawn(
        "cogen.coordinator.cli",
        [
            "--swarm",
            "demo",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--api-port",
            "0",
            "--ready-file",
            str(ready),
            "--poll-interval-s",
            "1",
            "--record-ttl-s",
            "30",
            "--history-path",
            str(history),
        ],
        coord_log,
    )
    nodes: dict[str, Any] = {}
    try:
        info = wait_for(lambda: read_json(ready), 120, "coordinator start", alive=[coordinator])
        print(f"coordinator up: API {info['api_url']}/api/swarm", flush=True)
        for name, domain in _node_names(opts.domains):
            nodes[name] = spawn(
                "cogen.node.cli",
                [
                    "--swarm",
                    "demo",
                    "--host",
                    "127.0.0.1",
                    "--initial-peers",
                    *info["initial_peers"],
                    "--expert",
                    domain,
                    "--model",
                    opts.model,  # the name (already resolved and cached above), so checkpoints record it
                    "--precision",
                    opts.precision,
                    "--block-size",
                    str(opts.block_size),
                    "--batch-size",
                    str(opts.batch_size),
                    "--lr",
                    str(opts.lr),
                    "--max-seconds",
                    str(opts.train_seconds),
                    "--output-dir",
                    str(out / "experts" / name),
                    "--inner-steps",
                    str(opts.inner_steps),
                    "--matchmaking-s",
                    "3",
                    "--outer-lr",
                    str(opts.outer_lr),
                    "--outer-momentum",
                    str(opts.outer_momentum),
                    "--lora-targets",
                    *ModelConfig().lora_targets,
                    *opts.extra_lora_targets,
                    "--warmup-steps",
                    str(opts.warmup_steps),
                    "--threads",
                    str(opts.threads_per_node),
                    "--log-interval-s",
                    "5",
                    "--record-ttl-s",
                    "30",
                ],
                out / f"node-{name}.log",
            )
        deadline = time.monotonic() + opts.train_seconds + 600
        last_print = 0.0
        while any(p.poll() is None for p in nodes.values()):
            if time.monotonic() > deadline:
                raise ChildFailed("nodes did not finish in time")
            if time.monotonic() - last_print >= 10:
                with contextlib.suppress(OSError, ValueError, KeyError):  # the API may be busy: skip a line
                    print(_progress_line(_get_json(info["api_url"] + "/api/swarm")), flush=True)
                last_print = time.monotonic()
            time.sleep(0.5)
        failed = {d: p.returncode for d, p in nodes.items() if p.returncode != 0}
        if failed:
            details = "\n".join(
                f"--- node {d} (exit {c}):\n{tail(out / f'node-{d}.log')}" for d, c in failed.items()
            )
            raise ChildFailed(f"node(s) failed: {failed}\n{details}")
    finally:
        for proc in nodes.values():
            stop(proc)
        stop(coordinator)
    checkpoints: dict[str, list[Path]] = {}
    for name, domain in _node_names(opts.domains):
        ckpt = latest_checkpoint(out / "experts" / name)
        if ckpt is None:
            raise ChildFailed(f"node {name} saved no adapter")
        checkpoints.setdefault(domain, []).append(ckpt)
    return checkpoints


def _node_names(domains: tuple[str, ...]) -> list[tuple[str, str]]:
    """(node name, domain): ``medical-1``, ``medical-2`` for a group of two, plain ``legal`` alone."""
    names = []
    for i, domain in enumerate(domains):
        members = domains.count(domain)
        index = domains[:i].count(domain) + 1
        names.append((f"{domain}-{index}" if members > 1 else domain, domain))
    return names


def evaluate(opts: DemoOptions, model_path: str, checkpoints: dict[str, list[Path]]) -> list[DomainResult]:
    """Validation loss of the base and of each domain's expert on that domain."""
    device = models.resolve_device("cpu")
    tokenizer = models.load_tokenizer(model_path)
    base = models.load_base(model_path, opts.precision, device)
    results = []
    for domain, ckpts in checkpoints.items():
        blocks = validation_blocks(
            get_corpus(domain), tokenizer, block_size=opts.block_size, max_blocks=opts.eval_blocks
        )
        base_loss = validation_loss(base, blocks)
        expert = load_adapter(base, ckpts[0])  # a group's members end on the same outer step
        expert_loss = validation_loss(expert, blocks)
        base = expert.unload()  # take the adapter off again for the next domain
        metas = [read_metadata(c, verify=False) for c in ckpts]
        tokens = sum(m.tokens for m in metas)
        results.append(
            DomainResult(domain, base_loss, expert_loss, tokens, max(m.steps for m in metas), len(ckpts))
        )
    return results


def format_table(model: str, results: list[DomainResult]) -> str:
    head = (
        f"{'domain':<12} {'base loss':>10} {'base ppl':>10} {'expert loss':>12} {'expert ppl':>11} "
        f"{'change':>8} {'nodes':>5} {'steps':>6} {'tokens':>9}"
    )
    rows = [f"validation loss per domain, base {model} vs that domain's expert", head, "-" * len(head)]
    for r in results:
        change = (r.expert_loss - r.base_loss) / r.base_loss * 100
        rows.append(
            f"{r.domain:<12} {r.base_loss:>10.4f} {perplexity(r.base_loss):>10.2f} {r.expert_loss:>12.4f} "
            f"{perplexity(r.expert_loss):>11.2f} {change:>7.1f}% {r.nodes:>5} {r.steps:>6} "
            f"{r.tokens_trained:>9}"
        )
    return "\n".join(rows)


def run_demo(opts: DemoOptions) -> list[DomainResult]:
    started = time.monotonic()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"cogen demo: model {opts.model}, domains {', '.join(opts.domains)}, {opts.train_seconds:.0f} s of "
        f"training, logs in {opts.out_dir}",
        flush=True,
    )
    model_path = models.resolve_model(opts.model)
    checkpoints = train_swarm(opts)
    print("training done; evaluating base and experts on each domain's validation split", flush=True)
    results = evaluate(opts, model_path, checkpoints)
    print(format_table(opts.model, results))
    print(f"demo finished in {time.monotonic() - started:.0f} s", flush=True)
    if opts.json_path is not None:
        write_json_atomic(
            opts.json_path,
            {
                "model": opts.model,
                "domains": {
                    r.domain: {
                        "base_loss": r.base_loss,
                        "expert_loss": r.expert_loss,
                        "tokens_trained": r.tokens_trained,
                        "nodes": r.nodes,
                        "steps": r.steps,
                    }
                    for r in results
                },
            },
        )
    return results
