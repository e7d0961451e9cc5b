"""What it takes to extend bnfold, shown by doing it: a new norm type is one entry, a new look-through op
is one entry, a rule speaks for its own pair only, and a new kind of fold is one pass plus one surgery
step (and its role for the per-layer check)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.apply import surgery
from bnfold.check import per_layer as layercheck
from bnfold.check.per_layer import ProbeRole
from bnfold.planning import planner
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
    """Its surgery step, made of public edits (so a failed check takes it back): scale the conv's output
    channels, and put an Identity wherever the Gain is registered."""
    gain, conv = step.modules[site.norm], step.modules[site.partners[0]]
    scale = torch.full((conv.out_channels,), gain.g, dtype=torch.float64)
    step.log.map_output(conv, scale, torch.zeros_like(scale), "conv")
    step.log.replace(gain, nn.Identity(), step.parents[id(gain)])


def _wrong_rule() -> bnfold.FoldRule:
    def wrong_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = bnfold.rules.norms.norm_affine(norm)
        return scale * 2, shift

    return bnfold.FoldRule(nn.Conv2d, nn.BatchNorm2d, affine=wrong_affine)


def test_a_new_kind_of_fold_is_one_pass_and_one_surgery_step(monkeypatch):
    monkeypatch.setattr(planner, "PASSES", (*planner.PASSES, _gain_rows))
    monkeypatch.setitem(surgery.STEPS, "gain", _apply_gain)
    monkeypatch.setitem(layercheck.PROBE_ROLES, "gain", ProbeRole("after"))
    model = Chain(nn.Conv2d(3, 4, 3), Gain(), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()
    x = torch.randn(2, 3, 8, 8)
    result = check_fold(model, x, folded=2, kept=0)
    assert sorted(s.kind for s in result.report.plan.sites) == ["backward", "gain"]
    assert isinstance(result.model.s1, nn.Identity) and isinstance(model.s1, Gain)
    layers = bnfold.fold_with_report(model, x, verify="layers")  # the per-layer check knows the new kind
    assert layers.report.checked == "layers" and layers.report.max_abs_error < 1e-5
    weight = model.s0.weight.detach().clone()
    with pytest.raises(bnfold.VerificationError):  # a failed check in place takes the new kind's edits back too
        bnfold.fold(model, x, inplace=True, extra_rules=[_wrong_rule()])
    assert isinstance(model.s1, Gain) and torch.equal(model.s0.weight, weight)
    assert "gain" in str(result.report.plan) or "<- s0" in str(result.report.plan)
