"""Knowledge fusion (issue 15): teachers of any tokenizer distilled into the dense next base.

- ``align.py`` — cross-tokenizer alignment on the text: byte spans of both tokenizations, the groups
  that cover the same bytes (exact / chain rule / ULD), and the teacher -> student vocabulary map
"""

from cogen.coordinator.merging.fusion.align import Aligner, Alignment, AlignmentError, Group, VocabularyMap

__all__ = ["Aligner", "Alignment", "AlignmentError", "Group", "VocabularyMap"]
