"""Memory available for a computation on a device: the host's RAM for the CPU, the
device's own free memory for CUDA (what a build's memory estimate is checked against)."""

from __future__ import annotations

import psutil
import torch


def available_memory_bytes(device: torch.device | str) -> int:
    """Free memory on ``device`` in bytes: ``psutil``'s available host memory for the CPU,
    ``torch.cuda.mem_get_info`` (free, not total) for a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)
