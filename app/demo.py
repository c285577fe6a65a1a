"""``cogen demo``: a whole swarm on this machine, start to finish.

Starts a coordinator and the nodes as separate processes on 127.0.0.1 — one per domain listed; a
domain listed twice gets a group of two nodes that average their expert with outer steps. The
experts train on generation 0 (the pretrained base); every ``train_seconds / (generations + 1)``
the coordinator collects them from their groups, ranks and merges them into the next base and
publishes it signed; the nodes fetch, verify and continue on it. After the last generation the
experts train once more, then the demo prints, per domain, the loss of base g0, the g0 expert,
every merged base and the final expert, with the merge method.
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

from cogen.core import models
from cogen.core.atomic import write_json_atomic
from cogen.core.checkpoint import latest_checkpoint, load_adapter, read_metadata
from cogen.core.config import ModelConfig, Precision
from cogen.core.corpora import get_corpus
from cogen.core.data import validation_blocks
from cogen.core.evaluation import perplexity, validation_loss
from cogen.core.procs import ChildFailed, read_json, spawn, stop, tail, wait_for
from cogen.protocols.manifest import Manifest, verify_manifest

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
    generations: int = 2
    merge_method: str = "linear"

    @property
    def generation_s(self) -> float:
        """Training time per generation: the experts train on g0, g1, ..., and the last base."""
        return self.train_seconds / (self.generations + 1)


@dataclass(frozen=True)
class DomainResult:
    domain: str
    base_loss: float  #: of the pretrained base (generation 0)
    expert_loss: float  #: of the domain's expert as it ended, on the last generation's base
    tokens_trained: int
    steps: int
    nodes: int
    first_expert_loss: float | None = None  #: of the expert trained on g0, as the coordinator collected it
    merged: tuple[float | None, ...] = ()  #: of each merged base g1, g2, ... (as the coordinator evaluated)


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
            "--model",
            opts.model,
            "--generation-s",
            str(opts.generation_s),
            "--max-generations",
            str(opts.generations),
            "--merge-method",
            opts.merge_method,
            "--eval-blocks",
            str(opts.eval_blocks),
            "--eval-block-size",
            str(opts.block_size),
            "--router-blocks",
            str(opts.eval_blocks),
            "--out-dir",
            str(out / "coordinator"),
            "--identity",
            str(out / "coordinator-identity.pem"),
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
        if end is None and published >= opts.generations and _all_on(api_url, opts.generations):
            end = time.monotonic() + opts.generation_s  # the experts' time on the last base
        time.sleep(0.5)


def _all_on(api_url: str, generation: int) -> bool:
    """Whether every online node trains on ``generation``'s base (they move at an outer step)."""
    try:
        peers = _get_json(api_url + "/api/peers")
    except (OSError, ValueError):
        return False
    nodes = [p for p in peers if p["online"]]
    return bool(nodes) and all(p["generation"] == generation for p in nodes)


def _node_names(domains: tuple[str, ...]) -> list[tuple[str, str]]:
    """(node name, domain): ``medical-1``, ``medical-2`` for a group of two, plain ``legal`` alone."""
    names = []
    for i, domain in enumerate(domains):
        members = domains.count(domain)
        index = domains[:i].count(domain) + 1
        names.append((f"{domain}-{index}" if members > 1 else domain, domain))
    return names


def published_manifests(opts: DemoOptions) -> list[Manifest]:
    """The generations the demo's coordinator published, verified, oldest first."""
    root = opts.out_dir / "coordinator" / "generations"
    return [verify_manifest(d) for d in sorted(root.glob("gen-*")) if (d / "manifest.json").is_file()]


def evaluate(opts: DemoOptions, model_path: str, checkpoints: dict[str, list[Path]]) -> list[DomainResult]:
    """Per domain: the pretrained base and each domain's final expert (on the base it ended on, the
    last generation), evaluated here; the generation-0 experts and every merged base, from the
    evaluation matrices in the signed manifests (same validation blocks)."""
    device = models.resolve_device("cpu")
    tokenizer = models.load_tokenizer(model_path)
    manifests = published_manifests(opts)
    bases: dict[str, Any] = {}
    results = []
    for domain, ckpts in checkpoints.items():
        blocks = validation_blocks(
            get_corpus(domain), tokenizer, block_size=opts.block_size, max_blocks=opts.eval_blocks
        )
        metas = [read_metadata(c, verify=False) for c in ckpts]
        base_path = models.resolve_model(metas[0].base_model)
        first = manifests[0].evaluation if manifests else None
        base_loss = first.base.get(domain) if first is not None else None  # the coordinator's figure
        if base_loss is None:
            if model_path not in bases:
                bases[model_path] = models.load_base(model_path, opts.precision, device)
            base_loss = validation_loss(bases[model_path], blocks)
        if base_path not in bases:
            bases[base_path] = models.load_base(base_path, opts.precision, device)
        expert = load_adapter(bases[base_path], ckpts[0])  # a group's members end on the same outer step
        expert_loss = validation_loss(expert, blocks)
        bases[base_path] = expert.unload()  # take the adapter off again for the next domain
        results.append(DomainResult(
            domain, base_loss, expert_loss, sum(m.tokens for m in metas), max(m.steps for m in metas),
            len(ckpts), first.experts.get(domain, {}).get(domain) if first is not None else None,
            tuple((m.evaluation.merged or {}).get(domain) if m.evaluation else None for m in manifests),
        ))  # fmt: skip
    return results


def _cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.4f}" if value is not None else f"{'n/a':>{width}}"


def format_table(model: str, results: list[DomainResult], methods: list[str]) -> str:
    n = max((len(r.merged) for r in results), default=0)
    merged_head = "".join(f"{f'merged g{g + 1}':>11}" for g in range(n))
    last = f"expert g{n}"
    head = (
        f"{'domain':<10}{'base g0':>10}{'expert g0':>11}{merged_head}{last:>11}{'g0→last':>9}"
        f"{'ppl g0':>9}{'ppl last':>9}{'nodes':>6}{'steps':>6}{'tokens':>9}"
    )
    rows = [
        f"validation loss per domain (nats/token): base {model} (g0), the domain's expert trained on g0, "
        f"each merged base ({', '.join(methods) or 'none published'}), and the expert as it ended on g{n}",
        head,
        "-" * len(head),
    ]
    for r in results:
        best = next((m for m in reversed(r.merged) if m is not None), r.base_loss)
        change = (best - r.base_loss) / r.base_loss * 100
        rows.append(
            f"{r.domain:<10}{r.base_loss:>10.4f}{_cell(r.first_expert_loss, 11)}"
            + "".join(_cell(m, 11) for m in r.merged)
            + f"{r.expert_loss:>11.4f}{change:>8.1f}%{perplexity(r.base_loss):>9.2f}"
            f"{perplexity(best):>9.2f}{r.nodes:>6}{r.steps:>6}{r.tokens_trained:>9}"
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
    methods = [m.method for m in published_manifests(opts)]
    print(format_table(opts.model, results, methods))
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
                        "expert_g0_loss": r.first_expert_loss,
                        "merged_loss": {str(g + 1): m for g, m in enumerate(r.merged)},
                    }
                    for r in results
                },
                "merge_methods": methods,
            },
        )
    return results
