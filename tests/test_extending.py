"""What it takes to extend bnfold, shown by doing it: a new norm type is one entry, a new look-through op
is one entry, a rule speaks for its own pair only, and a new kind of fold is one pass plus one surgery
step (and its role for the per-layer check); a norm rule refuses either direction, says what remains of a
folded norm (a replacement, or the norm itself made neutral), and speaks before any built-in judgment of its
type."""

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
from bnfold.rules.norms import elementwise_affine, identity_affine

from helpers import Chain, assert_same_state, check_fold, max_rel_diff, state_snapshot


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
    weight = model.s0.weight.detach().clone()
    with pytest.raises(bnfold.VerificationError):  # a failed check in place takes the new kind's edits back too
        bnfold.fold(model, x, inplace=True, extra_rules=[_wrong_rule()], extra_kinds=[GAIN])
    assert isinstance(model.s1, Gain) and torch.equal(model.s0.weight, weight)


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
    step.log.map_output(producer, 1 / s, torch.zeros_like(s), "conv")  # through the public edits
    step.log.scale_weight(consumer, s_in, "conv", "input")


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


# -- a norm rule's refusals, its residue, and its precedence over built-in judgments -----------------------

LN_STATISTICS = "it normalizes each input with its own statistics, which the layer before it cannot absorb"
LAYER_NORM_RULE = bnfold.NormRule(
    nn.LayerNorm,
    affine=lambda n: (n.weight.double(), n.bias.double()),  # only its elementwise affine moves
    check=lambda n: None,
    channel_axis=lambda n, ndim: ndim - 1,
    neutral=lambda n: {"weight": torch.ones_like(n.weight), "bias": torch.zeros_like(n.bias)},
    backward=lambda n: LN_STATISTICS,
)


def _layer_norm_model(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(dtype).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.normal_()
    return model


def test_a_user_rule_is_consulted_before_the_builtin_judgment_of_its_type():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    assert "its own statistics" in bnfold.plan(model, x).kept[0].reason  # without a rule of the user's
    rule = bnfold.NormRule(
        nn.LayerNorm,
        affine=lambda n: (n.weight.double(), n.bias.double()),
        check=lambda n: "mine",
        channel_axis=lambda n, ndim: ndim - 1,
    )
    (kept,) = bnfold.plan(model, x, extra_rules=[rule]).kept
    assert kept.reason == "mine"
    # a pair rule of the user's for the type is consulted first too
    pair = bnfold.FoldRule(nn.Linear, nn.LayerNorm, "forward", check=lambda n: "my pair")
    assert bnfold.plan(model, x, extra_rules=[pair]).kept[0].reason.endswith("; forward: my pair")


@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)], ids=["N,C", "N,T,C"])
def test_a_layer_norm_affine_moves_into_the_layer_after_it_and_the_norm_stays_neutral(shape):
    model = _layer_norm_model()
    x = torch.randn(shape, dtype=torch.float64)
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(x)
    result = bnfold.fold_with_report(model, x, extra_rules=[LAYER_NORM_RULE])  # checked on x by bnfold
    (site,) = result.report.plan.sites
    assert (site.norm, site.partners, site.kind) == ("1", ("2",), "forward")
    assert "folded" in str(result.report.plan) and "-> 2" in str(result.report.plan)
    folded = result.model
    assert type(folded[1]) is nn.LayerNorm and list(folded.state_dict()) == keys
    assert torch.equal(folded[1].weight, torch.ones(16, dtype=torch.float64))
    assert torch.equal(folded[1].bias, torch.zeros(16, dtype=torch.float64))
    assert not torch.equal(model[1].weight, folded[1].weight)  # the original is untouched
    with torch.no_grad():
        actual = folded(x)
    assert max_rel_diff(expected, actual) < 1e-9
    layers = bnfold.fold_with_report(model, x, extra_rules=[LAYER_NORM_RULE], verify="layers")
    assert layers.report.checked == "layers" and max_rel_diff(expected, layers.model(x).detach()) < 1e-9


def test_folding_in_place_makes_the_same_norm_neutral():
    model = _layer_norm_model()
    norm, x = model[1], torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    folded = bnfold.fold(model, x, inplace=True, extra_rules=[LAYER_NORM_RULE])
    assert folded is model and folded[1] is norm and bool((norm.weight == 1).all())
    assert max_rel_diff(expected, folded(x).detach()) < 1e-9


def test_a_rule_refuses_the_backward_direction_while_forward_works():
    x = torch.randn(4, 8, dtype=torch.float64)
    # the layer before it could take it, but the rule says why not: it folds forward
    (site,) = bnfold.plan(_layer_norm_model(), x, extra_rules=[LAYER_NORM_RULE]).sites
    assert site.kind == "forward"
    # nothing after it: kept, with the rule's backward reason in the plan
    last = _layer_norm_model()[:2]
    plan = bnfold.plan(last, x, extra_rules=[LAYER_NORM_RULE])
    (kept,) = plan.kept
    assert kept.reason.startswith(f"{LN_STATISTICS}; forward: ") and LN_STATISTICS in str(plan)
    # without the refusal the same rule would fold backward: the refusal is what keeps it out of '0'
    naive = dataclasses.replace(LAYER_NORM_RULE, backward=lambda n: None)
    (wrong,) = bnfold.plan(last, x, extra_rules=[naive]).sites
    assert (wrong.kind, wrong.partners) == ("backward", ("0",))


