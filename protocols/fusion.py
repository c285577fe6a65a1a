"""The fusion record of a generation whose base was distilled (``method: fuse``) into the signed manifest.

Every teacher is named by what it is (a same-base ``expert`` of the generation, or a ``source`` of
another architecture, size or tokenizer), by its architecture and by the sha256 of its tokenizer's
vocabulary and of its weights, with its *fusion weight*: the fraction of the fusion corpus on which
it had the lowest cross-entropy per byte (MinCE) and was the student's target. The cost is recorded
in forward-pass tokens (teachers, student), seconds and the process's peak resident memory.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_CONFIG = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class FusionSource(BaseModel):
    model_config = _CONFIG

    name: str = Field(max_length=256)
    kind: Literal["expert", "source"]
    domain: str | None = Field(default=None, max_length=256, description="the domain it was trained on")
    architecture: str = Field(max_length=256)
    base_model: str = Field(max_length=1024, description="the base it is an adapter on, or its own weights")
    tokenizer_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of its tokenizer's vocabulary (token -> id, sorted): equal vocabularies hash "
        "equal whatever files hold them (NodeInfo's tokenizer_sha256 fingerprints the files instead)",
    )
    weights_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="an expert's adapter_model.safetensors, or over a model directory's *.safetensors",
    )
    same_tokenizer: bool = Field(description="it reads the student's tokens (no alignment needed)")
    fusion_weight: float = Field(ge=0, le=1, description="fraction of the corpus it was the target on")
    cross_entropy_per_byte: float = Field(ge=0, description="its mean cross-entropy on the corpus, nats/byte")


class FusionReport(BaseModel):
    model_config = _CONFIG

    sources: list[FusionSource] = Field(max_length=1024)
    domains: list[str] = Field(max_length=1024, description="the domains the fusion corpus was drawn from")
    texts: int = Field(ge=1, description="texts in the fusion corpus")
    length: int = Field(ge=2, description="student tokens per text")
    top_k: int = Field(ge=1)
    kd_weight: float = Field(ge=0, le=1)
    steps: int = Field(ge=0, description="student steps run")
    stopped: Literal["steps", "budget"]
    teacher_tokens: int = Field(ge=0)
    student_tokens: int = Field(ge=0)
    seconds: float = Field(ge=0)
    peak_rss_bytes: int = Field(ge=0, description="the process's peak resident memory after the fusion")
