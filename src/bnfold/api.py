"""The public entry points: check the arguments, then discover -> plan -> apply -> verify -> report."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

from torch import Tensor, nn

from .apply.surgery import clone_model
from .errors import TraceError
from .options import VerifyMode, check_model, fold_options
from .pipeline import FoldResult, fold_model, plan_model
from .planning.fold_plan import FoldPlan
from .planning.kinds import FoldKind
from .rules.table import AnyRule

__all__ = ["fold", "plan", "fold_with_report", "FoldResult", "BN_Folder"]


def plan(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    *,
    extra_rules: Iterable[AnyRule] | None = None,
    extra_kinds: Iterable[FoldKind] | None = None,
    reparameterize: bool = False,
    equalize: bool | Literal["all"] = False,
) -> FoldPlan:
    """Every norm layer of ``model`` with its decision (fold into which layer, or keep and why).

    Changes nothing: with ``example_inputs`` the model runs once, without grad, with a fixed seed,
    and its buffers are restored afterwards.

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> p = plan(m, torch.randn(1, 3, 16, 16))
    >>> len(p.sites), len(p.kept)
    (1, 0)
    """
    model = check_model(model, "plan")
    options = fold_options(
        "plan",
        example_inputs,
        extra_rules=extra_rules,
        extra_kinds=extra_kinds,
        reparameterize=reparameterize,
        equalize=equalize,
    )
    return plan_model(model, options, stacklevel=2)[0]


def fold_with_report(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    *,
    inplace: bool = False,
    extra_rules: Iterable[AnyRule] | None = None,
    extra_kinds: Iterable[FoldKind] | None = None,
    verify: VerifyMode = "outputs",
    reparameterize: bool = False,
    equalize: bool | Literal["all"] = False,
) -> FoldResult:
    """Like :func:`fold`, and also return a :class:`FoldReport` (decisions, sizes, measured error).

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> result = fold_with_report(m, torch.randn(1, 3, 16, 16))
    >>> result.report.folded, result.report.kept
    (1, 0)
    """
    model = check_model(model, "fold_with_report")
    options = fold_options(
        "fold_with_report",
        example_inputs,
        extra_rules=extra_rules,
        extra_kinds=extra_kinds,
        inplace=inplace,
        verify=verify,
        reparameterize=reparameterize,
        equalize=equalize,
    )
    return fold_model(model, options, stacklevel=2)


def fold(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    *,
    inplace: bool = False,
    extra_rules: Iterable[AnyRule] | None = None,
    extra_kinds: Iterable[FoldKind] | None = None,
    verify: VerifyMode = "outputs",
    reparameterize: bool = False,
    equalize: bool | Literal["all"] = False,
) -> nn.Module:
    """Fold every norm layer of ``model`` that can be folded exactly into its neighbouring layer.

    With ``example_inputs`` (a Tensor, or a tuple of positional arguments) bnfold runs the model once to
    see what really feeds what, and checks that the folded model gives the same outputs
    (``VerificationError`` otherwise, with the original untouched). Without them it uses ``torch.fx``.

    ``inplace=False`` (default) returns a folded copy and leaves ``model`` bit-identical;
    ``inplace=True`` folds ``model`` itself and returns it.

    ``verify="outputs"`` (default) compares the model's outputs (integer outputs through the floats they were
    computed from). When they differ beyond float32 rounding, the original runs once more in float64 (a float64
    copy of it, briefly): the fold passes when the folded model is no further from that run than the original's
    own float32 outputs are, and every folded layer gives the original's values on the original's own inputs.
    So models whose outputs jump with tiny rounding differences (detection models) fold under this check too.
    ``verify="layers"`` checks only each folded layer on the original's own inputs, not the model end to end.

    ``equalize=True`` then prepares the weights for 8-bit quantization, exactly: after folding (and merging),
    each layer's output channels are divided by positive scales that the layers reading them take back on
    their input channels, wherever what lies between lets a per-channel scale through (ReLU, pooling...), so
    that the per-channel weight ranges on both sides are equal (cross-layer equalization). With example
    inputs, a chain is equalized only when that does not lower the model's output SQNR with per-tensor 8-bit
    weights on them (equal ranges are not always what 8-bit weights need); ``equalize="all"`` equalizes every
    chain it can. The plan lists every equalized chain and every layer kept out of one, with the reason.

    ``reparameterize=True`` also merges parallel branches that read the same tensor and are summed
    (RepVGG, MobileOne, ACNet, DBB blocks, and a user's own) into one convolution: the module around them
    is replaced by a :class:`bnfold.MergedConv`. It needs ``example_inputs``.

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded = fold(m, torch.randn(1, 3, 16, 16))
    >>> type(folded[1]).__name__
    'Identity'
    """
    model = check_model(model, "fold")
    options = fold_options(
        "fold",
        example_inputs,
        extra_rules=extra_rules,
        extra_kinds=extra_kinds,
        inplace=inplace,
        verify=verify,
        reparameterize=reparameterize,
        equalize=equalize,
        hints=False,  # fold() returns only the model: nobody reads the kept rows' hints
    )
    return fold_model(model, options, stacklevel=2).model


class BN_Folder:  # noqa: N801 - the name fasterai code already uses
    """Drop-in replacement for fasterai's ``BN_Folder``: ``BN_Folder().fold(model)`` returns a folded copy.

    Unlike the original it pairs layers by data flow (not registration order), folds every supported
    norm type, and never folds a norm when that would change the outputs. Pass ``example_inputs`` to fold
    models that ``torch.fx`` cannot trace; without them such a model is returned unfolded, with a warning.

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> type(BN_Folder().fold(m)[1]).__name__
    'Identity'
    """

    def __init__(self) -> None:
        super().__init__()

    def fold(self, model: nn.Module, example_inputs: Tensor | tuple[Any, ...] | None = None) -> nn.Module:
        try:
            return fold(model, example_inputs)
        except TraceError as error:
            if example_inputs is not None:
                raise
            warnings.warn(
                f"BN_Folder could not trace {type(model).__name__}, so nothing was folded: {error}",
                UserWarning,
                stacklevel=2,
            )
            return clone_model(model)
