"""Prequential signals on the node: losses before stepping, per data source, in the signed progress."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hivemind.utils.serializer import MSGPackSerializer
from pydantic import ValidationError

from cogen.core import models
from cogen.core.config import ModelConfig, OptimConfig
from cogen.core.corpora import get_corpus
from cogen.core.data import TrainStream, gpt2_tokenizer, train_batches
from cogen.core.directory_corpus import DirectoryCorpus
from cogen.core.documents import source_of
from cogen.core.evaluation import validation_loss
from cogen.node.prequential import PrequentialTracker, starts_from_base
from cogen.node.trainer import ExpertTrainer, row_losses
from cogen.protocols import TrainingProgress
from cogen.protocols.prequential import MAX_ROW_LOSSES, MAX_ROWS, MAX_WINDOW, LossRun, StreamSpec

CPU = torch.device("cpu")
PEER = "12D3KooWabcdefghjkmnpqrstuv"


def spec(corpus: str = "medical") -> StreamSpec:
    return StreamSpec(corpus=corpus, shard=0, num_shards=1, seed=0, block_size=16, batch_size=4,
                      validation_fraction=0.05)  # fmt: skip


def test_source_of_names_files_directories_and_builtin_prefixes() -> None:
    assert source_of("notes.jsonl:12") == "notes.jsonl"
    assert source_of("papers/2024/a.txt") == "papers"
    assert source_of("papers/log.jsonl:3") == "papers"
    assert source_of("a.txt") == "a.txt"
    assert source_of("icd10:A00") == "icd10"
    assert source_of("stdlib:json/decoder.py") == "stdlib:json"


def test_stream_remembers_the_dominant_source_of_each_row(tmp_path: Path) -> None:
    for name, word in (("good", "alpha"), ("bad", "omega")):
        (tmp_path / name).mkdir()
        for i in range(12):  # one document is longer than a block: a row is one source or mostly one
            (tmp_path / name / f"{i}.txt").write_text(" ".join([f"{word}{i}"] * 40))
    tokenizer = gpt2_tokenizer()
    stream = TrainStream(DirectoryCorpus(tmp_path), tokenizer, block_size=16, batch_size=4, shard=0,
                         num_shards=1, validation_fraction=0.0)  # fmt: skip
    pure = 0
    for position, batch in zip(range(20), stream, strict=False):
        sources = stream.row_sources(position)
        assert sources is not None and len(sources) == 4
        for row, source in zip(batch.tolist(), sources, strict=True):
            text = tokenizer.decode(row)
            if ("alpha" in text) != ("omega" in text):  # a row of one source only
                assert source == ("good" if "alpha" in text else "bad"), (text, source)
                pure += 1
    assert pure >= 40
    assert {s for p in range(20) for s in stream.row_sources(p) or ()} == {"good", "bad"}
    assert stream.row_sources(10**6) is None


def test_tracker_keeps_window_base_and_sources_and_drops_non_finite() -> None:
    tracker = PrequentialTracker(window=4, base_batches=2)
    losses = [5.0, 4.0, math.nan, 3.0, 2.5, 2.0, 1.5]
    for position, loss in enumerate(losses, start=10):
        tracker.observe(position, loss, [loss - 0.5, loss + 0.5], ("a", "b"), 15, from_base=True)
    snap = tracker.snapshot(3, spec())
    assert snap is not None and snap.generation == 3 and snap.batches == 6
    # the NaN at position 12 broke the run of consecutive positions: the window restarts after it
    assert snap.window.start == 13 and snap.window.losses == [3.0, 2.5, 2.0, 1.5]
    assert snap.window.mean == pytest.approx(2.25) and snap.window.variance == pytest.approx(
        0.41666, rel=1e-3
    )
    assert snap.window.rows == [[2.5, 3.5], [2.0, 3.0], [1.5, 2.5], [1.0, 2.0]]  # each row's own loss
    assert snap.base is not None and snap.base.start == 10 and snap.base.losses == [5.0, 4.0]
    stats = {s.source: s for s in snap.sources}
    assert stats["a"].rows == 6 and stats["a"].tokens == 90
    assert stats["a"].loss_mean == pytest.approx(sum(x - 0.5 for x in (5, 4, 3, 2.5, 2, 1.5)) / 6)
    assert stats["b"].loss_var == pytest.approx(stats["a"].loss_var)
    wire = MSGPackSerializer.loads(MSGPackSerializer.dumps(snap.model_dump()))
    assert type(snap).model_validate(wire, strict=True) == snap


def test_a_window_keeps_its_latest_batches_whose_rows_fit_a_record() -> None:
    tracker = PrequentialTracker(window=MAX_WINDOW)
    rows = 2 * MAX_ROWS  # a batch larger than a record carries: its first MAX_ROWS rows are claimed
    for position in range(MAX_WINDOW):
        tracker.observe(position, 1.0, [1.0 + position] * rows, None, 15, from_base=False)
    snap = tracker.snapshot(0, spec())
    assert snap is not None and all(len(r) == MAX_ROWS for r in snap.window.rows)
    assert snap.window.count == MAX_ROW_LOSSES // MAX_ROWS
    assert snap.window.start + snap.window.count == MAX_WINDOW  # the latest ones
    assert snap.window.losses[-1] == float(MAX_WINDOW)  # a batch's loss is its claimed rows' mean


def test_tracker_reports_no_base_when_the_first_batch_was_not_the_base() -> None:
    tracker = PrequentialTracker()
    assert tracker.snapshot(0, spec()) is None
    tracker.observe(0, 2.0, [2.0], None, 15, from_base=False)
    tracker.observe(1, 1.0, [1.0], None, 15, from_base=True)  # only the first batch decides
    snap = tracker.snapshot(0, spec())
    assert snap is not None and snap.base is None and snap.sources == []


def test_records_bound_sizes_and_refuse_non_finite_losses() -> None:
    with pytest.raises(ValidationError):
        LossRun(start=0, rows=[[1.0]] * (MAX_WINDOW + 1))
    with pytest.raises(ValidationError):
        LossRun(start=0, rows=[[math.nan]])
    with pytest.raises(ValidationError):
        LossRun(start=0, rows=[[-1.0]])
    with pytest.raises(ValidationError):
        LossRun(start=0, rows=[])
    with pytest.raises(ValidationError, match="row losses"):
        LossRun(start=0, rows=[[1.0] * MAX_ROWS] * (MAX_ROW_LOSSES // MAX_ROWS + 1))
    with pytest.raises(ValidationError):
        StreamSpec(
            corpus="", shard=0, num_shards=1, seed=0, block_size=16, batch_size=4, validation_fraction=0.05
        )


def test_trainer_loss_before_stepping_is_the_models_loss_and_reaches_the_record(tiny_path: str) -> None:
    base = models.load_base(tiny_path, "fp32", CPU)
    model = models.add_lora(base, ModelConfig(lora_rank=4))
    assert starts_from_base(model)
    optimizer = models.build_optimizer(
        models.trainable_parameters(model), OptimConfig(optimizer="adamw", lr=1e-2)
    )
    stream = train_batches(get_corpus("medical"), gpt2_tokenizer(), block_size=16, batch_size=4, shard=0,
                           num_shards=1)  # fmt: skip
    batches = list(zip(range(12), stream, strict=False))
    trainer = ExpertTrainer(
        model, optimizer, models.warmup_schedule(optimizer, 1), iter(b for _, b in batches)
    )
    with torch.no_grad():
        model.eval()
        expected = validation_loss(model, batches[0][1])  # the base's loss on the first, unseen batch
        rows = row_losses(model(input_ids=batches[0][1]).logits, batches[0][1])
        reference = model(input_ids=batches[0][1], labels=batches[0][1]).loss
        model.train()
    assert float(rows.mean()) == pytest.approx(float(reference), rel=1e-5)  # the same loss as transformers'
    for _ in range(12):
        trainer.step()
    assert not starts_from_base(model)
    snap = trainer.prequential.snapshot(0, spec())
    assert snap is not None and snap.base is not None and snap.window.positions() == range(0, 12)
    assert snap.base.loss_at(0) == pytest.approx(expected, rel=1e-4)
    assert snap.window.losses[-1] < snap.base.losses[0]  # it learned while it streamed
    progress = TrainingProgress(
        peer_id=PEER, expert="medical", step=12, samples=48, tokens=768, loss=snap.window.mean,
        samples_per_second=1.0, peak_memory_bytes=1, time=1.0, prequential=snap,
    )  # fmt: skip
    wire = MSGPackSerializer.loads(MSGPackSerializer.dumps(progress.to_wire()))
    assert TrainingProgress.model_validate(wire, strict=True) == progress


def test_a_small_shards_second_epoch_is_not_claimed(tiny_path: str, tmp_path: Path) -> None:
    for i in range(6):  # a shard of six short documents: a second epoch within a few batches
        (tmp_path / f"d{i}.txt").write_text(f"Patient {i} was seen on day {i} and went home well.")
    stream = TrainStream(DirectoryCorpus(tmp_path), gpt2_tokenizer(), block_size=16, batch_size=2, shard=0,
                         num_shards=1, validation_fraction=0.0)  # fmt: skip
    model = models.add_lora(models.load_base(tiny_path, "fp32", CPU), ModelConfig(lora_rank=4))
    optimizer = models.build_optimizer(
        models.trainable_parameters(model), OptimConfig(optimizer="adamw", lr=1e-2)
    )
    trainer = ExpertTrainer(model, optimizer, models.warmup_schedule(optimizer, 1), iter(stream),
                            row_sources=stream.row_sources, repeats=stream.repeats)  # fmt: skip
    for _ in range(12):
        trainer.step()
    fresh = [p for p in range(12) if not stream.repeats(p)]
    assert 0 < len(fresh) < 12  # both kinds were streamed: the check is not vacuous
    snap = trainer.prequential.snapshot(0, spec())
    assert snap is not None and list(snap.window.positions()) == fresh  # the first epoch's batches only
    assert snap.batches == len(fresh) and trainer.prequential.repeated == 12 - len(fresh)
    assert sum(s.rows for s in snap.sources) == 2 * len(fresh)
