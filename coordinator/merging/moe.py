"""``moe``: the experts' LoRA adapters side by side behind a learned per-sequence router.

Weight merges (``linear``, ``ties``, ``dare``) fold every expert into one dense delta and lose part of
each expert on its own domain. The routed mixture keeps them apart: one PEFT model holds the base and
every expert's adapter under its label, and a small router picks, for each sequence, the adapter of
the domain the sequence looks like (in the spirit of Branch-Train-MiX, at sequence level).

The router is a linear gate (multinomial logistic regression, trained with torch) over the base
model's input embeddings and last hidden state (adapters off), each mean-pooled over a sequence's
first ``route_tokens`` tokens and standardised with the training set's mean and spread. It learns
from windows of each domain's *training* split (:func:`training_blocks`), never its validation
blocks. A choice made from a sequence's own tokens scores them with foreknowledge, but little: the
causal, equal-prior Bayesian mixture of the same ``E`` experts is at most ``log E`` nats per sequence
worse than the best single expert, so the advantage is at most ``log(E) / T`` nats per token of a
``T``-token sequence (0.009 for 3 experts and 128 tokens), whatever ``route_tokens`` is.

PEFT's X-LoRA (a learned per-token soft gate) was tried first, on CPU with PEFT 0.21: it loads the
experts only when they are named ``"0"``, ``"1"``, ... (other names fail with a ``KeyError`` in
``disable_adapter_layers``), its gate is trained through the language-model loss of two full passes
per step, and every token runs every adapter; the per-sequence gate here needs only base forward
passes on a few hundred windows to train and runs one adapter per sequence.

A mixture directory is self-contained, every file hashed in ``mixture.json``::

    mixture.json                      (MixtureSpec: experts by label and adapter sha256, file hashes)
    router.safetensors                (weight [E, 2H], bias [E], mean [2H], std [2H]; H: hidden size)
    experts/<label>/adapter_model.safetensors, adapter_config.json, cogen.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cogen.coordinator.merging.experts import Expert, load_experts
from cogen.coordinator.merging.registry import MergeError
from cogen.core.checkpoint import METADATA_FILE, fsync_dir
from cogen.core.corpora import get_corpus
from cogen.core.data import train_batches
from cogen.protocols.manifest import sha256_file

NAME = "moe"  #: the method name a manifest records for a routed mixture
SPEC_FILE = "mixture.json"
ROUTER_FILE = "router.safetensors"
SPEC_VERSION = 1
_ROUTER_KEYS = ("weight", "bias", "mean", "std")


class MixtureError(MergeError):
    """A mixture cannot be built, saved or loaded as asked (one-line explanation)."""


class MixtureExpert(BaseModel):
    """One expert of a mixture: its label (adapter name), domain, adapter sha256 and directory."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    label: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    expert: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of its adapter_model.safetensors")
    path: str = Field(description="its checkpoint directory, relative to the mixture directory")


class MixtureSpec(BaseModel):
    """``mixture.json``: what a mixture directory holds, with the sha256 of every other file in it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    spec_version: int = SPEC_VERSION
    method: Literal["moe"] = "moe"
    base_model: str = Field(description="the model name the experts were trained on")
    routing: Literal["sequence"] = "sequence"
    route_tokens: int = Field(ge=1, description="tokens at the start of a sequence the router reads")
    hidden_size: int = Field(ge=1)
    experts: list[MixtureExpert] = Field(min_length=1)
    files: dict[str, str] = Field(description="every other file in the directory -> sha256")


class Router(nn.Module):
    """A linear gate over standardised features; :attr:`labels` names its outputs, in order."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, labels: Sequence[str], features: int, route_tokens: int) -> None:
        super().__init__()
        if route_tokens < 1:
            raise MixtureError(f"route_tokens must be at least 1, got {route_tokens}")
        self.labels = tuple(labels)
        self.route_tokens = route_tokens
        self.linear = nn.Linear(features, len(self.labels))
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, experts]`` from features ``[n, hidden]``."""
        return self.linear((features - self.mean) / self.std)

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {"weight": self.linear.weight, "bias": self.linear.bias, "mean": self.mean, "std": self.std}
        return {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}


def _adapters_off(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


@torch.no_grad()
def sequence_features(
    model: nn.Module, input_ids: torch.Tensor, route_tokens: int, batch_size: int = 16
) -> torch.Tensor:
    """The base model's (adapters off) input embeddings and last hidden state, each mean-pooled over a
    row's first ``route_tokens`` tokens, side by side: ``[n, 2 * hidden]`` (what the words are, and
    what the model makes of them)."""
    device = next(p.device for p in model.parameters())
    prefix = input_ids[:, :route_tokens]
    out = []
    with _adapters_off(model):
        for start in range(0, prefix.shape[0], batch_size):
            batch = prefix[start : start + batch_size].to(device)
            states = model(input_ids=batch, output_hidden_states=True).hidden_states
            out.append(torch.cat([states[0].float().mean(dim=1), states[-1].float().mean(dim=1)], -1).cpu())
    return torch.cat(out)


def training_blocks(
    domains: Sequence[str], tokenizer: Any, block_size: int, max_blocks: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``max_blocks`` blocks of each domain's *training* split (the router never sees validation text)."""
    blocks = {}
    for domain in domains:
        try:
            stream = train_batches(
                get_corpus(domain), tokenizer, block_size=block_size, batch_size=max_blocks, shard=0,
                num_shards=1, seed=seed,
            )  # fmt: skip
            blocks[domain] = next(stream)
        except ValueError as e:
            raise MixtureError(f"no router training data for {domain!r}: {e}") from None
    return blocks


