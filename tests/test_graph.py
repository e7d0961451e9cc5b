"""The execution tracer: which reads count as uses of a value, and what runs without side effects."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bnfold

from helpers import Model, check_fold, randomize_norms


def test_metadata_reads_do_not_block_folding():
    def reads_shape(m, x: torch.Tensor) -> torch.Tensor:
        y = m.conv(x)
        n, c = y.shape[0], y.size(1)  # metadata only: folding does not change shapes
        assert y.dim() == 4 and y.dtype == torch.float32
        return m.bn(y).reshape(n, c, -1)

    model = Model(reads_shape, conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))
    check_fold(model.eval(), torch.randn(2, 3, 6, 6), folded=1, kept=0)


def test_value_reads_block_folding():
    def reads_value(m, x: torch.Tensor) -> torch.Tensor:
        y = m.conv(x)
        peak = y.max().item()  # a value: it would change
        return m.bn(y) * (1.0 if peak > -1e9 else 0.0)

    model = Model(reads_value, conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))
    result = check_fold(model.eval(), torch.randn(2, 3, 6, 6), folded=0, kept=1)
    assert "Tensor.max" in result.report.plan.kept[0].reason


def test_tracing_leaves_buffers_rng_and_flags_alone():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="training mode") as record:
        bnfold.plan(model, x)
    assert record[0].filename == __file__  # the warning points at the caller's line
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


def test_module_registered_under_two_names_is_replaced_everywhere():
    bn = nn.BatchNorm2d(4)
    model = Model(lambda m, x: m.bn(m.conv(x)), conv=nn.Conv2d(3, 4, 3), bn=bn, same_bn=bn)
    result = check_fold(model.eval(), torch.randn(2, 3, 6, 6), folded=1, kept=0)

    assert isinstance(result.model.bn, nn.Identity) and result.model.same_bn is result.model.bn


def test_bnfold_works_without_torchvision_and_timm(tmp_path):
    for name in ("torchvision", "timm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed')\n")
    script = textwrap.dedent(
        """
        import torch, bnfold
        from torch import nn
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        folded = bnfold.fold(m, torch.randn(1, 3, 8, 8))
        assert isinstance(folded[1], nn.Identity)
        print("ok", bnfold.rules.third_party.norm_act_types(), bnfold.rules.third_party.frozen_batchnorm_types())
        """
    )
    source = os.path.dirname(os.path.dirname(bnfold.__file__))  # this checkout's bnfold, not another one
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), source]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok () ()"


# -- in-place writes through aliases -----------------------------------------------------------------
class _Tagged(torch.Tensor):
    """A Tensor subclass: an alias of the same storage that is neither a view nor a detach."""


def _alias(kind: str, h: torch.Tensor) -> torch.Tensor:
    """A tensor that shares ``h``'s memory without being ``h`` (most have no ``_base``)."""
    if kind == "detach":
        return h.detach()
    if kind == "data":
        return h.data  # not even the same version counter
    if kind == "view":
        return h.view(-1)
    if kind == "as_strided":
        return h.as_strided((h.numel(),), (1,))
    if kind == "set_":
        return torch.empty(0).set_(h.untyped_storage(), h.storage_offset(), h.shape, h.stride())
    return h.as_subclass(_Tagged)


class WritesThroughAlias(nn.Module):
    """A write through an alias: ``h`` is changed in place after ``bn`` read it, so ``bn`` may not
    fold forward into ``fc1`` (which would then read the changed ``h``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc0, self.bn, self.fc1 = nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc0(x)
        y = self.bn(h)  # h is read again below, so bn cannot fold backward into fc0
        _alias(self.kind, h).add_(1.0)
        return self.fc1(y).argmax(1)


@pytest.mark.parametrize("kind", ["detach", "data", "view", "as_strided", "set_", "subclass"])
def test_a_write_through_any_alias_after_the_norm_read_is_seen(kind):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    model = WritesThroughAlias(kind).eval()
    model.bn.running_mean.normal_(0, 0.5)
    model.bn.running_var.uniform_(0.3, 3)
    folded = bnfold.fold(model, x)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))
    assert len(bnfold.plan(model, x).kept) == 1


def test_a_write_through_an_alias_of_the_weight_is_a_use_of_the_weight():
    class ClipsItsWeight(nn.Module):
        """Clips the conv's weight in place on every call, through an alias made once (weight clipping):
        a weight scaled by folding would be clipped again."""

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.weight_alias = self.conv.weight.detach()
            self.weight_alias.clamp_(-0.1, 0.1)  # so that calling the original does not change it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.weight_alias.clamp_(-0.1, 0.1)
            return self.bn(self.conv(x))

    model = ClipsItsWeight().eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1)
    assert "changes its parameters in place" in result.report.plan.kept[0].reason


def test_symbolic_effects_name_only_what_is_known_safe():
    """What a torch.fx call may do to its inputs' memory: anything not known to be safe may alias and write."""
    from bnfold.discover.aliasing import Effect, effect_of_function, effect_of_module

    class Mine(nn.Module):
        def forward(self, x):
            return x.mul_(2)

    fresh, view, unknown = Effect(False, False), Effect(True, False), Effect(True, True)
    assert effect_of_module(nn.Conv2d(1, 1, 1)) == effect_of_module(nn.ReLU()) == fresh
    assert effect_of_module(nn.ReLU(inplace=True)) == effect_of_module(Mine()) == unknown
    assert effect_of_module(nn.Identity()) == effect_of_module(nn.Flatten()) == view
    assert effect_of_function("_VariableFunctionsClass.add", {}) == effect_of_function("add", {}) == fresh
    assert effect_of_function("add", {}, python_operator=True) == unknown  # x += y is recorded as x + y
    assert effect_of_function("relu", {"inplace": True}) == effect_of_function("add", {"out": object()}) == unknown
    assert effect_of_function("add_", {}) == effect_of_function("setitem", {}) == unknown
    assert effect_of_function("permute", {}) == effect_of_function("detach", {}) == view
    assert effect_of_function("my_own_function", {}) == unknown
