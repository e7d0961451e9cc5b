"""bnfold: fold BatchNorm and its relatives into the neighbouring Conv/ConvTranspose/Linear layers,
exactly and safely, in any PyTorch model.

>>> import torch, bnfold
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
>>> folded = bnfold.fold(model, torch.randn(1, 3, 16, 16))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public API, imported on first use: importing torch takes seconds, and the command line answers
# --help, --version and argument errors without it.
_EXPORTS = {
    "fold": "api",
    "plan": "api",
    "fold_with_report": "api",
    "FoldResult": "api",
    "BN_Folder": "api",
    "FoldPlan": "planning.fold_plan",
    "FoldSite": "planning.fold_plan",
    "KeptNorm": "planning.fold_plan",
    "FoldKind": "planning.kinds",
    "ProbeRole": "planning.kinds",
    "FoldReport": "report",
    "FoldRule": "rules.table",
    "NormRule": "rules.norms",
    "LayerRule": "rules.layers",
    "MergedConv": "reparam.merged_conv",
    "compare_latency": "check.latency",
    "Latency": "check.latency",
    "save_folded": "io.checkpoint",
    "load_folded": "io.checkpoint",
    "BnfoldError": "errors",
    "TraceError": "errors",
    "FoldError": "errors",
    "VerificationError": "errors",
    "CheckpointError": "errors",
}

__all__ = [
    "fold",
    "plan",
    "fold_with_report",
    "FoldResult",
    "BN_Folder",
    "FoldPlan",
    "FoldSite",
    "KeptNorm",
    "FoldKind",
    "ProbeRole",
    "FoldReport",
    "FoldRule",
    "NormRule",
    "LayerRule",
    "compare_latency",
    "Latency",
    "MergedConv",
    "save_folded",
    "load_folded",
    "BnfoldError",
    "TraceError",
    "FoldError",
    "VerificationError",
    "CheckpointError",
    "__version__",
]

if TYPE_CHECKING:
    from .api import BN_Folder, FoldResult, fold, fold_with_report, plan
    from .check.latency import Latency, compare_latency
    from .errors import BnfoldError, CheckpointError, FoldError, TraceError, VerificationError
    from .io.checkpoint import load_folded, save_folded
    from .planning.fold_plan import FoldPlan, FoldSite, KeptNorm
    from .planning.kinds import FoldKind, ProbeRole
    from .reparam.merged_conv import MergedConv
    from .report import FoldReport
    from .rules.layers import LayerRule
    from .rules.norms import NormRule
    from .rules.table import FoldRule


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name.startswith("_"):
            raise AttributeError(f"module 'bnfold' has no attribute '{name}'")
        try:  # a submodule, as after ``import bnfold.testing``
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'bnfold' has no attribute '{name}'") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
