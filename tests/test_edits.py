"""Reversible edits (bnfold.apply.edits): each edit, taken back, leaves the model bit-identical (tensors and their
strides, parametrizations, hooks, the module tree, training flags); a module registered under two names is
replaced and restored under both; a log without a way back still scales weights in place; and the record of
a fold written from its log is the one found by comparing the folded model with the original."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize, prune

import bnfold
from bnfold.apply import surgery
from bnfold.apply.edits import EditLog, Replaced, places
from bnfold.apply.records import describe_fold, record_of_edits
from bnfold.apply.surgery import apply_plan, clone_model, copy_and_fold
from bnfold.planning.fold_plan import FoldSite
from bnfold.rules.table import build_rules

from helpers import randomize_norms


# -- a model, bit for bit ------------------------------------------------------------------------------------
def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.detach().reshape(-1)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything an edit could change, by path: each module's identity, class, mode, children, hooks and
    tensor names; each tensor's identity (but a derived one's), dtype, shape, strides, grad flag and bits."""
    found: dict[str, Any] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        found[f"module {path}"] = (
            id(module),
            type(module),
            module.training,
            tuple((k, id(v)) for k, v in module._modules.items()),
            tuple(module._forward_pre_hooks),
            tuple(module._forward_hooks),
            tuple(module._parameters),
            tuple(module._buffers),
            tuple(sorted(module._non_persistent_buffers_set)),
        )
        tensors = {**module._parameters, **module._buffers}
        # a weight a pre-hook computes (pruning, the older weight_norm): a new tensor at each forward, same bits
        derived = {k: v for k, v in vars(module).items() if isinstance(v, Tensor)}
        for name, t in {**tensors, **derived}.items():
            if t is None:
                found[f"tensor {path}.{name}"] = None
                continue
            found[f"tensor {path}.{name}"] = (
                None if name in derived else id(t),
                t.dtype,
                tuple(t.shape),
                t.stride(),
                t.storage_offset(),
                t.requires_grad,
                _bits(t).tolist(),
            )
    return found


def assert_bit_identical(model: nn.Module, before: dict[str, Any]) -> None:
    now = fingerprint(model)
    assert list(now) == list(before)
    for key, value in before.items():
        assert now[key] == value, key


# -- layers with weights where bnfold finds them -------------------------------------------------------------
class Offset(nn.Module):
    def forward(self, b: Tensor) -> Tensor:
        return b + 0.25


def _plain(layer: nn.Module) -> nn.Module:
    return layer


def _parametrized(layer: nn.Module) -> nn.Module:
    return parametrizations.weight_norm(layer)


def _pruned(layer: nn.Module) -> nn.Module:
    prune.l1_unstructured(layer, "weight", 0.3)
    return layer


def _old_weight_norm(layer: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated for the parametrization, still met in checkpoints
        return nn.utils.weight_norm(layer)


def _parametrized_bias(layer: nn.Module) -> nn.Module:
    parametrize.register_parametrization(layer, "bias", Offset())
    return layer


WEIGHTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "plain": _plain,
    "parametrized": _parametrized,
    "pruned": _pruned,
    "old weight_norm": _old_weight_norm,
    "parametrized bias": _parametrized_bias,
}

# (layer, its layout, output channels, input channels)
LAYERS: dict[str, tuple[Callable[[], nn.Module], str, int, int]] = {
    "conv": (lambda: nn.Conv2d(4, 6, 3), "conv", 6, 4),
    "grouped conv": (lambda: nn.Conv2d(4, 6, 3, groups=2), "conv", 6, 4),
    "conv transpose, groups": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), "conv_transpose", 6, 4),
    "linear without bias": (lambda: nn.Linear(4, 6, bias=False), "linear", 6, 4),
}


def _layer(kind: str, where: str) -> tuple[nn.Module, str, int, int]:
    make, layout, out, inp = LAYERS[kind]
    torch.manual_seed(0)
    return WEIGHTS[where](make()), layout, out, inp


# every layer with its weight in every place, but a parametrized bias only where there is a bias
PLACES = [
    (kind, where)
    for kind in LAYERS
    for where in WEIGHTS
    if (kind, where) != ("linear without bias", "parametrized bias")
]


def _scale(n: int) -> Tensor:
    return torch.linspace(0.5, 2.0, n, dtype=torch.float64)


