"""Running a model for bnfold's own purposes: without grad, with a fixed seed, and with its buffers put
back afterwards, so that neither the model nor the caller's random state changes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["inference", "seeded", "preserved_buffers"]


@contextlib.contextmanager
def seeded(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Run with a fixed RNG seed and leave the caller's RNG state as it was."""
    devices: list[int] = []
    if torch.cuda.is_initialized():  # CUDA generators exist only once CUDA is in use
        params = (p for m in model.modules() for p in m._parameters.values() if p is not None)
        devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Undo what a forward pass does to buffers (a norm in training mode updates its running statistics)."""
    saved = [(buf, buf.detach().clone()) for buf in model.buffers() if not _is_uninitialized(buf)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                if buf.shape == value.shape:
                    buf.copy_(value)


def _is_uninitialized(t: Tensor) -> bool:
    return nn.parameter.is_lazy(t)


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Every run bnfold makes of a model: no grad, a fixed seed, buffers restored."""
    with torch.no_grad(), preserved_buffers(model), seeded(model):
        yield