def test_norm_rules_refuse_either_direction_with_their_reason():
    x = torch.randn(2, 3, 8, 8)
    model = Chain(nn.Conv2d(3, 4, 1), ChannelAffine(4), nn.Conv2d(4, 2, 1)).eval()
    assert bnfold.plan(model, x, extra_rules=[AFFINE_RULE]).sites[0].kind == "backward"
    not_back = dataclasses.replace(AFFINE_RULE, backward=lambda m: "not into the layer before")
    result = check_fold(model, x, folded=1, kept=0, randomize=False, extra_rules=[not_back])
    assert result.report.plan.sites[0].partners == ("s2",)
    not_either = dataclasses.replace(not_back, forward=lambda m: "not into the layers after")
    (kept,) = bnfold.plan(model, x, extra_rules=[not_either]).kept
    assert kept.reason == "not into the layer before; forward: not into the layers after"


def test_the_forward_pass_follows_the_norms_channel_axis():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    axis_one = dataclasses.replace(LAYER_NORM_RULE, channel_axis=lambda n, ndim: 1)
    (kept,) = bnfold.plan(_layer_norm_model(), x, extra_rules=[axis_one]).kept
    assert "its channels reach '2' on axis 1" in kept.reason
    # channels last, through a permute that moves them to axis 1 of a conv's input
    model = Chain(nn.Linear(8, 6), nn.LayerNorm(6), lambda t: t.permute(0, 2, 1), nn.Conv1d(6, 3, 1))
    model = model.double().eval()
    with torch.no_grad():
        model.s1.weight.uniform_(0.5, 2.0)
        model.s1.bias.normal_()
    result = check_fold(model, x, folded=1, kept=0, randomize=False, extra_rules=[LAYER_NORM_RULE])
    assert result.report.plan.sites[0].partners == ("s3",)
    assert bool((result.model.s1.weight == 1).all())


def test_folding_a_neutral_norm_again_is_a_no_op():
    model = _layer_norm_model()
    x = torch.randn(4, 8, dtype=torch.float64)
    once = bnfold.fold(model, x, extra_rules=[LAYER_NORM_RULE])
    before = state_snapshot(once)
    again = bnfold.fold_with_report(once, x, extra_rules=[LAYER_NORM_RULE])
    plan = again.report.plan
    assert (len(plan.sites), len(plan.kept)) == (0, 1)
    assert plan.kept[0].reason == "its affine is already the identity: nothing to fold"
    assert_same_state(again.model, before)
    assert_same_state(once, before)
    # a neutral norm with only some of its values neutral still has something to fold
    with torch.no_grad():
        once[1].bias.add_(0.5)
    assert bnfold.plan(once, x, extra_rules=[LAYER_NORM_RULE]).sites[0].partners == ("2",)


def test_a_neutral_norm_folds_into_every_layer_that_reads_it():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8, bias=False), nn.Linear(16, 8)

        def forward(self, x):
            x = self.norm(x)
            return torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1) @ self.v(x)

    model = Attention().double().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)
        model.norm.bias.normal_()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    result = check_fold(model, x, folded=1, kept=0, randomize=False, extra_rules=[LAYER_NORM_RULE])
    assert result.report.plan.sites[0].partners == ("q", "k", "v")
    assert bool((result.model.norm.weight == 1).all()) and result.model.k.bias is not None
    # a norm without an affine has nothing to fold
    plain = bnfold.NormRule(nn.LayerNorm, affine=elementwise_affine, check=lambda n: None, neutral=identity_affine)
    model.norm = nn.LayerNorm(16, elementwise_affine=False).double()
    (kept,) = bnfold.plan(model, x, extra_rules=[plain]).kept
    assert kept.reason == "its affine is already the identity: nothing to fold"


def _wrong_scale(n: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return n.weight.double() * 1.5, n.bias.double()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    "wrong",
    [
        dataclasses.replace(LAYER_NORM_RULE, affine=_wrong_scale),
        dataclasses.replace(LAYER_NORM_RULE, backward=lambda n: None),  # folds backward, across its statistics
    ],
    ids=["wrong affine", "no backward refusal"],
)
def test_a_failed_check_puts_a_neutralized_norm_back_bit_identically(wrong, inplace):
    model = _layer_norm_model(torch.float32)
    x = torch.randn(4, 8)
    before = state_snapshot(model)
    with pytest.raises(bnfold.VerificationError):
        bnfold.fold(model, x, inplace=inplace, extra_rules=[wrong])
    assert_same_state(model, before)
    assert [type(m) for m in model] == [nn.Linear, nn.LayerNorm, nn.Linear]
    assert model[2].bias is not None and model[0].weight.requires_grad


def test_a_norm_rule_is_either_replaced_or_made_neutral():
    with pytest.raises(ValueError, match=r"NormRule\(LayerNorm\): a folded norm is either replaced"):
        bnfold.NormRule(nn.LayerNorm, replacement=lambda n: nn.Identity(), neutral=identity_affine)
    with pytest.raises(ValueError, match=r"FoldRule\(Linear, LayerNorm\): a folded norm is either replaced"):
        bnfold.FoldRule(nn.Linear, nn.LayerNorm, replacement=lambda n: nn.Identity(), neutral=identity_affine)


def test_the_builtin_helpers_for_an_elementwise_affine():
    norm = nn.LayerNorm(4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    scale, shift = elementwise_affine(norm)
    assert scale.dtype == torch.float64 and torch.equal(scale, norm.weight.double())
    assert torch.equal(shift, norm.bias.double())
    no_bias = nn.LayerNorm(4, bias=False)
    assert torch.equal(elementwise_affine(no_bias)[1], torch.zeros(4, dtype=torch.float64))
    assert set(identity_affine(no_bias)) == {"weight"}
    rule = bnfold.NormRule(nn.LayerNorm, affine=elementwise_affine, neutral=identity_affine)
    assert not rule.is_neutral(norm) and rule.is_neutral(nn.LayerNorm(4))
    assert not rule.is_linear(nn.LayerNorm(4))  # it stays, and still normalizes
