"""The routed mixture ``moe`` on the tiny model: experts really trained on three domains, a real router.

Each expert is trained with cogen's own trainer on its domain's training split, saved as a cogen
checkpoint; the router learns from training windows and is checked on the validation blocks. The same
experts behind PEFT's zero-shot Arrow router (no router training) close the second half.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from merging_helpers import CPU

from cogen.coordinator.merging.evaluate import domain_blocks, losses
from cogen.coordinator.merging.experts import Expert, load_experts
from cogen.coordinator.merging.moe import (
    ROUTER_FILE,
    SPEC_FILE,
    ArrowMixture,
    ArrowOptions,
    MixtureError,
    RoutedMixture,
    Router,
    RoutingReport,
    build_arrow,
    build_mixture,
    load_mixture,
    route,
    save_mixture,
    train_router,
    training_blocks,
)
from cogen.core import models
from cogen.core.checkpoint import AdapterMetadata, latest_checkpoint, load_adapter, save_adapter
from cogen.core.config import ModelConfig, OptimConfig
from cogen.core.corpora import get_corpus
from cogen.core.data import train_batches
from cogen.node.trainer import ExpertTrainer

DOMAINS = ("medical", "legal", "code")
BLOCK = 64


def train_expert(tiny_path: str, tokenizer: Any, domain: str, out: Path, steps: int = 15) -> Path:
    """A real expert: LoRA on the tiny base, ``steps`` trainer steps on the domain's training split."""
    model = models.add_lora(
        models.load_base(tiny_path, "fp32", CPU),
        ModelConfig(lora_rank=8, lora_targets=("o_proj", "down_proj")),
    )
    optimizer = models.build_optimizer(
        models.trainable_parameters(model), OptimConfig(optimizer="adamw", lr=5e-2)
    )
    batches = train_batches(
        get_corpus(domain), tokenizer, block_size=BLOCK, batch_size=4, shard=0, num_shards=1, seed=1
    )
    trainer = ExpertTrainer(model, optimizer, models.warmup_schedule(optimizer, 2), batches)
    for _ in range(steps):
        trainer.step()
    meta = AdapterMetadata(
        expert=domain, base_model="tiny", precision="fp32", steps=trainer.steps, samples=trainer.samples,
        tokens=trainer.tokens,
    )  # fmt: skip
    save_adapter(model, out, meta)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    return ckpt


@dataclass(frozen=True)
class Trained:
    """Built once per module: three trained experts, their router, the validation blocks."""

    root: Path
    experts: list[Expert]
    router: Router
    val: dict[str, torch.Tensor]


def value(x: float | None) -> float:
    assert x is not None, "a loss was not finite"
    return x


