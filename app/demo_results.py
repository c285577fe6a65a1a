"""``cogen demo``'s results: each domain's losses, from the signed manifests and a final evaluation.

Per domain: the pretrained base (generation 0), the generation-0 expert and every merged base (from
the evaluation matrices in the coordinator's signed manifests, same validation blocks) and the final
expert (evaluated here, on the base it ended on); printed as a table (:func:`format_table`) and as JSON
(:func:`results_json`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogen.core import models
from cogen.core.checkpoint import load_adapter, read_metadata
from cogen.core.corpora import get_corpus
from cogen.core.data import validation_blocks
from cogen.core.evaluation import perplexity, validation_loss
from cogen.protocols.manifest import Manifest, verify_manifest

if TYPE_CHECKING:
    from cogen.app.demo import DemoOptions


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


def fusion_lines(manifests: list[Any]) -> list[str]:
    """Per fused generation, its teachers: each one's kind and share of the fused targets."""
    lines = []
    for m in manifests:
        if m.fusion is None:
            continue
        teachers = ", ".join(
            f"{s.name} ({'foreign, ' if s.kind == 'source' else ''}{s.architecture}, {s.fusion_weight:.0%})"
            for s in m.fusion.sources
        )
        lines.append(f"generation {m.generation} fused from {teachers}")
    return lines


def results_json(
    model: str,
    results: list[DomainResult],
    methods: list[str],
    manifests: Sequence[Any] = (),
) -> dict[str, Any]:
    """The demo's results as the JSON ``--json`` writes."""
    fused = {
        str(m.generation): [s.model_dump(mode="json") for s in m.fusion.sources]
        for m in manifests
        if m.fusion is not None
    }
    return {
        "model": model,
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
        "fusion_sources": fused,
    }
