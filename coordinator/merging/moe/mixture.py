"""The routed mixture itself: base + every expert's adapter in one PEFT model, each sequence run through
the adapter its router picks, and a report of where held-out sequences were routed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cogen.coordinator.merging.experts import Expert
from cogen.coordinator.merging.moe.router import Router, sequence_features
from cogen.coordinator.merging.moe.spec import MixtureError


class RoutedMixture(nn.Module):
    """Base + every expert's adapter in one PEFT model; each sequence runs the adapter its router picks.

    ``forward`` takes what a causal LM takes and returns its output (``.loss`` with ``labels``), so
    :func:`cogen.core.evaluation.validation_loss` evaluates it like any other model. Evaluation only: PEFT
    runs a batch with one adapter per row only in eval mode.
    """

    def __init__(self, model: nn.Module, router: Router) -> None:
        super().__init__()
        self.model = model
        self.router = router

    @property
    def labels(self) -> tuple[str, ...]:
        return self.router.labels

    def choose(self, input_ids: torch.Tensor) -> list[str]:
        """The label of the adapter each row of ``input_ids`` ``[n, T]`` is routed to."""
        feats = sequence_features(
            self.model, input_ids, self.router.route_tokens, batch_size=input_ids.shape[0]
        )
        with torch.no_grad():
            picks = self.router(feats.to(self.router.mean.device)).argmax(dim=-1)
        return [self.labels[int(i)] for i in picks]

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        if self.training:
            raise MixtureError("a routed mixture runs in eval mode only; call .eval() first")
        return self.model(input_ids=input_ids, adapter_names=self.choose(input_ids), **kwargs)


def build_mixture(base: nn.Module, experts: Sequence[Expert], router: Router) -> RoutedMixture:
    """Load every expert's adapter into ``base`` under its label, behind ``router``."""
    from peft import PeftModel

    if [e.label for e in experts] != list(router.labels):
        raise MixtureError(
            f"the router routes to {list(router.labels)}, the experts are {[e.label for e in experts]}"
        )
    if isinstance(base, PeftModel):
        raise MixtureError("the base model already carries adapters; pass the plain base model")
    hidden = getattr(getattr(base, "config", None), "hidden_size", None)
    if not isinstance(hidden, int) or 2 * hidden != router.linear.in_features:
        raise MixtureError(
            f"the router reads hidden size {router.linear.in_features // 2}, the base model has {hidden}; "
            "was the mixture built on this base?"
        )
    try:
        model = PeftModel.from_pretrained(base, str(experts[0].path), adapter_name=experts[0].label)
        for expert in experts[1:]:
            model.load_adapter(str(expert.path), adapter_name=expert.label)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MixtureError(f"cannot load the experts' adapters: {str(e).splitlines()[0]}") from None
    model.requires_grad_(False)
    return RoutedMixture(model, router.to(next(base.parameters()).device)).eval()


@dataclass(frozen=True)
class RoutingReport:
    """How held-out sequences were routed: ``confusion[true label][chosen label]`` counts."""

    confusion: dict[str, dict[str, int]]

    @property
    def accuracy(self) -> float:
        right = sum(row.get(label, 0) for label, row in self.confusion.items())
        total = sum(sum(row.values()) for row in self.confusion.values())
        return right / total if total else 0.0


def route(mixture: RoutedMixture, blocks: Mapping[str, torch.Tensor]) -> RoutingReport:
    """Route each label's ``[n, T]`` blocks and count where they went (the label is the right answer)."""
    confusion = {}
    for label, rows in blocks.items():
        if label not in mixture.labels:
            raise MixtureError(f"no expert labelled {label!r}; the mixture has {list(mixture.labels)}")
        counts = dict.fromkeys(mixture.labels, 0)
        for chosen in mixture.choose(rows):
            counts[chosen] += 1
        confusion[label] = counts
    return RoutingReport(confusion)
