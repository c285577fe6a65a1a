"""Token ids from texts and blocks from token ids: batched lazy tokenization and packing without padding.

- :func:`token_stream` tokenizes texts lazily in batched chunks (at most ``CHUNK_DOCS`` texts or about
  ``CHUNK_CHARS`` characters per tokenizer call), each followed by the tokenizer's EOS (:func:`eos_id`);
- :func:`pack` concatenates token lists and cuts full blocks; :func:`pack_labelled` also names each
  block by the label (a data source) that gave most of its tokens.

Used by :mod:`cogen.core.data` (training streams, validation blocks).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = ["CHUNK_CHARS", "CHUNK_DOCS", "eos_id", "pack", "pack_labelled", "token_stream"]

CHUNK_DOCS = 64  #: documents per batched tokenizer call
CHUNK_CHARS = 200_000  #: ... or fewer, once this many characters are gathered (big source files)


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's EOS id (one-line ``ValueError`` when it has none)."""
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; set tokenizer.eos_token")
    return eos


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    """Group texts for batched tokenization: at most CHUNK_DOCS texts or about CHUNK_CHARS characters."""
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def token_stream(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS, tokenized lazily in batched chunks."""
    eos = eos_id(tokenizer)
    for chunk in _chunks(texts):
        encoded = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in encoded["input_ids"]:
            yield [*ids, eos]


def pack(token_lists: Iterable[list[int]], block_size: int) -> Iterator[list[int]]:
    """Concatenate token lists and cut full blocks of ``block_size``; only the final partial block is lost."""
    for block, _ in pack_labelled((("", ids) for ids in token_lists), block_size):
        yield block


def pack_labelled(items: Iterable[tuple[str, list[int]]], block_size: int) -> Iterator[tuple[list[int], str]]:
    """:func:`pack` of (label, token list) pairs: each block with the label that gave most of its tokens
    (the first such on a tie)."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    buffer: list[int] = []
    segments: deque[list[Any]] = deque()  # [label, tokens of it still in the buffer]
    for label, ids in items:
        buffer.extend(ids)
        segments.append([label, len(ids)])
        full = len(buffer) // block_size * block_size
        for start in range(0, full, block_size):
            counts: dict[str, int] = {}
            need = block_size
            while need:
                segment = segments[0]
                take = min(need, segment[1])
                counts[segment[0]] = counts.get(segment[0], 0) + take
                segment[1] -= take
                need -= take
                if segment[1] == 0:
                    segments.popleft()
            yield buffer[start : start + block_size], max(counts, key=lambda k: counts[k])
        del buffer[:full]
