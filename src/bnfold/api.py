"""The public entry points: check the arguments, then discover -> plan -> apply -> verify -> report."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import compat
from .errors import FoldError
from .graph import DataFlowGraph, trace_execution, trace_symbolic
from .layercheck import Probes, Recording, compare, probes_for, record
from .nested import detached_copy, iter_tensors
from .norms import TRAINING_REASON
from .plan import FoldPlan
from .planner import make_plan
from .report import FoldReport, largest_weight, model_size
from .rules import AnyRule, RuleTable, build_rules
from .running import inference
from .surgery import apply_plan, clone_model, undo_all
from .verify import OutputDiff, compare_outputs, mismatch_error

VerifyMode = Literal["outputs", "layers"]
VERIFY_MODES = ("outputs", "layers")

__all__ = ["fold", "plan", "fold_with_report", "FoldResult", "BN_Folder"]


def _check_model(model: Any, caller: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        hint = " (a state_dict? build the model and load_state_dict it first)" if isinstance(model, dict) else ""
        raise TypeError(f"bnfold.{caller}() expects a torch.nn.Module, got {type(model).__name__}{hint}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"bnfold.{caller}() got a TorchScript module ({type(model).__name__}); fold the Python model "
            "before torch.jit.script / torch.jit.trace"
        )
    for name, module in model.named_modules():
        if isinstance(module, compat.compiled_module_types()):
            what = "a torch.compile'd module" if not name else f"'{name}', a torch.compile'd module,"
            raise TypeError(
                f"bnfold.{caller}() got {what} (OptimizedModule); fold the module before compiling it: "
                f"bnfold.{caller}(compiled._orig_mod, ...), then torch.compile the result"
            )
        for tname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if nn.parameter.is_lazy(t):
                where = f"'{name}'" if name else "the model"
                raise ValueError(
                    f"{where} ({type(module).__name__}) is not initialised yet ({tname} is an uninitialised lazy "
                    "parameter); run one forward pass, model(example_input), before folding"
                )
    return model


def _check_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, tuple):
        return example_inputs
    hint = "; pass tuple(...) for several positional inputs" if isinstance(example_inputs, list) else ""
    raise TypeError(
        "example_inputs must be a Tensor or a tuple of positional arguments for model(*example_inputs), "
        f"got {type(example_inputs).__name__}{hint}"
    )


def _discover(model: nn.Module, args: tuple[Any, ...] | None, rules: RuleTable) -> DataFlowGraph:
    recorded = rules.layer_types() | rules.norm_types()
    if args is None:
        return trace_symbolic(model, recorded, recorded)
    return trace_execution(model, args, recorded, recorded)


def _warn_training(model: nn.Module, plan: FoldPlan, stacklevel: int) -> None:
    if model.training and any(k.reason == TRAINING_REASON for k in plan.kept):
        warnings.warn(
            f"{type(model).__name__} is in training mode, where BatchNorm uses batch statistics, so its norm "
            "layers cannot be folded; call model.eval() before bnfold.fold()",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def _plan(
    model: nn.Module, args: tuple[Any, ...] | None, rules: RuleTable, stacklevel: int, reparameterize: bool = False
) -> tuple[FoldPlan, DataFlowGraph]:
    """Discover and plan; ``stacklevel`` points a warning at the user's call (1 = the caller of _plan)."""
    if not isinstance(reparameterize, bool):
        raise TypeError(f"reparameterize must be True or False, got {reparameterize!r}")
    if reparameterize and args is None:
        raise ValueError(
            "reparameterize=True needs example_inputs (merging branches follows the recorded shapes), e.g. "
            "bnfold.fold(model, torch.randn(1, 3, 224, 224), reparameterize=True)"
        )
    graph = _discover(model, args, rules)
    found = make_plan(model, graph, rules, reparameterize=reparameterize)
    _warn_training(model, found, stacklevel + 1)
    return found, graph


