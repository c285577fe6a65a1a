"""The merge-method registry: a :class:`MergeMethod` ABC and an explicit name -> class table.

A method merges, one LoRA-targeted module at a time, the experts' dense deltas (``ΔW = B @ A · scale``,
fp32) into one delta that is added to the base weight. The base weight is passed too, for methods that
need it; the built-in ones (``linear``, ``ties``, ``dare``, ``dare_ties``) wrap PEFT's
``peft.utils.merge_utils`` and do not look at it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from cogen.core.exit_codes import CommandError, ExitCode


class MergeError(ValueError, CommandError):
    """Experts cannot be merged as asked (one-line explanation)."""

    exit_code = ExitCode.DATA
    what = "merge"


class UnknownMethodError(MergeError):
    """A merge method name that is not registered."""

    exit_code = ExitCode.CONFIG
    what = "bad configuration"


@dataclass(frozen=True)
class MergeParams:
    """What a method may be tuned with; methods ignore what they do not use."""

    density: float = 0.5  #: fraction of each delta kept by trimming (ties) or random drops (dare)
    seed: int = 0  #: seed of random drops; each module draws from its own seed, see :func:`module_seed`
    majority_sign: Literal["total", "frequency"] = "total"  #: sign election of ties / dare_ties


class MergeMethod(ABC):
    """Merge the experts' deltas of one module. Subclasses set :attr:`name` and implement :meth:`merge`."""

    name: ClassVar[str]

    def __init__(self, params: MergeParams | None = None) -> None:
        self.params = params or MergeParams()
        if not 0 < self.params.density <= 1:
            raise MergeError(f"density must be in (0, 1], got {self.params.density}")

    @abstractmethod
    def merge(
        self, module: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        """The merged delta of ``module`` (same shape as ``base``), from one delta per expert.

        ``weights`` (1-D, one per delta, non-negative, not all zero) are the experts' relative
        weights; each method says how it normalises them.
        """

    def describe(self) -> dict[str, float | int | str]:
        """The parameters that shaped the result, for the manifest."""
        return {}


_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(name: str, cls: type[MergeMethod]) -> None:
    """Register ``cls`` under ``name``; a name is registered once."""
    if name in _REGISTRY:
        raise MergeError(f"merge method {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls


def known() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[MergeMethod]:
    """The method class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown merge method {name!r}; known: {', '.join(known())}") from None


def create(name: str, params: MergeParams | None = None) -> MergeMethod:
    """An instance of the method registered under ``name``."""
    return get(name)(params)


def sum_to_one(weights: torch.Tensor) -> torch.Tensor:
    """Weights rescaled to sum to 1: a weighted average (task arithmetic with Σλ = 1)."""
    return weights / weights.sum()
