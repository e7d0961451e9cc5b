"""Which class a module counts as when bnfold looks up what it knows about it.

A subclass that only changes construction (torchvision's ``Conv3DSimple`` is a
``Conv3d`` with its own ``__init__``) computes exactly like its base, so the
base's entries apply to it. A subclass that overrides how its class computes
(timm's ``BatchNormAct2d`` also applies an activation) never matches its base
implicitly: it needs entries of its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["layer_type", "type_chain", "has_type"]


def layer_type(module: nn.Module) -> type[nn.Module]:
    """The module's class as its author declared it: for a module behind ``torch.nn.utils.parametrize``
    (whose class becomes a generated ``Parametrized<Name>`` subclass), the class it had before."""
    kind = type(module)
    # the name first: is_parametrized looks the attribute up through nn.Module.__getattr__, slowly
    if kind.__name__ == "Parametrized" + kind.__bases__[0].__name__ and parametrize.is_parametrized(module):
        return kind.__bases__[0]
    return kind


# Methods a subclass may override without changing what a forward pass computes.
_CONSTRUCTION_ONLY = frozenset(
    {
        "__init__",
        "__init_subclass__",
        "__repr__",
        "extra_repr",
        "reset_parameters",
        "__setstate__",
        "__getstate__",
        "_load_from_state_dict",
        "__dict__",
        "__weakref__",
    }
)


def _changes_computation(cls: type, base: type) -> bool:
    """Whether ``cls`` overrides a method or descriptor of ``base`` other than construction ones."""
    for name, value in vars(cls).items():
        if name in _CONSTRUCTION_ONLY or not hasattr(base, name):
            continue  # a name the base does not have cannot change the base's own code
        if callable(value) or hasattr(value, "__get__"):
            return True
    return False


_CHAINS: weakref.WeakKeyDictionary[type, tuple[type[nn.Module], ...]] = weakref.WeakKeyDictionary()


def _chain(kind: type[nn.Module]) -> tuple[type[nn.Module], ...]:
    cached = _CHAINS.get(kind)
    if cached is not None:
        return cached
    chain = [kind]
    cls: type = kind
    while len(cls.__bases__) == 1:
        base = cls.__bases__[0]
        if base is nn.Module or not issubclass(base, nn.Module) or _changes_computation(cls, base):
            break
        chain.append(base)
        cls = base
    _CHAINS[kind] = tuple(chain)
    return _CHAINS[kind]


def type_chain(module: nn.Module) -> tuple[type[nn.Module], ...]:
    """The module's declared class, then each ancestor that computes exactly like it (single inheritance,
    nothing overridden but construction): the classes whose entries apply, most specific first.

    >>> class MyConv(nn.Conv2d):
    ...     def __init__(self, c):
    ...         super().__init__(c, c, 3, bias=False)
    >>> [k.__name__ for k in type_chain(MyConv(4))]
    ['MyConv', 'Conv2d']
    """
    return _chain(layer_type(module))


def has_type(module: nn.Module, types: Iterable[type[nn.Module]]) -> bool:
    """Whether an entry for one of ``types`` applies to ``module`` (see :func:`type_chain`)."""
    wanted = types if isinstance(types, (set, frozenset)) else set(types)
    return any(kind in wanted for kind in type_chain(module))