def _windows(blocks: torch.Tensor, route_tokens: int) -> torch.Tensor:
    """Cut ``[n, T]`` blocks into ``[n * (T // N), N]`` windows: more, varied training rows."""
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise MixtureError(f"expected non-empty [n, T] token blocks, got shape {tuple(blocks.shape)}")
    per_row = max(1, blocks.shape[1] // route_tokens)
    return blocks[:, : per_row * route_tokens].reshape(-1, min(route_tokens, blocks.shape[1]))


def train_router(
    base: nn.Module,
    examples: Mapping[str, torch.Tensor],
    *,
    route_tokens: int = 64,
    l2: float = 1e-3,
) -> Router:
    """Fit a router that sends each label's ``examples`` (``[n, T]`` training token blocks) to it.

    Multinomial logistic regression with an L2 penalty ``l2 · ‖W‖²`` on standardised features, solved
    with L-BFGS: deterministic, and a few hundred rows fit in a second.
    """
    if len(examples) < 2:
        raise MixtureError(f"a router needs at least 2 experts, got {len(examples)}")
    labels = list(examples)
    feats, targets = [], []
    for index, label in enumerate(labels):
        rows = sequence_features(base, _windows(examples[label], route_tokens), route_tokens)
        feats.append(rows)
        targets.append(torch.full((rows.shape[0],), index, dtype=torch.long))
    x, y = torch.cat(feats), torch.cat(targets)
    router = Router(labels, x.shape[1], route_tokens)
    router.mean.copy_(x.mean(dim=0))
    router.std.copy_(x.std(dim=0).clamp_min(1e-6))
    nn.init.zeros_(router.linear.weight)
    nn.init.zeros_(router.linear.bias)
    optimizer = torch.optim.LBFGS(router.linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(router(x), y) + l2 * router.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    router.requires_grad_(False)
    return router.eval()


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

    def per_label(self) -> dict[str, float]:
        return {label: row.get(label, 0) / max(1, sum(row.values())) for label, row in self.confusion.items()}


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


def save_mixture(out_dir: Path, experts: Sequence[Expert], router: Router) -> Path:
    """Write the mixture (router, copies of the experts, ``mixture.json``) to ``out_dir`` atomically."""
    if [e.label for e in experts] != list(router.labels):
        raise MixtureError(
            f"the router routes to {list(router.labels)}, the experts are {[e.label for e in experts]}"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        save_file(router.state(), str(tmp / ROUTER_FILE))
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
        spec = MixtureSpec(
            base_model=experts[0].metadata.base_model, route_tokens=router.route_tokens,
            hidden_size=router.linear.in_features // 2, experts=entries, files=_hashes(tmp),
        )  # fmt: skip
        (tmp / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _hashes(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != SPEC_FILE
    }


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
    if ROUTER_FILE not in spec.files:
        raise MixtureError(f"{path} lists no {ROUTER_FILE}")
    return spec


def _load_router(directory: Path, spec: MixtureSpec) -> Router:
    try:
        tensors = load_file(str(directory / ROUTER_FILE))
    except (OSError, SafetensorError) as e:
        raise MixtureError(f"cannot read {directory / ROUTER_FILE}: {e}") from None
    n, h = len(spec.experts), 2 * spec.hidden_size
    shapes = {"weight": (n, h), "bias": (n,), "mean": (h,), "std": (h,)}
    for key in _ROUTER_KEYS:
        if key not in tensors or tuple(tensors[key].shape) != shapes[key]:
            found = tuple(tensors[key].shape) if key in tensors else "nothing"
            raise MixtureError(
                f"{directory / ROUTER_FILE}: {key!r} should have shape {shapes[key]} for {n} experts "
                f"of hidden size {spec.hidden_size}, found {found}"
            )
    router = Router([e.label for e in spec.experts], h, spec.route_tokens)
    with torch.no_grad():
        router.linear.weight.copy_(tensors["weight"])
        router.linear.bias.copy_(tensors["bias"])
        router.mean.copy_(tensors["mean"])
        router.std.copy_(tensors["std"])
    router.requires_grad_(False)
    return router.eval()


def load_mixture(base_model: nn.Module, directory: Path) -> RoutedMixture:
    """Verify a mixture directory and build its :class:`RoutedMixture` on ``base_model`` (modified)."""
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
    return build_mixture(base_model, experts, _load_router(directory, spec))


def describe(router: Router) -> dict[str, float | int | str]:
    """The parameters that shaped a mixture, for a manifest's ``params``."""
    return {"routing": "sequence", "route_tokens": router.route_tokens, "experts": len(router.labels)}


__all__ = [
    "NAME",
    "MixtureError",
    "MixtureSpec",
    "RoutedMixture",
    "Router",
    "RoutingReport",
    "build_mixture",
    "describe",
    "load_mixture",
    "read_spec",
    "route",
    "save_mixture",
    "train_router",
    "training_blocks",
]
