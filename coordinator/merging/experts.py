"""Expert checkpoints on disk: find, verify, check compatibility, and stream their dense deltas.

An expert is a cogen adapter checkpoint (:mod:`cogen.core.checkpoint`): PEFT LoRA safetensors plus
``adapter_config.json`` and ``cogen.json``. :func:`load_experts` verifies every file's sha256 and checks
that the experts share a base model and adapt the same modules; :func:`iter_deltas` then yields, one
module at a time, each expert's ``ΔW = B @ A · scale`` in fp32, reading the tensors lazily from the
safetensors files, so memory holds about one module's deltas per expert.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cogen.coordinator.merging.registry import MergeError
from cogen.core.checkpoint import ADAPTER_WEIGHTS, AdapterMetadata, CheckpointError, read_metadata

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class Expert:
    """One verified expert checkpoint."""

    label: str  #: unique name in this merge: the expert's domain, suffixed ``-2``, ``-3`` on repeats
    path: Path  #: the checkpoint directory
    metadata: AdapterMetadata
    sha256: str  #: of its ``adapter_model.safetensors``
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    modules: tuple[str, ...]  #: names of the adapted modules in the base model, sorted

    def scale(self, rank: int) -> float:
        """PEFT's LoRA scaling for a module of rank ``rank``: ``alpha / r`` (rsLoRA: ``alpha / √r``)."""
        return self.lora_alpha / (rank**0.5 if self.use_rslora else rank)


def resolve_checkpoint(path: Path) -> Path:
    """A node's output directory (its ``latest`` checkpoint) or a checkpoint directory itself."""
    path = Path(path)
    if (path / "latest").exists():
        return (path / "latest").resolve()
    if (path / ADAPTER_WEIGHTS).is_file() or (path / "cogen.json").is_file():
        return path
    if not path.exists():
        raise MergeError(f"expert directory {path} does not exist")
    raise MergeError(f"{path} holds neither a `latest` link nor an adapter checkpoint")


def _adapter_config(ckpt: Path) -> dict[str, Any]:
    try:
        config = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise MergeError(f"cannot read {ckpt / ADAPTER_CONFIG}: {e}") from None
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{ckpt}: only LoRA adapters can be merged, not {config.get('peft_type')!r}")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "bias": config.get("bias", "none") != "none",
    }
    if any(unsupported.values()):
        raise MergeError(
            f"{ckpt}: unsupported adapter options: {', '.join(k for k, v in unsupported.items() if v)}"
        )
    return config


def _adapted_modules(weights: Path) -> tuple[str, ...]:
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
    modules = sorted(k[len(_PREFIX) : -len(_A)] for k in keys if k.startswith(_PREFIX) and k.endswith(_A))
    expected = {f"{_PREFIX}{m}{s}" for m in modules for s in (_A, _B)}
    if set(keys) != expected:
        strange = sorted(set(keys) ^ expected)[0]
        raise MergeError(f"{weights}: unexpected or unpaired adapter tensor {strange!r}")
    if not modules:
        raise MergeError(f"{weights} holds no LoRA weights")
    return tuple(modules)


def load_expert(path: Path, label: str | None = None) -> Expert:
    """Find and verify (sha256 of every file) the checkpoint at ``path``."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = read_metadata(ckpt, verify=True)
    except CheckpointError as e:
        raise MergeError(str(e)) from None
    config = _adapter_config(ckpt)
    return Expert(
        label=label or meta.expert,
        path=ckpt,
        metadata=meta,
        sha256=meta.files[ADAPTER_WEIGHTS],
        lora_alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        modules=_adapted_modules(ckpt / ADAPTER_WEIGHTS),
    )


def _unique_labels(names: list[str]) -> list[str]:
    labels = []
    for i, name in enumerate(names):
        repeat = names[:i].count(name)
        labels.append(name if repeat == 0 else f"{name}-{repeat + 1}")
    return labels


def load_experts(paths: list[Path] | tuple[Path, ...]) -> list[Expert]:
    """Load and verify every expert; refuse experts with different base models or adapted modules."""
    if not paths:
        raise MergeError("no experts to merge")
    experts = [load_expert(p) for p in paths]
    labels = _unique_labels([e.metadata.expert for e in experts])
    experts = [dataclasses.replace(e, label=label) for e, label in zip(experts, labels, strict=True)]
    first = experts[0]
    for other in experts[1:]:
        if other.metadata.base_model != first.metadata.base_model:
            raise MergeError(
                f"experts have different base models: {first.path} was trained on "
                f"{first.metadata.base_model!r}, {other.path} on {other.metadata.base_model!r}"
            )
        if other.modules != first.modules:
            odd = sorted(set(other.modules) ^ set(first.modules))
            raise MergeError(
                f"experts adapt different modules: {first.path} and {other.path} differ on {odd[0]!r}"
                + (f" and {len(odd) - 1} more" if len(odd) > 1 else "")
            )
    return experts


def dense_delta(handle: Any, expert: Expert, module: str) -> torch.Tensor:
    """``B @ A · scale`` of ``module`` in fp32 from an open safetensors ``handle`` (PEFT's delta weight)."""
    lora_a = handle.get_tensor(f"{_PREFIX}{module}{_A}").to(torch.float32)
    lora_b = handle.get_tensor(f"{_PREFIX}{module}{_B}").to(torch.float32)
    delta = (lora_b @ lora_a) * expert.scale(lora_a.shape[0])
    return delta.T if expert.fan_in_fan_out else delta


def iter_deltas(experts: list[Expert]) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Yield ``(module, [ΔW of each expert])`` for every adapted module, one module at a time."""
    with contextlib.ExitStack() as stack:
        handles = [
            stack.enter_context(safe_open(str(e.path / ADAPTER_WEIGHTS), framework="pt")) for e in experts
        ]
        for module in experts[0].modules:
            yield module, [dense_delta(h, e, module) for h, e in zip(handles, experts, strict=True)]
