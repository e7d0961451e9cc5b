"""How a tensor lies in memory: code after a norm may rely on the layout the norm gave its output (``.view``
needs a contiguous tensor), so what replaces a folded norm gives its output the same layout."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MEMORY_FORMATS", "memory_format"]

# The memory formats a tensor can be made contiguous in.
MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}


def memory_format(t: Tensor) -> str:
    """How ``t`` lies in memory: the first of MEMORY_FORMATS it is contiguous in, else ``"strides (...)"``."""
    ranks = {"channels_last": 4, "channels_last_3d": 5}
    try:
        for name, fmt in MEMORY_FORMATS.items():
            if ranks.get(name, t.dim()) == t.dim() and t.is_contiguous(memory_format=fmt):
                return name
        return f"strides {tuple(t.stride())}"
    except RuntimeError:  # a tensor without strides (sparse, nested)
        return "no strides"
