"""Logs a person can read, and the memory figures cogen reports.

``setup_logging`` reads ``COGEN_LOG_LEVEL``; ``peak_memory_bytes`` is the process's peak RSS on the
CPU (or the peak allocated CUDA memory); ``model_state_bytes`` counts weights, gradients and
optimizer state, the memory a training method needs before activations.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a figure needs it: a command's --help does not
    import torch
    from torch import nn

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Configure root logging once: level from ``level``, else ``$COGEN_LOG_LEVEL``, else INFO."""
    name = (level or os.environ.get("COGEN_LOG_LEVEL") or "INFO").upper()
    if name not in logging.getLevelNamesMapping():
        raise ValueError(f"COGEN_LOG_LEVEL={name!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=name, format=_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    # hivemind configures its own loggers; keep them at our level but quieter by default
    logging.getLogger("hivemind").setLevel(max(logging.getLevelName(name), logging.WARNING))
    for noisy in ("httpx", "uvicorn.access", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes looks for optional CPU 4-bit kernels at import and warns that they are absent;
    # cogen uses no 4-bit layers
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # ...and that fp32 inputs of 8-bit matmuls are cast to fp16, once per call
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars; cogen logs its own progress


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory of this process: CUDA peak allocation on a GPU, else peak resident set size."""
    if device is not None and device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def gpu_memory_bytes() -> int | None:
    """CUDA memory this process holds now (allocated by torch), or None where it uses no GPU."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return int(torch.cuda.memory_allocated())


def current_memory_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of weights (8-bit weights with their scales), gradients and optimizer state."""
    import torch

    weights = 0
    for p in model.parameters():
        weights += _tensor_bytes(p)
        scales = getattr(p, "SCB", None)  # bitsandbytes Int8Params keep per-row scales beside the weight
        if isinstance(scales, torch.Tensor):
            weights += _tensor_bytes(scales)
    grads = sum(_tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    state = 0
    if optimizer is not None:
        seen: set[tuple[int, int]] = set()  # bitsandbytes shares its quantization maps between parameters
        for per_param in optimizer.state.values():
            for v in per_param.values():
                if isinstance(v, torch.Tensor) and (v.data_ptr(), v.nbytes) not in seen:
                    seen.add((v.data_ptr(), v.nbytes))
                    state += _tensor_bytes(v)
    return {"weights": weights, "gradients": grads, "optimizer": state, "total": weights + grads + state}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
