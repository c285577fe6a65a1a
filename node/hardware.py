"""What this node trains on, for its NodeInfo record."""

from __future__ import annotations

import os
import platform

import torch

from cogen.protocols import Hardware


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _bnb_usable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def detect_hardware(device: torch.device) -> Hardware:
    """Describe ``device``: name, memory, dtype support."""
    import psutil

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return Hardware(
            device=str(device),
            device_name=props.name[:128],
            memory_bytes=int(props.total_memory),
            cpu_count=os.cpu_count() or 0,
            supports_bf16=bool(torch.cuda.is_bf16_supported()),
            supports_fp16=True,
            supports_int8=_bnb_usable(),
        )
    return Hardware(
        device="cpu",
        device_name=_cpu_name()[:128],
        memory_bytes=int(psutil.virtual_memory().total),
        cpu_count=os.cpu_count() or 0,
        supports_bf16=True,
        supports_fp16=True,
        supports_int8=_bnb_usable(),
    )
