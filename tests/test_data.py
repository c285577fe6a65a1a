"""Splits, shards, packing and streaming, with the real GPT-2 tokenizer and real corpora."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from cogen.core.corpora import get_corpus
from cogen.core.data import (
    TrainStream,
    gpt2_tokenizer,
    shard_for_peer,
    shard_of,
    split_of,
    train_batches,
    validation_blocks,
)
from cogen.core.directory_corpus import DirectoryCorpus

BUILTIN = ["medical", "legal", "code", "literature"]
MARKER = re.compile(r"\bzxq(\d{3})\b")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def domain_ids() -> dict[str, list[str]]:
    return {name: [doc.id for doc in get_corpus(name).documents()] for name in BUILTIN}


def make_corpus(root: Path, count: int) -> DirectoryCorpus:
    """Documents ``d000.txt`` ... each naming its own marker word ``zxqNNN``."""
    for i in range(count):
        (root / f"d{i:03d}.txt").write_text(f"Document zxq{i:03d} says hello, number {i}.")
    return DirectoryCorpus(root)


def decode_markers(tokenizer: PreTrainedTokenizerBase, batches: list[torch.Tensor]) -> list[int]:
    """Markers in the order they appear in the (contiguous) token stream of consecutive batches."""
    text = tokenizer.decode(torch.cat([batch.flatten() for batch in batches]).tolist())
    assert isinstance(text, str)
    return [int(m) for m in MARKER.findall(text)]


def test_gpt2_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    assert gpt2_tokenizer() is tokenizer
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    assert len(tokenizer) == 50257


def test_split_and_shard_are_pinned() -> None:
    """sha256-based: the same answers on every machine and run (Python's salted hash() would not be)."""
    assert [split_of(i, 0.5) for i in ("icd10:A00", "kjv:Genesis 1", "license:mit")] == [
        "train",
        "validation",
        "validation",
    ]
    assert [shard_of(i, 7) for i in ("icd10:A00", "kjv:Genesis 1", "stdlib:json/decoder.py")] == [4, 3, 1]
    assert shard_for_peer("icd10:A00", 7) == 5


def test_split_fraction_bounds() -> None:
    assert split_of("x", 0.0) == "train" and split_of("x", 1.0) == "validation"
    with pytest.raises(ValueError, match="validation_fraction"):
        split_of("x", 1.5)
    with pytest.raises(ValueError, match="num_shards"):
        shard_of("x", 0)


def test_split_fraction_and_shard_independence() -> None:
    ids = [f"doc-{i}" for i in range(20_000)]
    validation = [i for i in ids if split_of(i, 0.1) == "validation"]
    assert abs(len(validation) / len(ids) - 0.1) < 0.01
    for shard in range(4):  # the split hash and the shard hash are independent
        in_shard = [i for i in ids if shard_of(i, 4) == shard]
        assert abs(len(in_shard) / len(ids) - 0.25) < 0.02
        share = sum(split_of(i, 0.1) == "validation" for i in in_shard) / len(in_shard)
        assert abs(share - 0.1) < 0.02


def test_shard_for_peer_spreads_peers() -> None:
    shards = [shard_for_peer(f"peer-{i}", 8) for i in range(400)]
    assert set(shards) == set(range(8))
    assert shards == [shard_for_peer(f"peer-{i}", 8) for i in range(400)]


@pytest.mark.parametrize("name", BUILTIN)
def test_domain_split_and_shards(name: str, domain_ids: dict[str, list[str]]) -> None:
    ids = domain_ids[name]
    train = {i for i in ids if split_of(i) == "train"}
    validation = {i for i in ids if split_of(i) == "validation"}
    assert train.isdisjoint(validation) and train | validation == set(ids)
    assert validation == {i for i in ids if split_of(i) == "validation"}  # again: same split
    assert abs(len(validation) / len(ids) - 0.05) < 4 * math.sqrt(0.05 * 0.95 / len(ids))
    shards = [{i for i in train if shard_of(i, 4) == k} for k in range(4)]
    assert set().union(*shards) == train
    assert sum(len(s) for s in shards) == len(train)  # pairwise disjoint
    assert all(shards)


def test_train_batches_read_only_their_shard(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    corpus = make_corpus(tmp_path, 60)
    ids = {i: f"d{i:03d}.txt" for i in range(60)}
    validation = {i for i, doc_id in ids.items() if split_of(doc_id, 0.2) == "validation"}
    assert validation
    for shard in range(3):
        expected = {i for i, d in ids.items() if i not in validation and shard_of(d, 3) == shard}
        stream = train_batches(
            corpus, tokenizer, block_size=16, batch_size=4, shard=shard, num_shards=3, validation_fraction=0.2
        )
        batches = list(itertools.islice(stream, 12))  # 768 tokens: more than one epoch of ~16 docs
        assert all(b.shape == (4, 16) and b.dtype == torch.long for b in batches)
        seen = set(decode_markers(tokenizer, batches))
        assert seen == expected
        assert not seen & validation


def test_packing_separates_documents_with_eos(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    corpus = make_corpus(tmp_path, 20)
    texts = {doc.text for doc in corpus.documents()}
    stream = TrainStream(corpus, tokenizer, block_size=8, batch_size=3, shard=0, num_shards=1)
    tokens = torch.cat([b.flatten() for b in itertools.islice(stream, 20)]).tolist()
    assert stream.tokens_yielded == len(tokens) == 20 * 3 * 8 and stream.batches_yielded == 20
    segments = " ".join(map(str, tokens)).split(str(tokenizer.eos_token_id))
    complete = [tokenizer.decode([int(t) for t in s.split()]) for s in segments[:-1]]
    assert len(complete) > 10 and set(complete) <= texts  # every EOS closes a whole document


def test_epochs_reorder_the_same_documents(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    corpus = make_corpus(tmp_path, 30)
    stream = TrainStream(corpus, tokenizer, block_size=16, batch_size=2, shard=0, num_shards=1)
    n = len(stream.documents)
    markers = decode_markers(tokenizer, list(itertools.islice(stream, 40)))  # 1280 tokens > 2 epochs
    first, second = markers[:n], markers[n : 2 * n]
    assert len(second) == n and sorted(first) == sorted(second) and first != second
    assert stream.epoch >= 2
    assert [d.id for d in stream.epoch_order(1)] != [d.id for d in stream.epoch_order(0)]
    again = TrainStream(corpus, tokenizer, block_size=16, batch_size=2, shard=0, num_shards=1)
    assert torch.equal(next(iter(again)), next(iter(stream)))  # same seed, same stream
    other = TrainStream(corpus, tokenizer, block_size=16, batch_size=2, shard=0, num_shards=1, seed=1)
    assert [d.id for d in other.epoch_order(0)] != [d.id for d in stream.epoch_order(0)]


def test_a_batch_repeats_once_it_holds_text_of_a_second_epoch(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    corpus = make_corpus(tmp_path, 30)
    stream = TrainStream(corpus, tokenizer, block_size=16, batch_size=2, shard=0, num_shards=1)
    it = iter(stream)
    batches = [next(it)]
    assert not stream.repeats(0) and not stream.repeats(5)  # epoch 0 runs on: nothing repeats yet
    batches += [next(it) for _ in range(39)]  # 1280 tokens, more than two epochs
    # epoch 0's tokens, counted independently: every document of its order, and an EOS after each
    first_epoch = sum(len(tokenizer(d.text)["input_ids"]) + 1 for d in stream.epoch_order(0))
    flags = [stream.repeats(p) for p in range(40)]
    assert flags == [(p + 1) * 2 * 16 > first_epoch for p in range(40)]
    assert not flags[0] and flags[-1]
    seen: set[int] = set()  # a batch holding a document's marker for the second time repeats
    for position, batch in enumerate(batches):
        markers = decode_markers(tokenizer, [batch])
        if any(m in seen for m in markers):
            assert flags[position], position
        seen.update(markers)


def test_empty_shard_fails_at_once(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    corpus = make_corpus(tmp_path, 1)
    empty = next(k for k in range(50) if k != shard_of("d000.txt", 50))
    with pytest.raises(ValueError, match="no training documents in shard"):
        train_batches(corpus, tokenizer, block_size=8, batch_size=2, shard=empty, num_shards=50)


def test_validation_blocks(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    corpus = make_corpus(tmp_path, 60)
    validation = [i for i in range(60) if split_of(f"d{i:03d}.txt", 0.2) == "validation"]
    blocks = validation_blocks(corpus, tokenizer, block_size=8, max_blocks=5, validation_fraction=0.2)
    assert blocks.shape == (5, 8) and blocks.dtype == torch.long
    assert torch.equal(
        blocks, validation_blocks(corpus, tokenizer, block_size=8, max_blocks=5, validation_fraction=0.2)
    )
    markers = decode_markers(tokenizer, [blocks])
    assert markers == validation[: len(markers)]  # the first validation documents, in corpus order
    everything = validation_blocks(
        corpus, tokenizer, block_size=8, max_blocks=10_000, validation_fraction=0.2
    )
    found = decode_markers(tokenizer, [everything])
    assert found == validation[: len(found)] and len(found) >= len(validation) - 1  # only a tail is lost
    with pytest.raises(ValueError, match="validation text"):
        validation_blocks(corpus, tokenizer, block_size=8, max_blocks=5, validation_fraction=0.0)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_domain_streams(name: str, tokenizer: PreTrainedTokenizerBase) -> None:
    corpus = get_corpus(name)
    blocks = validation_blocks(corpus, tokenizer, block_size=128, max_blocks=32)
    assert blocks.shape == (32, 128)
    batch = next(train_batches(corpus, tokenizer, block_size=128, batch_size=4, shard=1, num_shards=2))
    assert batch.shape == (4, 128) and batch.dtype == torch.long
    assert int(batch.max()) < len(tokenizer)
