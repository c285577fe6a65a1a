"""``cogen demo``: a whole swarm on this machine, start to finish.

Starts a coordinator and the nodes as separate processes on 127.0.0.1 — one per domain listed; a
domain listed twice gets a group of two nodes that average their expert with outer steps. The
experts train on generation 0 (the pretrained base); every ``train_seconds / (generations + 1)``
the coordinator collects them from their groups, ranks and merges them into the next base and
publishes it signed; the nodes fetch, verify and continue on it. After the last generation the
experts train once more, then the demo prints, per domain, the loss of base g0, the g0 expert,
every merged base and the final expert, with the merge method (:mod:`cogen.app.demo_results`).

Each child gets its settings as a config file: the demo builds the :class:`CoordinatorConfig` and
each :class:`NodeConfig` (checked here, before anything starts) and writes them as nested JSON,
atomically, next to the logs; the child reads it with ``--config FILE``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogen.app.demo_results import (
    DomainResult,
    evaluate,
    format_table,
    fusion_lines,
    published_manifests,
    results_json,
)
from cogen.coordinator.config import (
    ApiConfig,
    CoordinatorConfig,
    CoordinatorKeys,
    EvalConfig,
    FuseConfig,
    HistoryConfig,
    MergeOptions,
    MixtureConfig,
    ScheduleConfig,
    ViewConfig,
)
from cogen.core import models
from cogen.core.atomic import write_json_atomic
from cogen.core.checkpoint import latest_checkpoint
from cogen.core.config import (
    DataConfig,
    GroupConfig,
    ModelConfig,
    NetworkConfig,
    NodeConfig,
    OptimConfig,
    Precision,
)
from cogen.core.procs import ChildFailed, read_json, spawn, stop, tail, wait_for
from cogen.core.settings import write_config

logger = logging.getLogger(__name__)

SWARM = "demo"
RECORD_TTL_S = 30.0


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
    generations: int = 2
    merge_method: str = "linear"
    fuse: bool = False  #: a node on another model trains a foreign expert; the coordinator fuses

    @property
    def foreign_model(self) -> str:
        """The foreign node's model: another vocabulary than the swarm's base."""
        return "tiny-smol" if self.model == "tiny" else "tiny"

    @property
    def foreign_node(self) -> tuple[str, str]:
        """(node name, domain) of the foreign node: the last domain's."""
        return f"{self.domains[-1]}-foreign", self.domains[-1]

    @property
    def generation_s(self) -> float:
        """Training time per generation: the experts train on g0, g1, ..., and the last base."""
        return self.train_seconds / (self.generations + 1)


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


def coordinator_config(opts: DemoOptions) -> CoordinatorConfig:
    """The demo's coordinator: on loopback, ends a generation every ``generation_s``, merges and evaluates."""
    out = opts.out_dir
    return CoordinatorConfig(
        network=NetworkConfig(swarm=SWARM, host="127.0.0.1", port=0, record_ttl_s=RECORD_TTL_S),
        api=ApiConfig(api_port=0, ready_file=out / "coordinator.json"),
        view=ViewConfig(poll_interval_s=1.0),
        history=HistoryConfig(history_path=out / "history.sqlite3"),  # this run's, not an earlier demo's
        schedule=ScheduleConfig(generation_s=opts.generation_s, max_generations=opts.generations),
        merge=MergeOptions(method=opts.merge_method),
        # few short fusion texts and steps: fusing takes about as long as the merge's evaluation
        fusion=FuseConfig(
            fuse_sequences=8, fuse_length=min(64, opts.block_size), fuse_steps=16, fuse_batch_size=4
        ),
        eval=EvalConfig(eval_blocks=opts.eval_blocks, eval_block_size=opts.block_size),
        moe=MixtureConfig(router_blocks=opts.eval_blocks),
        keys=CoordinatorKeys(identity=out / "coordinator-identity.pem"),
        model=opts.model,
        out_dir=out / "coordinator",
    )


def node_config(
    opts: DemoOptions, name: str, domain: str, initial_peers: list[str], model: str | None = None
) -> NodeConfig:
    """One demo node: ``domain``'s expert on ``model`` (default: the swarm's), joining the coordinator's
    swarm on loopback."""
    return NodeConfig(
        model=ModelConfig(
            model=model or opts.model,  # the name (already resolved and cached), so checkpoints record it
            precision=opts.precision,
            lora_targets=(*ModelConfig().lora_targets, *opts.extra_lora_targets),
        ),
        data=DataConfig(expert=domain, block_size=opts.block_size, batch_size=opts.batch_size),
        optim=OptimConfig(lr=opts.lr, warmup_steps=opts.warmup_steps),
        group=GroupConfig(
            inner_steps=opts.inner_steps,
            matchmaking_s=3.0,
            outer_lr=opts.outer_lr,
            outer_momentum=opts.outer_momentum,
        ),
        network=NetworkConfig(
            swarm=SWARM, host="127.0.0.1", initial_peers=tuple(initial_peers), record_ttl_s=RECORD_TTL_S
        ),
        output_dir=opts.out_dir / "experts" / name,
        threads=opts.threads_per_node,
        log_interval_s=5.0,
    )


