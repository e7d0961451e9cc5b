"""bnfold: fold BatchNorm and its relatives into the neighbouring Conv/ConvTranspose/Linear layers,
exactly and safely, in any PyTorch model.

>>> import torch, bnfold
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
>>> folded = bnfold.fold(model, torch.randn(1, 3, 16, 16))
"""

from .api import BN_Folder, FoldResult, fold, fold_with_report, plan
from .errors import BnfoldError, FoldError, TraceError, VerificationError
from .latency import Latency, compare_latency
from .layers import LayerRule
from .norms import NormRule
from .plan import FoldPlan, FoldSite, KeptNorm
from .reparam import MergedConv
from .report import FoldReport
from .rules import FoldRule

__version__ = "0.1.0"

__all__ = [
    "fold",
    "plan",
    "fold_with_report",
    "FoldResult",
    "FoldPlan",
    "FoldSite",
    "KeptNorm",
    "FoldReport",
    "FoldRule",
    "NormRule",
    "LayerRule",
    "compare_latency",
    "Latency",
    "BN_Folder",
    "MergedConv",
    "BnfoldError",
    "TraceError",
    "FoldError",
    "VerificationError",
    "__version__",
]
