"""Recompute a published generation's dense merge from its manifest and check it against the weights.

A member need not trust the coordinator's arithmetic: the signed manifest names the parent base (with
the sha256 of its weight files), every expert (with the sha256 of its adapter weights), the method,
its parameters (density, seed, sign election), each expert's weight and, where the publishing gate
halved the merged delta, that scale (its passing attempt). :func:`recompute` loads that
parent (checking its hashes), the given expert checkpoints (matched to the manifest's experts by hash),
runs the same merge in the manifest's order (:func:`cogen.coordinator.merging.merge.merge_into`) and
compares every published tensor with the recomputed one: bit for bit where the manifest's
``reproduction.platform`` is this one's, else within its ``tolerance`` (:mod:`.reproduce`). A
mismatch names the first tensor that differs; an expert whose checkpoint is not the one the manifest
names is reported and, where it can be told by its domain, still used, so that the report also says
which weights it would have changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from cogen.coordinator.merging.experts import Expert, load_expert
from cogen.coordinator.merging.fusion.fuse import FUSE
from cogen.coordinator.merging.merge import load_base_fp32, merge_into
from cogen.coordinator.merging.registry import MergeError, MergeParams, create
from cogen.coordinator.merging.reproduce import platform_of
from cogen.core import models
from cogen.core.exit_codes import CommandError, ExitCode
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import ExpertEntry, Manifest, verify_manifest

logger = logging.getLogger(__name__)


class RecomputeError(RuntimeError, CommandError):
    """The published weights are not what the manifest's merge gives, or it cannot be recomputed."""

    exit_code = ExitCode.DATA
    what = "verify"


@dataclass
class Recomputed:
    """What a recomputation found."""

    generation: int
    tensors: int = 0  #: published tensors compared
    exact: bool = True  #: every tensor bit-identical
    max_deviation: float = 0.0  #: the largest |recomputed - published| / max |published| of a tensor
    problems: list[str] = field(default_factory=list)  #: what did not hold, first the first


def _params(manifest: Manifest) -> MergeParams:
    raw = manifest.params
    density, seed, sign = raw.get("density", 0.5), raw.get("seed", 0), raw.get("majority_sign", "total")
    if (
        not isinstance(density, float | int)
        or not isinstance(seed, int)
        or sign not in ("total", "frequency")
    ):
        raise RecomputeError(f"the manifest's method parameters {raw} are not ones cogen merges with")
    return MergeParams(density=float(density), seed=seed, majority_sign=sign)  # type: ignore[arg-type]


def _parent(manifest: Manifest, parent: Path | None, cache_dir: Path | None) -> str:
    """The parent base's directory, checked against the weight-file hashes the manifest records."""
    path = str(parent) if parent is not None else models.resolve_model(manifest.parent.model, cache_dir)
    for name, digest in manifest.parent.files.items():
        file = Path(path) / name
        if not file.is_file():
            raise RecomputeError(f"the parent base {path} has no {name}; give the parent with --parent DIR")
        if sha256_file(file) != digest:
            raise RecomputeError(f"{file} is not the parent the manifest names (sha256 differs)")
    return path


def _match(entries: list[ExpertEntry], paths: Sequence[Path], found: Recomputed) -> list[Expert]:
    """For each kept entry, the given checkpoint with its sha256 (else the one of its domain, reported)."""
    given = [load_expert(p) for p in paths]
    by_hash = {e.sha256: e for e in given}
    chosen = []
    for entry in entries:
        expert = by_hash.get(entry.sha256)
        if expert is None:
            same_domain = [e for e in given if e.metadata.expert == entry.expert]
            if len(same_domain) != 1:
                raise RecomputeError(
                    f"no checkpoint given for expert {entry.name} (adapter sha256 {entry.sha256[:12]}…)"
                )
            expert = same_domain[0]
            found.problems.append(
                f"expert {entry.name}: {expert.path} is not the checkpoint the manifest names "
                f"(adapter sha256 {expert.sha256[:12]}…, manifest {entry.sha256[:12]}…)"
            )
        chosen.append(expert)
    return chosen


