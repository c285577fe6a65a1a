"""Arrow: a zero-shot, per-token router over the experts' LoRA adapters, beside the trained one.

PEFT's Arrow (``peft.create_arrow_model``, arXiv 2405.11157) gives each adapted layer one prototype
per expert, the top right singular vector of that expert's ``ΔW = B @ A`` there, and routes every
token in every layer to the ``top_k`` experts whose prototypes it is most aligned with (``|x · v|``),
mixing their deltas with a softmax over those scores at ``temperature``. Nothing is trained: the
prototypes come from the weights alone, so a mixture costs no data and no router passes, and a token
can use different experts in different layers. cogen's trained router (:mod:`.router`) picks one
expert per *sequence* from its first tokens instead; ``bench/merging/quality.py`` compares the two.

PEFT names the adapters ``task_0``, ``task_1``, ... in the order given; :class:`ArrowMixture` keeps the
experts' labels in that order. The power iteration behind the prototypes is seeded (``seed``), so
the same experts give the same mixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cogen.coordinator.merging.experts import Expert
from cogen.coordinator.merging.moe.spec import MixtureError

ARROW = "arrow"  #: the routing a mixture spec records for an Arrow mixture


@dataclass(frozen=True)
class ArrowOptions:
    """How Arrow mixes: experts per token per layer, softmax temperature, power-iteration seed."""

    top_k: int = 3
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise MixtureError(f"arrow top_k must be at least 1, got {self.top_k}")
        if not self.temperature > 0:
            raise MixtureError(f"arrow temperature must be positive, got {self.temperature}")


class ArrowMixture(nn.Module):
    """Base + every expert's adapter behind PEFT's Arrow router; evaluates like a causal LM."""

    def __init__(self, model: nn.Module, labels: Sequence[str], options: ArrowOptions) -> None:
        super().__init__()
        self.model = model
        self.labels = tuple(labels)
        self.options = options

    @property
    def top_k(self) -> int:
        """Experts mixed per token: ``options.top_k``, at most the number of experts."""
        return min(self.options.top_k, len(self.labels))

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        if self.training:
            raise MixtureError("an Arrow mixture runs in eval mode only; call .eval() first")
        return self.model(input_ids=input_ids, **kwargs)


def build_arrow(base: nn.Module, experts: Sequence[Expert], options: ArrowOptions) -> ArrowMixture:
    """Load every expert's adapter into ``base`` (modified) behind an Arrow router.

    The experts must adapt the same modules with the same rank (Arrow stacks their ``A`` and ``B``);
    ``options.top_k`` above the number of experts mixes them all.
    """
    from peft import ArrowConfig, PeftModel, create_arrow_model
    from transformers import PreTrainedModel

    if not experts:
        raise MixtureError("an Arrow mixture needs at least one expert")
    if isinstance(base, PeftModel):
        raise MixtureError("the base model already carries adapters; pass the plain base model")
    if not isinstance(base, PreTrainedModel):
        raise MixtureError(f"an Arrow mixture is built on a transformers model, not a {type(base).__name__}")
    top_k = min(options.top_k, len(experts))
    config = ArrowConfig(top_k=top_k, router_temperature=options.temperature, rng_seed=options.seed)
    try:
        model = create_arrow_model(base, [str(e.path) for e in experts], config)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MixtureError(f"cannot build an Arrow mixture of these experts: {first}") from None
    model.requires_grad_(False)
    return ArrowMixture(model, [e.label for e in experts], options).eval()