#: the settings a child may still take from the environment: its config file holds all the others
_INHERITED = ("COGEN_CACHE_DIR", "COGEN_LOG_LEVEL")


def child_environ() -> dict[str, str]:
    """This environment without ``COGEN_*`` settings (they would override the children's config files,
    which rank below the environment), except the cache and the log level."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COGEN_") or k in _INHERITED}


def train_swarm(opts: DemoOptions) -> dict[str, list[Path]]:
    """Run the coordinator and the nodes; return each domain's saved expert checkpoint."""
    out = opts.out_dir
    coordinator_cfg = coordinator_config(opts)
    ready = coordinator_cfg.api.ready_file
    assert ready is not None
    ready.unlink(missing_ok=True)
    for stale in out.glob("history.sqlite3*"):
        stale.unlink()
    config = write_config(out / "coordinator-config.json", coordinator_cfg)
    environ = child_environ()
    coordinator = spawn(
        "cogen.coordinator.cli", ["--config", str(config)], out / "coordinator.log", environ=environ
    )
    nodes: dict[str, Any] = {}
    try:
        info = wait_for(lambda: read_json(ready), 120, "coordinator start", alive=[coordinator])
        print(f"coordinator up: API {info['api_url']}/api/swarm", flush=True)
        foreign = [(*opts.foreign_node, opts.foreign_model)] if opts.fuse else []
        # the foreign node first: its model loads while the swarm's nodes start, so it is in the first fusion
        for name, domain, model in [*foreign, *((n, d, None) for n, d in _node_names(opts.domains))]:
            node_cfg = node_config(opts, name, domain, info["initial_peers"], model)
            config = write_config(out / f"node-{name}-config.json", node_cfg)
            log = out / f"node-{name}.log"
            nodes[name] = spawn("cogen.node.cli", ["--config", str(config)], log, environ=environ)
        if foreign:
            print(
                f"a foreign node {foreign[0][0]} trains {foreign[0][1]} on {opts.foreign_model}", flush=True
            )
        _run_generations(opts, info["api_url"], [coordinator, *nodes.values()])
        codes = {d: stop(p, grace_s=120) for d, p in nodes.items()}  # SIGTERM: each saves its expert
        failed = {d: c for d, c in codes.items() if c != 0}
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


def _run_generations(opts: DemoOptions, api_url: str, alive: list[Any]) -> None:
    """Print progress while the swarm trains through ``opts.generations`` generations, then let the
    experts train on the last base for one more generation's time."""
    # only a guard against a hung swarm: a merge of SmolLM2 takes minutes, more while four nodes train
    deadline = time.monotonic() + opts.train_seconds + 3600 * opts.generations
    last_print, published, end = 0.0, 0, None
    while end is None or time.monotonic() < end:
        if time.monotonic() > deadline:
            raise ChildFailed(f"the swarm did not publish {opts.generations} generations in time")
        if any(p.poll() is not None for p in alive):
            raise ChildFailed("a demo process exited early")
        if time.monotonic() - last_print >= 10:
            with contextlib.suppress(OSError, ValueError, KeyError):  # the API may be busy: skip a line
                print(_progress_line(_get_json(api_url + "/api/swarm")), flush=True)
                generations = _get_json(api_url + "/api/generations")
                for g in generations[published:]:
                    print(f"generation {g['generation']} published ({g['merge_method']}), "
                          f"ranking: {', '.join(g['ranking'])}", flush=True)  # fmt: skip
                published = len(generations)
            last_print = time.monotonic()
        if end is None and published >= opts.generations and _all_on(api_url, opts.generations, opts):
            end = time.monotonic() + opts.generation_s  # the experts' time on the last base
        time.sleep(0.5)


def _all_on(api_url: str, generation: int, opts: DemoOptions) -> bool:
    """Whether every online node on the swarm's base trains on ``generation``'s (they move at an outer
    step); a foreign node stays on its own model."""
    try:
        peers = _get_json(api_url + "/api/peers")
    except (OSError, ValueError):
        return False
    nodes = [p for p in peers if p["online"] and not (opts.fuse and p.get("model") == opts.foreign_model)]
    return bool(nodes) and all(p["generation"] == generation for p in nodes)


def _node_names(domains: tuple[str, ...]) -> list[tuple[str, str]]:
    """(node name, domain): ``medical-1``, ``medical-2`` for a group of two, plain ``legal`` alone."""
    names = []
    for i, domain in enumerate(domains):
        members = domains.count(domain)
        index = domains[:i].count(domain) + 1
        names.append((f"{domain}-{index}" if members > 1 else domain, domain))
    return names


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
    manifests = published_manifests(opts)
    methods = [m.method for m in manifests]
    print("\n".join([format_table(opts.model, results, methods), *fusion_lines(manifests)]))
    print(f"demo finished in {time.monotonic() - started:.0f} s", flush=True)
    if opts.json_path is not None:
        write_json_atomic(opts.json_path, results_json(opts.model, results, methods, manifests))
    return results
