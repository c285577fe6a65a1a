"""Knowledge fusion across tokenizers; so far the alignment that distilling a teacher of another
tokenizer into the next base needs (the ``fuse`` merge method is not built yet).

- ``align.py`` — cross-tokenizer alignment on the text: token spans from the tokenizers' offset
  mappings, groups of tokens whose spans end on the same character (:func:`align_spans`), the
  teacher → student vocabulary map (:func:`vocab_map`), the chain-rule merge of a teacher's
  probabilities over a shared span (:func:`span_logprobs`) and the vocabulary-free ULD distance
  (:func:`uld_distance`)
"""

from cogen.coordinator.merging.fusion.align import (
    Alignment,
    Group,
    align,
    align_spans,
    span_logprobs,
    token_spans,
    uld_distance,
    vocab_map,
)

__all__ = [
    "Alignment",
    "Group",
    "align",
    "align_spans",
    "span_logprobs",
    "token_spans",
    "uld_distance",
    "vocab_map",
]
