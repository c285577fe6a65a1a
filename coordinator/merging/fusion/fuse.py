"""The ``fuse`` method: the next base distilled from the generation's experts and any other sources.

:class:`Fusion` runs every teacher once over a bounded fusion corpus while the model is still the parent
(:mod:`.targets`: top-k targets, per-byte cross-entropy). A candidate base is then built by
:meth:`Fusion.apply`: the candidate's experts merged linearly into the parent (the student's start),
and a LoRA trained on it towards, per text, the candidate's teacher of lowest cross-entropy (MinCE:
the expert of the text's domain, usually, or a source of another tokenizer) plus the language-modelling
loss, folded into the dense weights (:mod:`.student`). ``scale`` < 1 (the publishing gate's halved
candidate) moves the adapted weights only that fraction of the way from the parent.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cogen.coordinator.merging.apply import merge_into, untie_output
from cogen.coordinator.merging.experts import Expert
from cogen.coordinator.merging.fusion.student import StudentOptions, train_student
from cogen.coordinator.merging.fusion.targets import Targets, fusion_corpus, min_ce, teacher_targets
from cogen.coordinator.merging.fusion.teachers import ExpertTeacher, SourceTeacher
from cogen.coordinator.merging.registry import MergeError, create
from cogen.protocols.fusion import FusionReport, FusionSource

logger = logging.getLogger(__name__)

__all__ = ["FUSE", "FuseOptions", "Fusion"]

FUSE = "fuse"  #: the method name (not a per-module method of the registry: it trains)


@dataclass(frozen=True)
class FuseOptions:
    length: int = 128  #: student tokens per fusion text
    sequences: int = 32  #: fusion texts per domain
    top_k: int = 32
    chunk: int = 4  #: texts per teacher forward pass
    student: StudentOptions = field(default_factory=StudentOptions)


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Fusion:
    """Teachers' targets on the parent, and candidates built from them (see the module)."""

    def __init__(
        self, parent: nn.Module, tokenizer: Any, experts: Sequence[Expert], sources: Sequence[SourceTeacher],
        domains: Sequence[str], options: FuseOptions,
    ) -> None:  # fmt: skip
        if not domains:
            raise MergeError("fusion needs at least one domain to draw its corpus from")
        started = time.monotonic()
        self.options = options
        self.tokenizer = tokenizer
        self.experts = list(experts)
        self.modules = experts[0].modules
        self.domains = list(domains)
        self.corpus = fusion_corpus(self.domains, tokenizer, options.length, options.sequences)
        self.teachers: list[ExpertTeacher | SourceTeacher] = [ExpertTeacher(e, parent) for e in experts]
        self.teachers += list(sources)
        self.identities = [t.identity(tokenizer) for t in self.teachers]
        self.targets: list[Targets] = [
            teacher_targets(t, self.corpus, tokenizer, options.top_k, options.chunk) for t in self.teachers
        ]
        self.teacher_seconds = time.monotonic() - started
        logger.info("fusion: %d teachers on %d texts of %s in %.1f s", len(self.teachers), len(self.corpus),
                    ", ".join(self.domains), self.teacher_seconds)  # fmt: skip

    def apply(self, model: nn.Module, weights: Mapping[str, float], scale: float = 1.0) -> FusionReport:
        """Build the candidate of ``weights`` (expert label -> weight; 0: left out, also as a teacher)
        into ``model`` (the parent, in place); returns its fusion record."""
        started = time.monotonic()
        kept = [e for e in self.experts if weights.get(e.label, 0.0) > 0]
        if not kept:
            raise MergeError("every expert has weight 0; nothing to fuse")
        untie_output(model, self.modules)
        parent = (
            {m: model.get_parameter(f"{m}.weight").detach().clone() for m in self.modules}
            if scale != 1
            else {}
        )
        merge_into(model, kept, [weights[e.label] for e in kept], create("linear"))
        names = {e.label for e in kept} | {t.name for t in self.teachers if isinstance(t, SourceTeacher)}
        chosen = min_ce(self.targets, names)
        folded, run = train_student(
            model, self.modules, self.corpus, self.targets, chosen, self.options.student
        )
        if folded is not model:
            raise MergeError("the fused student is not the model it was trained in")  # PEFT unloads in place
        with torch.no_grad():
            for module, weight in parent.items():
                current = model.get_parameter(f"{module}.weight")
                current.copy_(weight + scale * (current - weight))
        sources = []
        for index, (teacher, identity) in enumerate(zip(self.teachers, self.identities, strict=True)):
            if teacher.name not in names:
                continue
            won = sum(1 for c in chosen if c == index) / len(chosen)
            ce = self.targets[index].ce_per_byte
            sources.append(FusionSource(
                name=teacher.name, kind="expert" if isinstance(teacher, ExpertTeacher) else "source",
                domain=teacher.domain, same_tokenizer=isinstance(teacher, ExpertTeacher)
                or identity["tokenizer_sha256"] == self.identities[0]["tokenizer_sha256"],
                fusion_weight=won, cross_entropy_per_byte=sum(ce) / len(ce), **identity,
            ))  # fmt: skip
        report = FusionReport(
            sources=sources, domains=self.domains, texts=len(self.corpus), length=self.options.length,
            top_k=self.options.top_k, kd_weight=self.options.student.kd_weight, steps=run.steps,
            stopped=run.stopped, teacher_tokens=sum(t.tokens for t in self.targets),
            student_tokens=run.tokens,
            seconds=self.teacher_seconds + (time.monotonic() - started), peak_rss_bytes=_peak_rss(),
        )  # fmt: skip
        logger.info(
            "fused %s in %.1f s: student loss %.4f -> %.4f over %d steps (%s)",
            ", ".join(f"{s.name} {s.fusion_weight:.0%}" for s in sources), report.seconds, run.first_loss,
            run.last_loss, run.steps, run.stopped,
        )  # fmt: skip
        return report


def fusion_for(cfg: Any, parent: nn.Module, tokenizer: Any, experts: Sequence[Expert]) -> Fusion:
    """The :class:`Fusion` a merge config asks for (``cfg.fusion``, a :class:`FuseConfig`): the experts
    and ``--fuse-sources`` as teachers, the corpus from ``--fuse-domains`` or the teachers' domains."""
    from cogen.coordinator.merging.fusion.teachers import load_source
    from cogen.core.corpora import known_domains

    options = cfg.fusion
    sources = [load_source(p, cfg.device, cfg.cache.cache_dir) for p in options.fuse_sources]
    domains = options.fuse_domains
    if domains is None:
        named = [e.metadata.expert for e in experts] + [s.domain for s in sources if s.domain]
        domains = tuple(dict.fromkeys(d for d in named if d in known_domains()))
    unknown = [d for d in domains if d not in known_domains()]
    if unknown:
        raise MergeError(f"fusion domain {unknown[0]!r} is not a known corpus ({', '.join(known_domains())})")
    student = StudentOptions(
        steps=options.fuse_steps, batch_size=options.fuse_batch_size, lr=options.fuse_lr,
        rank=options.fuse_rank, kd_weight=options.fuse_kd_weight, budget_s=options.fuse_budget_s,
        seed=cfg.merge.seed,
    )  # fmt: skip
    fuse = FuseOptions(length=options.fuse_length, sequences=options.fuse_sequences, top_k=options.fuse_top_k,
                       student=student)  # fmt: skip
    return Fusion(parent, tokenizer, experts, sources, domains, fuse)
