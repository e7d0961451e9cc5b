"""What one call asked for, checked once at the edge: the model, its example inputs, and the options, as
one frozen :class:`FoldOptions` that every later stage reads (nothing below the public functions checks
an argument again, nor passes options as loose positionals)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .kinds import build_kinds
from .planning.kinds import FoldKind
from .rules import third_party
from .rules.table import AnyRule, RuleTable, build_rules

__all__ = ["VerifyMode", "VERIFY_MODES", "FoldOptions", "check_model", "check_inputs", "fold_options"]

VerifyMode = Literal["outputs", "layers"]
VERIFY_MODES = ("outputs", "layers")


@dataclass(frozen=True)
class FoldOptions:
    """One call's options, checked.

    ``inputs``: the positional arguments of ``model(*inputs)``, or ``None`` (trace with ``torch.fx``);
    ``rules``: the built-in rules with the caller's ``extra_rules``; ``kinds``: the kinds of fold, built-in
    and the caller's ``extra_kinds`` (:mod:`bnfold.kinds`); ``hints``: whether the plan's kept rows
    get the re-parameterization hints (``fold()`` returns only the model, so nobody reads them there, and
    their analysis costs as much as a merge); ``caller``: the public function, for messages.
    """

    inputs: tuple[Any, ...] | None
    rules: RuleTable
    kinds: Mapping[str, FoldKind] = field(default_factory=build_kinds)
    inplace: bool = False
    verify: VerifyMode = "outputs"
    reparameterize: bool = False
    equalize: bool = False
    equalize_all: bool = False  # every exact chain, not only those the example inputs show help 8-bit weights
    hints: bool = True
    caller: str = "fold"


def check_model(model: Any, caller: str) -> nn.Module:
    """``model`` when bnfold can work on it; otherwise a ``TypeError``/``ValueError`` that says what to do."""
    if not isinstance(model, nn.Module):
        hint = " (a state_dict? build the model and load_state_dict it first)" if isinstance(model, dict) else ""
        raise TypeError(f"bnfold.{caller}() expects a torch.nn.Module, got {type(model).__name__}{hint}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"bnfold.{caller}() got a TorchScript module ({type(model).__name__}); fold the Python model "
            "before torch.jit.script / torch.jit.trace"
        )
    compiled = third_party.compiled_module_types()
    for name, module in model.named_modules():
        if isinstance(module, compiled):
            what = "a torch.compile'd module" if not name else f"'{name}', a torch.compile'd module,"
            raise TypeError(
                f"bnfold.{caller}() got {what} (OptimizedModule); fold the module before compiling it: "
                f"bnfold.{caller}(compiled._orig_mod, ...), then torch.compile the result"
            )
        for tname, t in (*module._parameters.items(), *module._buffers.items()):
            if t is not None and nn.parameter.is_lazy(t):
                where = f"'{name}'" if name else "the model"
                raise ValueError(
                    f"{where} ({type(module).__name__}) is not initialised yet ({tname} is an uninitialised lazy "
                    "parameter); run one forward pass, model(example_input), before folding"
                )
    return model


def check_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    """``example_inputs`` as the positional arguments of ``model(*args)``, or ``None``."""
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


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        also = " (or 'all')" if name == "equalize" else ""
        raise TypeError(f"{name} must be True or False{also}, got {value!r}")
    return value


def fold_options(
    caller: str,
    example_inputs: Any,
    *,
    extra_rules: Iterable[AnyRule] | None = None,
    extra_kinds: Iterable[FoldKind] | None = None,
    inplace: bool = False,
    verify: VerifyMode = "outputs",
    reparameterize: bool = False,
    equalize: bool | Literal["all"] = False,
    hints: bool = True,
) -> FoldOptions:
    """Check a public call's arguments (all but the model) and gather them in one :class:`FoldOptions`.

    >>> fold_options("fold", None, reparameterize=False).reparameterize
    False
    """
    inputs = check_inputs(example_inputs)
    _check_flag("inplace", inplace)
    _check_flag("reparameterize", reparameterize)
    if equalize != "all":
        _check_flag("equalize", equalize)
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be 'outputs' or 'layers', got {verify!r}")
    if reparameterize and inputs is None:
        raise ValueError(
            "reparameterize=True needs example_inputs (merging branches follows the recorded shapes), e.g. "
            f"bnfold.{caller}(model, torch.randn(1, 3, 224, 224), reparameterize=True)"
        )
    if equalize and verify == "layers":
        raise ValueError(
            "verify='layers' cannot check equalize=True (equalization scales the layers between the folds): "
            "leave verify='outputs' to check the folded and equalized model end to end"
        )
    rules, kinds = build_rules(extra_rules), build_kinds(extra_kinds)
    every = equalize == "all"
    return FoldOptions(inputs, rules, kinds, inplace, verify, reparameterize, bool(equalize), every, hints, caller)
