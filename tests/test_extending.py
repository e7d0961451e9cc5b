"""What it takes to extend bnfold, shown by doing it: a new norm type is one entry, a new look-through op
is one entry, a rule speaks for its own pair only, and a new kind of fold is one pass plus one surgery
step (and its role for the per-layer check)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import bnfold
from bnfold.apply import surgery
from bnfold.planning.context import Kept, PlanContext, layer_reason
from bnfold.planning.fold_plan import FoldSite, KeptNorm, PlanRow
from bnfold.rules import ops
from bnfold.rules.classes import layer_type

from helpers import Chain, check_fold


class ChannelAffine(nn.Module):
    """A user's own norm: a fixed per-channel affine map stored in two buffers."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("scale", torch.rand(channels) + 0.5)
        self.register_buffer("shift", torch.randn(channels))

    def forward(self, x):
        shape = (-1,) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


AFFINE_RULE = bnfold.NormRule(
    ChannelAffine,
    affine=lambda m: (m.scale.double(), m.shift.double()),
    check=lambda m: None,
)


def test_a_new_norm_type_is_one_entry_for_every_layer_and_both_directions():
    x = torch.randn(2, 3, 8, 8)
    models = {
        "conv, backward": Chain(nn.Conv2d(3, 4, 3), ChannelAffine(4)),
        "conv transpose, backward": Chain(nn.ConvTranspose2d(3, 4, 3, groups=1), ChannelAffine(4)),
        "conv, forward": Chain(ChannelAffine(3), nn.Conv2d(3, 4, 3)),
        "linear, forward through a flatten": Chain(ChannelAffine(3), nn.Flatten(), nn.Linear(3 * 64, 5)),
    }
    for label, model in models.items():
        # unknown to bnfold: not a norm it lists (the constants its forward applies are channel-wise constants)
        rows = bnfold.plan(model.eval(), x).rows
        assert {(r.norm_type, r.norm) for r in rows} <= {
            ("channel-wise mul", "s0.scale"),
            ("channel-wise add", "s0.shift"),
            ("channel-wise mul", "s1.scale"),
            ("channel-wise add", "s1.shift"),
        }, label
        result = check_fold(model.eval(), x, folded=1, kept=0, randomize=False, extra_rules=[AFFINE_RULE])
        assert result.report.plan.sites[0].kind == label.split(", ")[1].split()[0], label


def test_a_rule_speaks_for_its_own_pair_only():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)).eval()
    rule = bnfold.FoldRule(nn.Conv1d, nn.BatchNorm1d, check=lambda n: "refused by a Conv1d rule")
    result = check_fold(model, torch.randn(4, 6), folded=1, kept=0, extra_rules=[rule])
    assert result.report.plan.sites[0].partners == ("0",)
    conv = nn.Sequential(nn.Conv1d(6, 8, 1), nn.BatchNorm1d(8)).eval()
    kept = check_fold(conv, torch.randn(4, 6, 5), folded=0, kept=1, extra_rules=[rule])
    assert kept.report.plan.kept[0].reason.startswith("refused by a Conv1d rule; forward: ")


