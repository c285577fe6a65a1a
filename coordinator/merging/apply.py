"""Applying a merge to a model: each adapted module's merged delta added to the base weights."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from cogen.coordinator.merging.experts import Expert, iter_deltas
from cogen.coordinator.merging.registry import MergeError, MergeMethod

logger = logging.getLogger(__name__)

__all__ = ["merge_into", "untie_output"]


def untie_output(model: nn.Module, modules: Sequence[str]) -> None:
    """Give the output projection its own weight when it is tied to the input embeddings and adapted.

    An adapter on a tied ``lm_head`` changes only the output projection; adding its delta to the shared
    tensor would also change every input embedding, so the dense merge would not be the model its
    experts were evaluated as. The merged model is saved untied (``tie_word_embeddings`` false)."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out = get_out() if get_out is not None else None
    inp = get_in() if get_in is not None else None
    if out is None or inp is None or out.weight is not inp.weight:
        return
    if not any(model.get_submodule(m) is out for m in modules):
        return
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text.tie_word_embeddings = False
    logger.info("the adapted output projection is untied from the input embeddings for the merge")


def merge_into(
    model: nn.Module, experts: list[Expert], weights: list[float], method: MergeMethod, scale: float = 1.0
) -> None:
    """Add the merged delta of every adapted module (times ``scale``) to ``model``'s weights, one module
    at a time."""
    modules = experts[0].modules
    w = torch.tensor(weights, dtype=torch.float32)
    untie_output(model, modules)
    for module, deltas in tqdm(iter_deltas(experts), total=len(modules), desc="merging", disable=None):
        try:
            param = model.get_parameter(f"{module}.weight")
        except AttributeError:
            raise MergeError(
                f"the base model has no {module}.weight; were the experts trained on it?"
            ) from None
        if param.shape != deltas[0].shape:
            raise MergeError(
                f"{module}: the experts' delta has shape {tuple(deltas[0].shape)}, the base weight "
                f"{tuple(param.shape)}; were the experts trained on this base?"
            )
        merged = method.merge(
            module, param.detach(), [d.to(param.device) for d in deltas], w.to(param.device)
        )
        if not torch.isfinite(merged).all():
            raise MergeError(f"{module}: the merged delta holds NaN or Inf; nothing was published")
        with torch.no_grad():
            param.add_((merged * scale).to(param.dtype))
