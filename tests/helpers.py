"""Shared helpers for the tests: randomized norm statistics, output comparison, and the builders of small
hand-made models (``Chain`` and ``Model``)."""

from __future__ import annotations

import torch
from torch import nn

from bnfold.discover.nested import leaves
from bnfold.testing import randomize_norms

__all__ = ["randomize_norms", "max_rel_diff", "state_snapshot", "assert_same_state", "check_fold", "Chain", "Model"]


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).abs().max() / a64.abs().max().clamp_min(1e-12))


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(now[k].detach(), v), k


def check_fold(model: nn.Module, example_inputs, *, folded: int, kept: int, randomize: bool = True, **kwargs):
    """Fold ``model`` on ``example_inputs``; assert the counts, that outputs match independently of bnfold's
    own check, and that the original model was not touched. Returns the FoldResult."""
    import bnfold

    if randomize:
        randomize_norms(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    before = state_snapshot(model)
    with torch.no_grad():
        expected = model(*args)
    result = bnfold.fold_with_report(model, example_inputs, **kwargs)
    plan = result.report.plan
    assert (len(plan.sites), len(plan.kept)) == (folded, kept), str(plan)
    if not kwargs.get("inplace"):
        assert_same_state(model, before)
    with torch.no_grad():
        actual = result.model(*args)
    flat_e, flat_a = [leaf for _, leaf in leaves(expected)], [leaf for _, leaf in leaves(actual)]
    assert len(flat_e) == len(flat_a)
    for e, a in zip(flat_e, flat_a, strict=True):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            assert max_rel_diff(e, a) < 1e-5, max_rel_diff(e, a)
        elif isinstance(e, torch.Tensor):
            assert torch.equal(e, a)
        else:
            assert e == a
    return result


class Chain(nn.Module):
    """A model that applies its steps in order: modules (registered as ``s0``, ``s1``, ...) and plain
    functions of the running tensor (``lambda y: y.permute(0, 2, 3, 1)``). The shared builder for small
    hand-made models: ``Chain(nn.Conv2d(3, 4, 1), lambda y: y.clone(), nn.BatchNorm2d(4))``."""

    def __init__(self, *steps):
        super().__init__()
        self.funcs = {}
        for i, step in enumerate(steps):
            if isinstance(step, nn.Module):
                self.add_module(f"s{i}", step)
            else:
                self.funcs[i] = step
        self.count = len(steps)

    def forward(self, x):
        for i in range(self.count):
            x = self.funcs[i](x) if i in self.funcs else getattr(self, f"s{i}")(x)
        return x


class Model(nn.Module):
    """A model whose ``forward`` is the given function of the model and its inputs, with ``parts`` registered
    under their keyword names, in the order given: modules as submodules, ``nn.Parameter``s as parameters,
    other tensors as buffers, anything else (a function) as a plain attribute. The shared builder for small
    hand-made models that are more than a chain; a multi-line forward is a local ``def forward(m, x)``:

    ``Model(lambda m, x: m.bn(m.conv(x)) * m.scale, conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4),
    scale=nn.Parameter(torch.rand(4, 1, 1)))``"""

    def __init__(self, forward, /, **parts):
        super().__init__()
        # a class of its own whose forward is the function itself: torch.fx (a plan without example inputs)
        # reads the inputs from the class's forward, and deep copies keep the class
        self.__class__ = type(type(self).__name__, (type(self),), {"forward": forward})
        for name, part in parts.items():
            if isinstance(part, nn.Module):
                self.add_module(name, part)
            elif isinstance(part, nn.Parameter):
                self.register_parameter(name, part)
            elif isinstance(part, torch.Tensor):
                self.register_buffer(name, part)
            else:
                setattr(self, name, part)