def _published_tensors(gen_dir: Path) -> list[Path]:
    files = sorted(gen_dir.glob("*.safetensors"))
    if not files:
        raise RecomputeError(f"{gen_dir} holds no weight files (*.safetensors)")
    return files


def _compare(model: torch.nn.Module, gen_dir: Path, exact: bool, tolerance: float, found: Recomputed) -> None:
    state = model.state_dict()
    names: list[str] = []
    for file in _published_tensors(gen_dir):
        with safe_open(str(file), framework="pt") as handle:
            names.extend(handle.keys())
    stored = {state[n].data_ptr() for n in names if n in state}
    missing = [n for n, t in state.items() if n not in names and t.data_ptr() not in stored]
    if missing:  # loading would initialise it at random: not the model the merge made
        found.problems.append(f"{missing[0]} is not published (and not tied to a tensor that is)")
        return
    for file in _published_tensors(gen_dir):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                if name not in state:
                    found.problems.append(f"{file.name}: {name} is not a tensor of the parent's model")
                    return
                published = handle.get_tensor(name)
                mine = state[name].detach().to("cpu")
                found.tensors += 1
                if published.shape != mine.shape:
                    found.problems.append(f"{name}: published shape {tuple(published.shape)}, recomputed "
                                          f"{tuple(mine.shape)}")  # fmt: skip
                    return
                if torch.equal(published, mine.to(published.dtype)):
                    continue
                found.exact = False
                scale = published.abs().max().item() or 1.0
                deviation = (published.float() - mine.float()).abs().max().item() / scale
                found.max_deviation = max(found.max_deviation, deviation)
                if exact or not deviation <= tolerance:
                    expected = (
                        "bit-identical expected on this platform" if exact else f"tolerance {tolerance:g}"
                    )
                    found.problems.append(
                        f"{name} differs: max |recomputed - published| is {deviation:.3g} of its largest "
                        f"value ({expected})"
                    )
                    return


def recompute(
    gen_dir: Path,
    experts: Sequence[Path],
    *,
    parent: Path | None = None,
    trusted_key: str | None = None,
    cache_dir: Path | None = None,
) -> Recomputed:
    """Re-run ``gen_dir``'s dense merge from its verified manifest and the given expert checkpoints."""
    gen_dir = Path(gen_dir)
    manifest = verify_manifest(gen_dir, trusted_key)
    found = Recomputed(manifest.generation)
    if manifest.reproduction is None:
        raise RecomputeError(
            f"{gen_dir} is a version {manifest.manifest_version} manifest: it does not say how its merge "
            "can be recomputed (version 3 does)"
        )
    if manifest.method == FUSE:
        raise RecomputeError(
            f"generation {manifest.generation} was fused: its weights are a student trained on its teachers' "
            "targets, not a merge that can be recomputed; the signed manifest names each teacher and its hash"
        )
    try:
        method = create(manifest.method, _params(manifest))
    except MergeError as e:
        raise RecomputeError(str(e)) from None
    kept = [e for e in manifest.experts if e.weight > 0]
    chosen = _match(kept, experts, found)
    device = torch.device("cpu")
    exact = manifest.reproduction.platform == platform_of(device)
    logger.info(
        "recomputing generation %d: %s of %s into %s (%s)", manifest.generation, manifest.method,
        ", ".join(e.name for e in kept), manifest.parent.model,
        "bit-identical expected" if exact else f"merged on {manifest.reproduction.platform}: tolerance "
        f"{manifest.reproduction.tolerance:g}",
    )  # fmt: skip
    model = load_base_fp32(_parent(manifest, parent, cache_dir), device)
    # the publishing gate's chosen candidate may have halved the merged delta (manifest version 4)
    scale = manifest.gate.attempts[-1].scale if manifest.gate is not None and manifest.gate.passed else 1.0
    merge_into(model, chosen, [e.weight for e in kept], method, scale=scale)
    _compare(model, gen_dir, exact, manifest.reproduction.tolerance, found)
    return found
