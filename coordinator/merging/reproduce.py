"""What a merge's result depends on besides its inputs: the platform it ran on, and the tolerance a
recomputation on another platform must meet.

The built-in methods are elementwise, except each expert's dense delta ``B @ A · scale``: a matrix
product whose rounding depends on the kernel torch picks for the device and CPU (AVX2, AVX-512, a GPU's
BLAS). On the same torch, device type and CPU capability the published weights are reproduced
bit for bit; elsewhere every tensor within :data:`TOLERANCE` of its largest value (a few fp32 ulps,
far below any change an expert's weight or checkpoint makes).
"""

from __future__ import annotations

import platform

import torch

from cogen.protocols.manifest import Reproduction

#: per tensor, the largest |recomputed - published| / max |published| a recomputation elsewhere may show
TOLERANCE = 1e-6


def platform_of(device: torch.device) -> str:
    """The torch version, device and CPU capability a merge on ``device`` runs with."""
    where = f"{device.type}"
    if device.type == "cuda":
        where += f" {torch.cuda.get_device_name(device)}"
    cpu = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}; {where}; {platform.machine()} {cpu}"


def reproduction(device: torch.device) -> Reproduction:
    """The manifest's record of how exactly a merge on ``device`` can be recomputed."""
    return Reproduction(platform=platform_of(device), tolerance=TOLERANCE)
