"""Saving and loading a mixture directory: router weights (a trained router; an Arrow mixture has
none), copies of the experts and ``mixture.json``, written atomically
(:func:`cogen.core.atomic.write_dir_atomic`) and verified file by file on load."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cogen.coordinator.merging.experts import Expert, load_experts
from cogen.coordinator.merging.moe.arrow import ARROW, ArrowMixture, ArrowOptions, build_arrow
from cogen.coordinator.merging.moe.mixture import RoutedMixture, build_mixture
from cogen.coordinator.merging.moe.router import Router
from cogen.coordinator.merging.moe.spec import (
    ROUTER_FILE,
    ROUTER_KEYS,
    SPEC_FILE,
    ArrowSpec,
    MixtureError,
    MixtureExpert,
    MixtureSpec,
)
from cogen.core.atomic import write_dir_atomic
from cogen.core.checkpoint import METADATA_FILE
from cogen.protocols.hashing import sha256_tree


def save_mixture(
    out_dir: Path, experts: Sequence[Expert], router: Router | ArrowOptions, hidden_size: int | None = None
) -> Path:
    """Write the mixture (router, copies of the experts, ``mixture.json``) to ``out_dir`` atomically.

    ``router`` is a trained :class:`Router` or, for an Arrow mixture, its :class:`ArrowOptions` (then
    ``hidden_size`` names the base model's, which the trained router's shape otherwise gives)."""
    if isinstance(router, Router) and [e.label for e in experts] != list(router.labels):
        raise MixtureError(
            f"the router routes to {list(router.labels)}, the experts are {[e.label for e in experts]}"
        )
    if isinstance(router, ArrowOptions) and not hidden_size:
        raise MixtureError("an Arrow mixture is saved with the base model's hidden size")

    def write(tmp: Path) -> None:
        if isinstance(router, Router):
            save_file(router.state(), str(tmp / ROUTER_FILE))
            routing: dict[str, object] = {
                "route_tokens": router.route_tokens, "hidden_size": router.linear.in_features // 2,
            }  # fmt: skip
        else:
            arrow = ArrowSpec(top_k=router.top_k, temperature=router.temperature, seed=router.seed)
            routing = {"routing": ARROW, "arrow": arrow, "hidden_size": hidden_size}
        entries = []
        for expert in experts:
            rel = f"experts/{expert.label}"
            (tmp / rel).mkdir(parents=True)
            for name in [*expert.metadata.files, METADATA_FILE]:
                shutil.copyfile(expert.path / name, tmp / rel / name)
            entries.append(
                MixtureExpert(
                    label=expert.label, expert=expert.metadata.expert, sha256=expert.sha256, path=rel
                )
            )
        base = experts[0].metadata.base_model
        spec = MixtureSpec.model_validate(
            {"base_model": base, **routing, "experts": entries, "files": _hashes(tmp)}
        )
        (tmp / SPEC_FILE).write_text(spec.model_dump_json(indent=2))

    return write_dir_atomic(Path(out_dir), write, replace=True)


def _hashes(directory: Path) -> dict[str, str]:
    return sha256_tree(directory, exclude={SPEC_FILE})


def read_spec(directory: Path) -> MixtureSpec:
    """Parse ``mixture.json`` and check every file of the directory against its sha256."""
    directory = Path(directory)
    path = directory / SPEC_FILE
    if not directory.is_dir():
        raise MixtureError(f"mixture directory {directory} does not exist")
    try:
        spec = MixtureSpec.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise MixtureError(f"{directory} is not a mixture directory (no {SPEC_FILE})") from None
    except ValidationError as e:
        first = e.errors()[0]
        raise MixtureError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except OSError as e:
        raise MixtureError(f"cannot read {path}: {e}") from None
    on_disk = _hashes(directory)
    for name in sorted(set(spec.files) | set(on_disk)):
        if name not in spec.files:
            raise MixtureError(f"{directory / name} is not listed in {SPEC_FILE}; refusing a changed mixture")
        if on_disk.get(name) != spec.files[name]:
            raise MixtureError(f"{directory / name} is missing or does not match its sha256 in {SPEC_FILE}")
    if spec.routing == "sequence" and ROUTER_FILE not in spec.files:
        raise MixtureError(f"{path} lists no {ROUTER_FILE}")
    return spec


def _load_router(directory: Path, spec: MixtureSpec) -> Router:
    try:
        tensors = load_file(str(directory / ROUTER_FILE))
    except (OSError, SafetensorError) as e:
        raise MixtureError(f"cannot read {directory / ROUTER_FILE}: {e}") from None
    n, h = len(spec.experts), 2 * spec.hidden_size
    shapes = {"weight": (n, h), "bias": (n,), "mean": (h,), "std": (h,)}
    for key in ROUTER_KEYS:
        if key not in tensors or tuple(tensors[key].shape) != shapes[key]:
            found = tuple(tensors[key].shape) if key in tensors else "nothing"
            raise MixtureError(
                f"{directory / ROUTER_FILE}: {key!r} should have shape {shapes[key]} for {n} experts "
                f"of hidden size {spec.hidden_size}, found {found}"
            )
    assert spec.route_tokens is not None  # the spec's validator: sequence routing names it
    router = Router([e.label for e in spec.experts], h, spec.route_tokens)
    with torch.no_grad():
        router.linear.weight.copy_(tensors["weight"])
        router.linear.bias.copy_(tensors["bias"])
        router.mean.copy_(tensors["mean"])
        router.std.copy_(tensors["std"])
    router.requires_grad_(False)
    return router.eval()


def load_mixture(base_model: nn.Module, directory: Path) -> RoutedMixture | ArrowMixture:
    """Verify a mixture directory and build its mixture on ``base_model`` (modified): a
    :class:`RoutedMixture` behind its trained router, or an :class:`ArrowMixture`."""
    directory = Path(directory)
    spec = read_spec(directory)
    experts = load_experts([directory / e.path for e in spec.experts])
    for expert, entry in zip(experts, spec.experts, strict=True):
        if expert.sha256 != entry.sha256 or expert.metadata.expert != entry.expert:
            raise MixtureError(
                f"{expert.path} holds expert {expert.metadata.expert!r} with adapter {expert.sha256[:12]}, "
                f"{SPEC_FILE} names {entry.expert!r} with {entry.sha256[:12]}"
            )
    experts = [dataclasses.replace(x, label=e.label) for x, e in zip(experts, spec.experts, strict=True)]
    if spec.arrow is not None:
        hidden = getattr(getattr(base_model, "config", None), "hidden_size", None)
        if hidden != spec.hidden_size:
            raise MixtureError(
                f"the mixture was built on hidden size {spec.hidden_size}, the base model has {hidden}; "
                "was the mixture built on this base?"
            )
        options = ArrowOptions(spec.arrow.top_k, spec.arrow.temperature, spec.arrow.seed)
        return build_arrow(base_model, experts, options)
    return build_mixture(base_model, experts, _load_router(directory, spec))
