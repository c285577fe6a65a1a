"""Knowledge fusion: the ``fuse`` merge method, which distils the generation's experts and teachers of any
tokenizer or architecture into the dense next base.

- ``align.py`` — cross-tokenizer alignment on the text: token spans from the tokenizers' offset
  mappings, groups of tokens whose spans end on the same character (:func:`align_spans`), the
  teacher → student vocabulary map (:func:`vocab_map`), the chain-rule merge of a teacher's
  probabilities over a shared span (:func:`span_logprobs`) and the vocabulary-free ULD distance
  (:func:`uld_distance`)
- ``teachers.py`` — the teachers: an expert of the generation (the base with its adapter) and a fusion
  source (a cogen checkpoint on another base, or a Hugging Face model directory of any tokenizer)
- ``targets.py`` — the fusion corpus (training splits of the fused domains) and the teachers' targets,
  streamed per chunk: top-k log-probabilities on the student's tokens, or aligned groups and ULD
  distributions for a teacher of another tokenizer
- ``student.py`` — the student's training: LoRA on the weight-merged base, loss = top-k KL/ULD to the
  teachers' targets mixed with the language-modelling loss, merged back into dense weights
- ``fuse.py`` — :class:`Fusion`, the build step the merge (and the publishing gate) runs after the weight
  merge, and its :class:`~cogen.protocols.fusion.FusionReport`
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