def test_a_new_look_through_op_is_one_entry(monkeypatch):
    model = Chain(nn.Conv2d(3, 4, 1), lambda y: y.flip(3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 5, 5)
    assert len(bnfold.plan(model, x).sites) == 0  # flip is not in the table: the path ends

    def flip(call, axis):  # elements move along the flipped axes only
        dims = call.args[1] if len(call.args) > 1 else call.kwargs.get("dims")
        flipped = {d % len(call.input_shapes[0]) for d in ((dims,) if isinstance(dims, int) else dims)}
        return None if axis in flipped else ops.AxisMove(axis)

    monkeypatch.setitem(ops._FUNCTIONS, "Tensor.flip", ops.OpEntry("moved", flip))
    check_fold(model, x, folded=1, kept=0)
    across = Chain(nn.Conv2d(3, 4, 1), lambda y: y.flip(1), nn.BatchNorm2d(4)).eval()
    check_fold(across, x, folded=0, kept=1)  # a flip of the channels still ends the path


class Gain(nn.Module):
    """A user's module that multiplies by a scalar: ``x * self.g``. The scalar is a plain attribute: a module
    without children of the user's own that holds parameters or buffers is looked into op by op (its constants
    are channel-wise constants), while this one is one step of the trace, which the new pass recognises."""

    def __init__(self):
        super().__init__()
        self.g = 1.7

    def forward(self, x):
        return x * self.g


def _gain_rows(ctx: PlanContext) -> list[PlanRow]:
    """A new pass: a Gain right after a layer folds into it."""
    rows: list[PlanRow] = []
    for call in ctx.graph.calls:
        if call.kind != "module" or not isinstance(call.module, Gain):
            continue
        name = ctx.name(call.module)
        source = ctx.graph.calls[ctx.graph.producer[call.inputs[0]]]
        try:
            if source.module is None or not isinstance(source.module, nn.Conv2d):
                raise Kept("its input does not come from a Conv2d")
            if ctx.graph.consumers[call.inputs[0]] != [call.index]:
                raise Kept("the conv's output is also read elsewhere")
            reason = layer_reason(source.module, ctx)
            if reason:
                raise Kept(reason)
            partner = ctx.name(source.module)
            rows.append(FoldSite(name, "Gain", (partner,), (layer_type(source.module).__name__,), "gain"))  # type: ignore[arg-type]  # a kind of this test's own
        except Kept as keep:
            rows.append(KeptNorm(name, "Gain", keep.reason))
    return rows


def _apply_gain(step: surgery.Surgery, site: FoldSite) -> None:
    """Its surgery step: scale the conv's weight and bias, and take the Gain out."""
    gain, conv = step.modules[site.norm], step.modules[site.partners[0]]
    with torch.no_grad():
        conv.weight.mul_(gain.g)
        if conv.bias is not None:
            conv.bias.mul_(gain.g)
    for parent, attr in step.parents[id(gain)]:
        parent._modules[attr] = nn.Identity()


GAIN = bnfold.FoldKind("gain", _apply_gain, bnfold.ProbeRole("after"), _gain_rows, order=40)


def test_a_new_kind_of_fold_is_one_registered_object():
    model = Chain(nn.Conv2d(3, 4, 3), Gain(), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert [s.kind for s in bnfold.plan(model, x).sites] == ["backward"]  # unknown without the kind
    result = check_fold(model, x, folded=2, kept=0, extra_kinds=[GAIN])
    assert sorted(s.kind for s in result.report.plan.sites) == ["backward", "gain"]
    assert isinstance(result.model.s1, nn.Identity) and isinstance(model.s1, Gain)
    layers = bnfold.fold_with_report(model, x, verify="layers", extra_kinds=[GAIN])  # the per-layer check knows it
    assert layers.report.checked == "layers" and layers.report.max_abs_error < 1e-5
    assert ["s1", "Gain", "folded", "<-", "s0"] in [line.split() for line in str(result.report.plan).splitlines()]
    assert [s.kind for s in bnfold.plan(model, x).sites] == ["backward"]  # nothing was registered for good


def test_a_kind_is_checked_when_it_is_given():
    with pytest.raises(ValueError, match="a kind named 'backward' exists already"):
        bnfold.fold(nn.Linear(2, 2), torch.randn(1, 2), extra_kinds=[dataclasses.replace(GAIN, name="backward")])
    with pytest.raises(TypeError, match="extra_kinds must be a list of FoldKind"):
        bnfold.plan(nn.Linear(2, 2), torch.randn(1, 2), extra_kinds=GAIN)
    with pytest.raises(TypeError, match="probe must be a ProbeRole"):
        bnfold.FoldKind("x", _apply_gain, "after")  # type: ignore[arg-type]


def _balance_rows(ctx: PlanContext) -> list[PlanRow]:
    """A kind over several layers: a positive per-channel scale moved from a conv's output channels, across
    the ReLU that reads it, to the input channels of the conv that reads the ReLU (exact: relu(s x) = s relu(x)
    for s > 0). The row is named for the ReLU it crosses."""
    rows: list[PlanRow] = []
    graph = ctx.graph
    for call in graph.calls:
        if call.kind != "module" or type(call.module) is not nn.ReLU:
            continue
        source = graph.calls[graph.producer[call.inputs[0]]]
        readers = [graph.calls[i] for i in graph.consumers.get(call.outputs[0], [])]
        convs = [source.module, *(r.module for r in readers)]
        if len(readers) == 1 and all(type(m) is nn.Conv2d and m.groups == 1 for m in convs):
            names = tuple(ctx.name(m) for m in convs)
            rows.append(FoldSite(ctx.name(call.module), "ReLU", names, ("Conv2d", "Conv2d"), "balance"))
    return rows


def _apply_balance(step: surgery.Surgery, site: FoldSite, compensate: bool = True) -> None:
    producer, consumer = (step.modules[name] for name in site.partners)
    r1 = producer.weight.detach().double().abs().amax(dim=(1, 2, 3))
    r2 = consumer.weight.detach().double().abs().amax(dim=(0, 2, 3))
    s = torch.sqrt(r1 * r2) / r2  # equal ranges on both sides
    s_in = s if compensate else torch.ones_like(s)
    for t, scale in (
        (producer.weight, 1 / s.view(-1, 1, 1, 1)),
        (producer.bias, 1 / s),
        (consumer.weight, s_in.view(1, -1, 1, 1)),
    ):
        old = t.detach().clone()
        with torch.no_grad():
            t.copy_((t.double() * scale).to(t.dtype))
        step.undo.append(lambda t=t, old=old: t.data.copy_(old))


BALANCE = bnfold.FoldKind("balance", _apply_balance, bnfold.ProbeRole("span"), _balance_rows, residue="none")


def test_a_kind_that_spans_several_layers_is_probed_from_the_first_to_the_last():
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3)
    with torch.no_grad():
        first.weight.mul_(torch.logspace(-2, 1, 6).view(-1, 1, 1, 1))  # ranges spread over three decades
    model = Chain(first, nn.ReLU(), second).eval()
    x = torch.randn(2, 3, 12, 12)
    result = check_fold(model, x, folded=1, kept=0, randomize=False, extra_kinds=[BALANCE])
    r1 = result.model.s0.weight.detach().abs().amax(dim=(1, 2, 3))
    r2 = result.model.s2.weight.detach().abs().amax(dim=(0, 2, 3))
    assert torch.allclose(r1, r2, rtol=1e-5)  # each channel's range is the same on both sides now
    assert r1.max() / r1.min() < 40  # three decades of spread became one and a half
    layers = bnfold.fold_with_report(model, x, verify="layers", extra_kinds=[BALANCE])
    assert layers.report.checked == "layers" and layers.report.max_rel_error < 1e-5
    # a wrong scale (the consumer not compensated) is caught by the per-layer check of the span
    before = first.weight.detach().clone()
    broken = dataclasses.replace(BALANCE, step=lambda step, site: _apply_balance(step, site, compensate=False))
    with pytest.raises(bnfold.VerificationError):
        bnfold.fold(model, x, verify="layers", extra_kinds=[broken])
    with pytest.raises(bnfold.VerificationError):
        bnfold.fold(model, x, inplace=True, extra_kinds=[broken])
    assert torch.equal(model.s0.weight, before)  # the failed fold in place was undone