def plan(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    *,
    extra_rules: Iterable[AnyRule] | None = None,
    reparameterize: bool = False,
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
    model = _check_model(model, "plan")
    args = _check_inputs(example_inputs)
    found, _ = _plan(model, args, build_rules(extra_rules), stacklevel=2, reparameterize=reparameterize)
    return found


@dataclass(frozen=True)
class FoldResult:
    """The folded model and the report of what happened."""

    model: nn.Module
    report: FoldReport


def fold_with_report(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    *,
    inplace: bool = False,
    extra_rules: Iterable[AnyRule] | None = None,
    verify: VerifyMode = "outputs",
    reparameterize: bool = False,
) -> FoldResult:
    """Like :func:`fold`, and also return a :class:`FoldReport` (decisions, sizes, measured error).

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> result = fold_with_report(m, torch.randn(1, 3, 16, 16))
    >>> result.report.folded, result.report.kept
    (1, 0)
    """
    return _fold(model, example_inputs, inplace, extra_rules, verify, reparameterize)


def _has_float_values(outputs: Any) -> bool:
    return any(t.is_floating_point() and t.numel() > 0 for t in iter_tensors(outputs))


def _run_folded(
    target: nn.Module, model: nn.Module, args: tuple[Any, ...], checks: tuple[Probes, Recording] | None
) -> Any:
    """The folded model's outputs, or with ``checks`` what its probes see with the reference's inputs."""
    try:
        if checks is not None:
            return record(target, args, checks[0], replay=checks[1])
        with inference(target):
            return target(*detached_copy(args))
    except Exception as error:  # the model's own code relied on something folding removed
        raise FoldError(
            f"the folded {type(model).__name__} could not run on example_inputs "
            f"({type(error).__name__}: {error}); nothing was folded. Please report it with the model"
        ) from error


def _layer_diffs_after_failure(
    model: nn.Module, target: nn.Module, found: FoldPlan, rules: RuleTable, args: tuple[Any, ...], inplace: bool
) -> list[OutputDiff] | None:
    """Check each fold on the original's own inputs, to tell a wrong fold from a model that amplifies
    rounding. ``model`` is the original as it was (folded again, briefly, when folding in place)."""
    probes = probes_for(found)
    try:
        reference = record(model, args, probes)
        if not inplace:
            return compare(reference, record(target, args, probes, replay=reference), probes)
        undo = apply_plan(model, found, rules, undoable=True)
        try:
            return compare(reference, record(model, args, probes, replay=reference), probes)
        finally:
            undo_all(undo)
    except Exception:  # the diagnosis is a courtesy: the output check has already failed
        return None


def _fold(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None,
    inplace: bool,
    extra_rules: Iterable[AnyRule] | None,
    verify: VerifyMode = "outputs",
    reparameterize: bool = False,
) -> FoldResult:
    """The body of fold() and fold_with_report(), called directly by both (warnings point at the user)."""
    model = _check_model(model, "fold")
    args = _check_inputs(example_inputs)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be 'outputs' or 'layers', got {verify!r}")
    rules = build_rules(extra_rules)
    found, graph = _plan(model, args, rules, stacklevel=3, reparameterize=reparameterize)
    params_before, bytes_before = model_size(model)
    weights_before = {s.norm: largest_weight(model, s.partners) for s in found.sites if s.kind == "merge"}
    checked = None
    checks = None
    if args is not None:
        # Outputs with no floating-point values (no detections, class indices) would prove nothing.
        checked = "layers" if verify == "layers" or not _has_float_values(graph.reference_outputs) else "outputs"
        if checked == "layers":
            probes = probes_for(found)
            checks = (probes, record(model, args, probes))  # before folding: also right when folding in place
    target = model if inplace else clone_model(model)
    undo = apply_plan(target, found, rules, undoable=inplace)  # a failed copy is simply dropped
    abs_error = rel_error = None
    worst = None
    if args is not None:
        try:
            if checks is not None:
                diffs = compare(checks[1], _run_folded(target, model, args, checks), checks[0])
                failed = [d for d in diffs if not d.ok]
                if failed:
                    raise mismatch_error(failed, what="folded layer")
            else:
                diffs = compare_outputs(graph.reference_outputs, _run_folded(target, model, args, None))
                failed = [d for d in diffs if not d.ok]
                if failed:
                    undo_all(undo)
                    layers = _layer_diffs_after_failure(model, target, found, rules, args, inplace)
                    raise mismatch_error(failed, layers=layers)
        except BaseException:
            undo_all(undo)
            raise
        if diffs:
            top = max(diffs, key=lambda d: d.max_abs_error)
            abs_error, worst = top.max_abs_error, top.path
            rel_error = max(d.relative_error for d in diffs)
        else:
            abs_error, rel_error = 0.0, 0.0
    params_after, bytes_after = model_size(target)
    merge_weights = tuple(
        (block, before, largest_weight(target, (f"{block}.merged_conv",))) for block, before in weights_before.items()
    )
    report = FoldReport(
        found,
        params_before,
        params_after,
        bytes_before,
        bytes_after,
        abs_error,
        rel_error,
        worst,
        checked,
        merge_weights,
    )
    return FoldResult(target, report)


def fold(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    *,
    inplace: bool = False,
    extra_rules: Iterable[AnyRule] | None = None,
    verify: VerifyMode = "outputs",
    reparameterize: bool = False,
) -> nn.Module:
    """Fold every norm layer of ``model`` that can be folded exactly into its neighbouring layer.

    With ``example_inputs`` (a Tensor, or a tuple of positional arguments) bnfold runs the model once to
    see what really feeds what, and checks that the folded model gives the same outputs
    (``VerificationError`` otherwise, with the original untouched). Without them it uses ``torch.fx``.

    ``inplace=False`` (default) returns a folded copy and leaves ``model`` bit-identical;
    ``inplace=True`` folds ``model`` itself and returns it.

    ``verify="outputs"`` (default) compares the model's outputs. ``verify="layers"`` instead checks each
    folded layer on the original's own inputs: for models whose outputs jump with tiny rounding
    differences (sorting, top-k, thresholds, non-maximum suppression: detection models). bnfold checks
    the layers by itself when the outputs hold no floating-point values to compare.

    ``reparameterize=True`` also merges parallel branches that read the same tensor and are summed
    (RepVGG, MobileOne, ACNet, DBB blocks, and a user's own) into one convolution: the module around them
    is replaced by a :class:`bnfold.MergedConv`. It needs ``example_inputs``.

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded = fold(m, torch.randn(1, 3, 16, 16))
    >>> type(folded[1]).__name__
    'Identity'
    """
    return _fold(model, example_inputs, inplace, extra_rules, verify, reparameterize).model


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
        from .errors import TraceError

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