@pytest.mark.parametrize("kind, where", PLACES)
@pytest.mark.parametrize("axis", ["output", "input"])
def test_scaling_a_weight_and_mapping_a_bias_is_undone_bit_for_bit(kind, where, axis):
    layer, layout, out, inp = _layer(kind, where)
    model = nn.Sequential(layer).train()
    x = torch.randn(2, 4, 5, 5) if layout != "linear" else torch.randn(2, 4)
    with torch.no_grad():
        expected = model(x)
    before = fingerprint(model)
    log = EditLog()
    log.scale_weight(layer, _scale(out if axis == "output" else inp), layout, axis)  # type: ignore[arg-type]
    log.map_bias(layer, _scale(out), torch.full((out,), 0.5, dtype=torch.float64))
    with torch.no_grad():
        assert not torch.allclose(model(x), expected)  # the edits did change what the layer computes
    log.undo()
    assert_bit_identical(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert len(log) == 0


@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_log_without_a_way_back_scales_a_plain_weight_in_place_to_the_same_bits(kind):
    layer, layout, out, _ = _layer(kind, "plain")
    twin, _, _, _ = _layer(kind, "plain")
    weight = layer.weight
    EditLog(undoable=False).scale_weight(layer, _scale(out), layout, "output")  # type: ignore[arg-type]
    EditLog().scale_weight(twin, _scale(out), layout, "output")  # type: ignore[arg-type]
    assert layer.weight is weight  # written where it is, no new tensor
    assert torch.equal(_bits(layer.weight), _bits(twin.weight))


def test_a_log_without_a_way_back_keeps_no_old_values():
    layer = nn.Conv2d(3, 4, 3)
    log = EditLog(undoable=False)
    log.map_output(layer, _scale(4), torch.ones(4, dtype=torch.float64), "conv")
    log.set_tensors(layer, {"bias": 0.0})
    assert log._back == []
    assert [type(c).__name__ for c in log.changes] == ["WeightScaled", "BiasMapped", "TensorsSet"]


def test_a_module_registered_under_two_names_is_replaced_and_restored_under_both():
    norm = nn.BatchNorm2d(4).eval()
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), norm)
    model = nn.Sequential(inner, nn.ModuleDict({"again": norm}))
    model.train()
    before = fingerprint(model)
    log = EditLog()
    new = nn.Identity()
    log.replace(norm, new, places(model.modules())[id(norm)])
    assert inner[1] is new and model[1]["again"] is new
    assert new.training  # the replacement runs in the mode the norm ran in
    (change,) = log.changes
    assert isinstance(change, Replaced) and change.old is norm and len(change.where) == 2
    log.undo()
    assert inner[1] is norm and model[1]["again"] is norm
    assert_bit_identical(model, before)


def test_setting_tensors_and_appending_a_parametrization_is_undone_bit_for_bit():
    conv = parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    norm = nn.BatchNorm2d(4)
    norm.register_buffer("gate", torch.randn(4), persistent=False)
    model = nn.Sequential(conv, norm).eval()
    randomize_norms(model)
    before = fingerprint(model)
    log = EditLog()
    log.set_tensors(norm, {"weight": 1.0, "bias": torch.zeros(4), "gate": 0.0})
    log.append_parametrization(conv, "bias", Offset())
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.bias, torch.zeros(4))
    assert log.changes[0].neutral == (("gate", "zeros"),)  # type: ignore[union-attr]
    assert len(conv.parametrizations["bias"]) == 1
    log.undo()
    assert not parametrize.is_parametrized(conv, "bias")
    assert_bit_identical(model, before)
    plain = nn.Linear(3, 2)  # a tensor parametrized for the first time: the class and the tensor order come back
    before = fingerprint(plain)
    log.append_parametrization(plain, "weight", Offset())
    assert type(plain) is not nn.Linear
    log.undo()
    assert type(plain) is nn.Linear
    assert_bit_identical(plain, before)


