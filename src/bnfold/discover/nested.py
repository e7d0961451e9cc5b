"""Walking what a model takes and returns: tensors nested in tuples, lists, named tuples and dicts
(Hugging Face ``ModelOutput`` included), in one place for the tracer, the checks and the tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

__all__ = ["iter_tensors", "leaves", "detached_copy"]


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside nested tuples, lists and dicts, in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from iter_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from iter_tensors(item)


def leaves(obj: Any, path: str = "output") -> list[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of nested tuples, lists and dicts, the path written as an index.

    >>> [p for p, _ in leaves((1, {"a": 2}))]
    ['output[0]', "output[1]['a']"]
    """
    if isinstance(obj, (tuple, list)):
        return [leaf for i, item in enumerate(obj) for leaf in leaves(item, f"{path}[{i}]")]
    if isinstance(obj, dict):
        return [leaf for k, item in obj.items() for leaf in leaves(item, f"{path}[{k!r}]")]
    return [(path, obj)]


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with every tensor inside nested tuples (named ones too), lists and dicts replaced by ``fn(t)``.

    >>> import torch
    >>> map_tensors((torch.ones(1), [2]), lambda t: t * 3)
    (tensor([3.]), [2])
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(o, fn) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def detached_copy(obj: Any) -> Any:
    """A copy of nested tuples/lists/dicts with every tensor detached and cloned (models may change
    their inputs in place; the caller's tensors must not be touched)."""
    return map_tensors(obj, lambda t: t.detach().clone())