@pytest.fixture(scope="module")
def setup(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("moe")
    tokenizer = models.load_tokenizer(tiny_path)
    experts = load_experts([train_expert(tiny_path, tokenizer, d, root / d) for d in DOMAINS])
    base = models.load_base(tiny_path, "fp32", CPU)
    router = train_router(base, training_blocks(DOMAINS, tokenizer, BLOCK, 48), route_tokens=BLOCK)
    val = domain_blocks(DOMAINS, tokenizer, BLOCK, 24)
    return Trained(root, experts, router, val)


def fresh_mixture(tiny_path: str, setup: Trained) -> RoutedMixture:
    return build_mixture(models.load_base(tiny_path, "fp32", CPU), setup.experts, setup.router)


def first_blocks(setup: Trained, n: int) -> dict[str, torch.Tensor]:
    """Fewer validation blocks where a test compares losses: evaluation is the slow part."""
    return {domain: blocks[:n] for domain, blocks in setup.val.items()}


def right_share(report: RoutingReport) -> dict[str, float]:
    """The share of each label's sequences the router sent to that label's expert."""
    return {label: row.get(label, 0) / max(1, sum(row.values())) for label, row in report.confusion.items()}


def test_router_sends_held_out_sequences_to_their_domain(tiny_path: str, setup: Trained) -> None:
    report = route(fresh_mixture(tiny_path, setup), setup.val)
    per_label = right_share(report)
    assert set(per_label) == set(DOMAINS)
    # chance is 1/3; the tiny model is random, so its features are weak (smollm2's route better)
    assert all(acc >= 0.6 for acc in per_label.values()), report.confusion
    assert report.accuracy >= 0.75, report.confusion


def test_mixture_loss_is_each_domains_expert_loss(tiny_path: str, setup: Trained) -> None:
    val = first_blocks(setup, 8)
    mixture = fresh_mixture(tiny_path, setup)
    mixed = losses(mixture, val)
    report = right_share(route(mixture, val))
    base = losses(models.load_base(tiny_path, "fp32", CPU), val)
    gain = 0.0
    for expert in setup.experts:
        alone = losses(load_adapter(models.load_base(tiny_path, "fp32", CPU), expert.path), val)
        domain = expert.label
        ours, theirs = value(mixed[domain]), value(alone[domain])
        gain += value(base[domain]) - theirs
        # every sequence routed right: the very same computation; else off by the misrouted share
        tolerance = 1e-5 if report[domain] == 1.0 else 0.05 * (1 - report[domain]) + 1e-5
        assert abs(ours - theirs) <= tolerance * theirs, (domain, mixed, alone, report)
    assert gain / len(setup.experts) > 0.02  # the experts learned their domains: the check is not vacuous


def test_save_load_round_trip_gives_identical_losses(tiny_path: str, setup: Trained) -> None:
    val = first_blocks(setup, 4)
    out = save_mixture(setup.root / "mixture", setup.experts, setup.router)
    spec = json.loads((out / SPEC_FILE).read_text())
    assert [e["label"] for e in spec["experts"]] == list(DOMAINS)
    assert ROUTER_FILE in spec["files"] and "experts/code/adapter_model.safetensors" in spec["files"]
    loaded = load_mixture(models.load_base(tiny_path, "fp32", CPU), out)
    assert losses(loaded, val) == losses(fresh_mixture(tiny_path, setup), val)
    with pytest.raises(MixtureError, match="eval mode"):
        loaded.train()(val["code"][:1])


def one_line_error(tiny_path: str, directory: Path, match: str) -> None:
    with pytest.raises(MixtureError, match=match) as info:
        load_mixture(models.load_base(tiny_path, "fp32", CPU), directory)
    assert "\n" not in str(info.value)


def narrow_base() -> Any:
    """The tiny model's architecture at hidden size 32: a base no tiny-model mixture was built on."""
    from transformers import AutoModelForCausalLM

    narrow = models.tiny_config()
    narrow.hidden_size = 32
    return AutoModelForCausalLM.from_config(narrow)


def test_tampered_or_mismatched_mixtures_are_refused(tiny_path: str, setup: Trained, tmp_path: Path) -> None:
    good = save_mixture(tmp_path / "good", setup.experts, setup.router)
    one_line_error(tiny_path, tmp_path / "absent", "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(tiny_path, tmp_path / "empty", "not a mixture directory")

    def variant(name: str) -> Path:
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    router = variant("router")
    data = bytearray((router / ROUTER_FILE).read_bytes())
    data[-1] ^= 0xFF
    (router / ROUTER_FILE).write_bytes(bytes(data))
    one_line_error(tiny_path, router, r"router.safetensors is missing or does not match its sha256")

    extra = variant("extra")
    (extra / "experts" / "legal" / "notes.txt").write_text("hello")
    one_line_error(tiny_path, extra, "is not listed in mixture.json")

    swapped = variant("swapped")  # a consistent but different expert under the legal label
    shutil.rmtree(swapped / "experts" / "legal")
    shutil.copytree(good / "experts" / "code", swapped / "experts" / "legal")
    spec = json.loads((swapped / SPEC_FILE).read_text())
    for name in list(spec["files"]):
        if name.startswith("experts/legal/"):
            spec["files"][name] = spec["files"][name.replace("legal", "code", 1)]
    (swapped / SPEC_FILE).write_text(json.dumps(spec))
    one_line_error(tiny_path, swapped, r"holds expert 'code'.*names 'legal'")

    bad_spec = variant("bad_spec")
    spec = json.loads((bad_spec / SPEC_FILE).read_text())
    spec["route_tokens"] = 0
    (bad_spec / SPEC_FILE).write_text(json.dumps(spec))
    one_line_error(tiny_path, bad_spec, "route_tokens")

    with pytest.raises(MixtureError, match="router reads hidden size 64, the base model has 32"):
        load_mixture(narrow_base(), good)


def test_router_needs_two_experts(tiny_path: str) -> None:
    with pytest.raises(MixtureError, match="at least 2 experts"):
        train_router(
            models.load_base(tiny_path, "fp32", CPU), {"medical": torch.zeros(2, 8, dtype=torch.long)}
        )


# ----------------------------------------------------------------------------- Arrow


def arrow(tiny_path: str, experts: list[Expert], top_k: int = 2) -> ArrowMixture:
    return build_arrow(models.load_base(tiny_path, "fp32", CPU), experts, ArrowOptions(top_k=top_k))


def test_arrow_over_one_expert_is_that_expert(tiny_path: str, setup: Trained) -> None:
    val = first_blocks(setup, 4)
    expert = setup.experts[0]
    alone = losses(load_adapter(models.load_base(tiny_path, "fp32", CPU), expert.path), val)
    mixed = losses(arrow(tiny_path, [expert], top_k=3), val)  # top_k above the experts: all of them (one)
    assert mixed == pytest.approx(alone, abs=1e-5)
    assert mixed != pytest.approx(losses(models.load_base(tiny_path, "fp32", CPU), val), abs=1e-3)


def test_arrow_routes_tokens_to_experts_with_no_training(tiny_path: str, setup: Trained) -> None:
    val = first_blocks(setup, 8)
    base = {d: value(v) for d, v in losses(models.load_base(tiny_path, "fp32", CPU), val).items()}
    top1 = {d: value(v) for d, v in losses(arrow(tiny_path, setup.experts, top_k=1), val).items()}
    top2 = {d: value(v) for d, v in losses(arrow(tiny_path, setup.experts, top_k=2), val).items()}
    # every domain gains on the base: each token reaches some expert's delta where it is aligned
    assert all(top1[d] < base[d] and top2[d] < base[d] for d in DOMAINS), (base, top1, top2)
    assert top1 != pytest.approx(top2, abs=1e-4)  # top_k changes the mixture: the routing is real
    # the same experts, the same seed: the same prototypes and losses
    assert losses(arrow(tiny_path, setup.experts, top_k=2), val) == pytest.approx(top2, abs=1e-6)


def test_arrow_comes_off_the_base_and_round_trips(tiny_path: str, setup: Trained, tmp_path: Path) -> None:
    val = first_blocks(setup, 4)
    base = models.load_base(tiny_path, "fp32", CPU)
    before = losses(base, val)
    mixture = build_arrow(base, setup.experts, ArrowOptions(top_k=2))
    mixed = losses(mixture, val)
    with pytest.raises(MixtureError, match="eval mode"):
        mixture.train()(val["code"][:1])
    plain: Any = mixture.model
    assert losses(plain.unload(), val) == before  # what the coordinator merges into afterwards
    out = save_mixture(tmp_path / "arrow", setup.experts, ArrowOptions(top_k=2), hidden_size=64)
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["routing"] == "arrow" and spec["arrow"]["top_k"] == 2 and ROUTER_FILE not in spec["files"]
    loaded = load_mixture(models.load_base(tiny_path, "fp32", CPU), out)
    assert isinstance(loaded, ArrowMixture) and losses(loaded, val) == pytest.approx(mixed, abs=1e-6)

    both = tmp_path / "both"  # arrow settings and a route_tokens: which router? refused
    shutil.copytree(out, both)
    spec["route_tokens"] = 8
    (both / SPEC_FILE).write_text(json.dumps(spec))
    one_line_error(tiny_path, both, "arrow routing needs arrow settings and no route_tokens")
    with pytest.raises(MixtureError, match="built on hidden size 64, the base model has 32"):
        load_mixture(narrow_base(), out)


def test_arrow_refuses_experts_of_different_ranks(tiny_path: str, setup: Trained, tmp_path: Path) -> None:
    other = models.add_lora(
        models.load_base(tiny_path, "fp32", CPU),
        ModelConfig(lora_rank=4, lora_targets=("o_proj", "down_proj")),
    )
    meta = AdapterMetadata(expert="legal", base_model="tiny", precision="fp32", steps=1, samples=1, tokens=1)
    save_adapter(other, tmp_path / "r4", meta)
    ckpt = latest_checkpoint(tmp_path / "r4")
    assert ckpt is not None
    with pytest.raises(MixtureError, match=r"cannot build an Arrow mixture.*rank mismatch") as info:
        arrow(tiny_path, [setup.experts[0], *load_experts([ckpt])])
    assert "\n" not in str(info.value)
    with pytest.raises(MixtureError, match="top_k must be at least 1"):
        ArrowOptions(top_k=0)