# -- folding in place, failed ---------------------------------------------------------------------------------
class _Mixed(nn.Module):
    """Layers with their weights in every place bnfold writes to, one without a bias, a norm under two names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        norm = nn.BatchNorm2d(8)
        self.body = nn.Sequential(
            _pruned(nn.Conv2d(3, 8, 3, bias=False)),
            norm,
            nn.ReLU(),
            _parametrized(nn.Conv2d(8, 8, 3)),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            _old_weight_norm(nn.Conv2d(8, 4, 1, bias=False)),
            nn.BatchNorm2d(4),
        )
        self.alias = nn.ModuleList([norm])  # registered, never called: the same norm under a second name

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _mixed() -> nn.Module:
    return randomize_norms(_Mixed()).eval()


def _wrong_rule() -> bnfold.FoldRule:
    def wrong_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
        scale, shift = bnfold.rules.norms.norm_affine(norm)
        return scale * 2, shift

    return bnfold.FoldRule(nn.Conv2d, nn.BatchNorm2d, affine=wrong_affine)


def test_a_failed_fold_in_place_leaves_the_model_bit_identical():
    model = _mixed()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        model(x)  # the pruning and weight_norm hooks have computed their weights
    before = fingerprint(model)
    with pytest.raises(bnfold.VerificationError):
        bnfold.fold(model, x, inplace=True, extra_rules=[_wrong_rule()])
    assert_bit_identical(model, before)
    assert bnfold.fold(model, x, inplace=True) is model  # and it still folds
    assert isinstance(model.body[1], nn.Identity) and model.alias[0] is model.body[1]


def test_a_step_that_fails_takes_back_the_edits_of_every_step():
    model = _mixed()
    x = torch.randn(2, 3, 10, 10)
    plan = bnfold.plan(model, x)
    assert [s.kind for s in plan.sites] == ["backward"] * 3
    step = plan.kinds["backward"].step

    def failing(at: surgery.Surgery, site: FoldSite) -> None:
        step(at, site)  # its edits are made, then it fails
        if site is plan.sites[-1]:
            raise RuntimeError("a step that fails")

    backward = dataclasses.replace(plan.kinds["backward"], step=failing)
    plan = dataclasses.replace(plan, kinds={**plan.kinds, "backward": backward})
    before = fingerprint(model)
    with pytest.raises(bnfold.FoldError, match="^cannot fold 'body.7' .* a step that fails; the model was left"):
        apply_plan(model, plan, build_rules(None))
    assert_bit_identical(model, before)


# -- the record of a fold, from its log ------------------------------------------------------------------------
class _NeutralShift(nn.Module):
    """A conv without bias, a channel-wise constant and a non-persistent shift (set neutral when folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _pruned(nn.Conv2d(3, 8, 3, bias=False))
        self.bn = nn.BatchNorm2d(8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = _parametrized(nn.Linear(8, 4))
        self.register_buffer("shift", torch.randn(4), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x)) * self.gamma.view(1, -1, 1, 1)
        return self.fc(y.mean((2, 3))) + self.shift


def _norm_act() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU),
        nn.Conv2d(8, 4, 3),
        timm.layers.BatchNormAct2d(4, act_layer=nn.SiLU),
    )


RECORDED: dict[str, tuple[Callable[[], nn.Module], int, bool]] = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32, False),
    "repvgg_a0, merged": (lambda: timm.create_model("repvgg_a0", pretrained=False, num_classes=10), 32, True),
    "mixed weights, a norm under two names": (_mixed, 10, False),
    "pruned without bias, parametrized linear, neutral buffer": (_NeutralShift, 8, False),
    "BatchNormAct2d": (_norm_act, 8, False),
}


@pytest.mark.parametrize("name", list(RECORDED))
def test_the_record_from_the_log_is_the_record_from_comparing_the_models(name):
    make, size, reparameterize = RECORDED[name]
    torch.manual_seed(0)
    model = randomize_norms(make()).eval()
    x = torch.randn(1, 3, size, size)
    rules = build_rules(None)
    plan = bnfold.plan(model, x, reparameterize=reparameterize)
    assert plan.sites
    folded, log = copy_and_fold(model, plan, rules)
    expected = describe_fold(model, folded)
    assert expected.replaced
    assert record_of_edits(log, folded) == expected
    # folding in place: the same record, and undoing it leaves nothing to record
    before = fingerprint(model)
    in_place = apply_plan(model, plan, rules)
    assert record_of_edits(in_place, model) == expected
    in_place.undo()
    assert_bit_identical(model, before)
    assert record_of_edits(in_place, model).replaced == ()


def test_the_record_from_the_log_has_what_the_fold_changed():
    torch.manual_seed(0)
    model = randomize_norms(_NeutralShift()).eval()
    x = torch.randn(1, 3, 8, 8)
    folded, log = copy_and_fold(model, bnfold.plan(model, x), build_rules(None))
    record = record_of_edits(log, folded)
    assert [(r.path, r.was, r.module) for r in record.replaced] == [("bn", "BatchNorm2d", "Identity")]
    assert [(b.path, b.shape) for b in record.biases] == [("conv", [8])]
    assert [(p.path, p.tensor, p.module) for p in record.parametrizations] == [("fc", "weight", "ChannelScale")]
    assert [(b.path, b.value) for b in record.buffers] == [("shift", "zeros")]


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "in place"])
def test_a_fold_result_carries_the_log_its_record_is_written_from(inplace):
    torch.manual_seed(0)
    model = randomize_norms(_NeutralShift()).eval()
    original = clone_model(model)
    result = bnfold.fold_with_report(model, torch.randn(1, 3, 8, 8), inplace=inplace)
    assert (result.model is model) == inplace
    assert record_of_edits(result.edits, result.model) == describe_fold(original, result.model)
    assert result.edits.changes and result.edits._back == []  # the fold stands: no old weights kept
