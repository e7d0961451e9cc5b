"""The public API as a user meets it: copies and in-place folding, errors, weights behind parametrizations
and pruning, low precision, TorchScript and torch.export, and the fasterai drop-in."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import bnfold

from helpers import Model, assert_same_state, check_fold, max_rel_diff, randomize_norms, state_snapshot


def small_net() -> nn.Module:
    return randomize_norms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    ).eval()


X = torch.randn(2, 3, 10, 10)


# -- copies, in place, idempotence -------------------------------------------------------------------
def test_copy_leaves_original_bit_identical_with_hooks_and_mode():
    model = small_net()
    model[2].register_forward_hook(lambda m, i, o: None)
    before = state_snapshot(model)
    folded = bnfold.fold(model, X)
    assert folded is not model
    assert_same_state(model, before)
    assert isinstance(model[1], nn.BatchNorm2d) and len(model[2]._forward_hooks) == 1
    assert not model.training and type(folded) is type(model)
    assert len(folded[2]._forward_hooks) == 1


def test_inplace_returns_the_same_object():
    model = small_net()
    with torch.no_grad():
        expected = model(X)
    conv_weight = model[0].weight
    folded = bnfold.fold(model, X, inplace=True)
    assert folded is model and isinstance(model[1], nn.Identity)
    assert model[0].weight is conv_weight  # parameters updated in place, optimizer references stay valid
    assert max_rel_diff(expected, model(X)) < 1e-5


def test_folding_twice_is_a_no_op():
    once = bnfold.fold(small_net(), X)
    snapshot = state_snapshot(once)
    result = bnfold.fold_with_report(once, X)
    assert result.report.folded == 0 and result.report.kept == 0
    assert_same_state(result.model, snapshot)


def test_state_dict_keys_of_folded_layers_stay():
    model = small_net()
    folded = bnfold.fold(model, X)
    keys = set(folded.state_dict())
    assert {"0.weight", "0.bias", "3.weight", "3.bias"} <= keys
    assert not any(k.startswith("1.") for k in keys)
    missing, unexpected = model.load_state_dict(folded.state_dict(), strict=False)
    assert not unexpected


def test_at_most_one_copy(monkeypatch):
    copies = []  # the modules deep-copied from outside any other deepcopy: one entry per copy made
    depth = [0]
    real = copy.deepcopy

    def counting(obj, memo=None, _nil=()):
        if isinstance(obj, nn.Module) and depth[0] == 0:
            copies.append(type(obj).__name__)
        depth[0] += 1
        try:
            return real(obj, memo)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(copy, "deepcopy", counting)
    bnfold.fold(small_net(), X)
    assert copies == ["Sequential"]
    copies.clear()
    bnfold.fold(small_net(), X, inplace=True)
    assert copies == []


def test_plan_changes_nothing_and_prints_a_table():
    model = small_net()
    before = state_snapshot(model)
    rng = torch.get_rng_state()
    p = bnfold.plan(model, X)
    assert_same_state(model, before)
    assert torch.equal(rng, torch.get_rng_state())
    text = str(p)
    assert "norm layer" in text and "folded" in text and "<- 0" in text


# -- verification ------------------------------------------------------------------------------------
def _wrong_rule() -> bnfold.FoldRule:
    def wrong_affine(norm):
        scale, shift = bnfold.rules.norms.norm_affine(norm)
        return scale * 2, shift

    return bnfold.FoldRule(nn.Conv2d, nn.BatchNorm2d, affine=wrong_affine)


def test_verification_failure_raises_and_leaves_the_original_untouched():
    model = small_net()
    before = state_snapshot(model)
    with pytest.raises(bnfold.VerificationError, match=r"^the folded model's output differs") as info:
        bnfold.fold(model, X, extra_rules=[_wrong_rule()])
    assert info.value.output == "output" and info.value.error > info.value.tolerance
    assert_same_state(model, before)


def test_verification_failure_in_place_restores_the_model():
    model = small_net()
    norm = model[1]
    before = state_snapshot(model)
    with pytest.raises(bnfold.VerificationError):
        bnfold.fold(model, X, inplace=True, extra_rules=[_wrong_rule()])
    assert model[1] is norm and model[0].bias is not None
    assert_same_state(model, before)
    no_bias = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).eval()
    with pytest.raises(bnfold.VerificationError):
        bnfold.fold(no_bias, X, inplace=True, extra_rules=[_wrong_rule()])
    assert no_bias[0].bias is None


# -- bad input ---------------------------------------------------------------------------------------
def test_non_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"^bnfold.fold\(\) expects a torch.nn.Module, got dict \(a state_dict"):
        bnfold.fold({"weight": torch.ones(1)})  # type: ignore[arg-type]


def test_wrong_example_inputs_type():
    with pytest.raises(TypeError, match=r"^example_inputs must be a Tensor or a tuple .* got list; pass tuple"):
        bnfold.fold(small_net(), [X])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got ndarray"):
        bnfold.plan(small_net(), X.numpy())  # type: ignore[arg-type]


def test_uninitialised_lazy_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"^'1' \(LazyBatchNorm2d\) is not initialised yet .* run one forward pass"):
        bnfold.fold(model, X)


def test_forward_that_raises_says_where_and_chains_the_cause():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.stem(x))

    with pytest.raises(
        bnfold.TraceError, match=r"^running Broken on example_inputs failed inside 'head' \(Linear\) after 3 completed"
    ) as info:
        bnfold.fold(Broken().eval(), X)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_errors_share_one_base_class():
    for error in (bnfold.TraceError, bnfold.FoldError, bnfold.VerificationError):
        assert issubclass(error, bnfold.BnfoldError)


def test_bad_extra_rule():
    with pytest.raises(TypeError, match="extra_rules must hold bnfold.FoldRule"):
        bnfold.fold(small_net(), X, extra_rules=[(nn.Conv2d, nn.BatchNorm2d)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="cannot infer how ReLU stores its weight"):
        bnfold.FoldRule(nn.ReLU, nn.BatchNorm2d)


# -- weights behind parametrizations and pruning ----------------------------------------------------
@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_parametrized_weights_fold_and_stay_correct(wrap):
    conv = nn.Conv2d(3, 8, 3)
    if wrap == "weight_norm":
        parametrizations.weight_norm(conv)
    elif wrap == "spectral_norm":
        parametrizations.spectral_norm(conv)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(conv)
    model = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU()).eval()
    result = check_fold(model, X, folded=1, kept=0)
    with torch.no_grad():
        expected = model(X)
        for _ in range(3):
            assert max_rel_diff(expected, result.model(X)) < 1e-5
    if wrap != "old_weight_norm":
        assert parametrize.is_parametrized(result.model[0], "weight")


def test_old_spectral_norm_hook_is_kept():
    conv = torch.nn.utils.spectral_norm(nn.Conv2d(3, 8, 3))
    model = nn.Sequential(conv, nn.BatchNorm2d(8)).eval()
    result = check_fold(model, X, folded=0, kept=1)
    assert "forward pre-hook" in result.report.plan.kept[0].reason


def test_pruned_then_folded_keeps_sparsity_and_outputs():
    model = small_net()
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # autograd on: weight is a non-leaf tensor
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    zeros = int((model[0].weight == 0).sum())
    result = check_fold(model, X, folded=2, kept=0, randomize=False)
    conv = result.model[0]
    assert hasattr(conv, "weight_mask") and hasattr(conv, "weight_orig")
    with torch.no_grad():
        expected = model(X)
        for _ in range(3):
            assert max_rel_diff(expected, result.model(X)) < 1e-5
    assert int((conv.weight == 0).sum()) == zeros


def test_pruned_bias_is_kept():
    model = small_net()
    prune.l1_unstructured(model[0], "bias", amount=0.5)
    result = check_fold(model, X, folded=1, kept=1, randomize=False)
    assert "bias is pruned" in result.report.plan.kept[0].reason


# -- precision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_no_worse_than_the_unfolded_models(dtype):
    torch.manual_seed(0)
    torchvision = pytest.importorskip("torchvision", reason="the model is torchvision's resnet18")
    reference = randomize_norms(torchvision.models.resnet18(weights=None)).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        exact = reference(x)
        low = copy.deepcopy(reference).to(dtype)
        unfolded_error = (low(x.to(dtype)).double() - exact).abs().max().item()
        folded = bnfold.fold(low, x.to(dtype))
        folded_error = (folded(x.to(dtype)).double() - exact).abs().max().item()
    assert folded_error <= 2.0 * unfolded_error + 1e-6, (folded_error, unfolded_error)
    assert next(folded.parameters()).dtype == dtype


# -- export ------------------------------------------------------------------------------------------
def test_folded_resnet_scripts_and_exports():
    torchvision = pytest.importorskip("torchvision", reason="the model is torchvision's resnet18")
    model = randomize_norms(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    folded = bnfold.fold(model, x)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(folded)
        assert max_rel_diff(expected, scripted(x)) < 1e-5
        exported = torch.export.export(folded, (x,))
        assert max_rel_diff(expected, exported.module()(x)) < 1e-5


def test_folded_norm_act_scripts():
    pytest.importorskip("timm", reason="the norm is timm's BatchNormAct2d")
    from timm.layers import BatchNormAct2d

    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4))).eval()
    folded = bnfold.fold(model, X)
    scripted = torch.jit.script(folded)
    assert type(folded[1]).__name__ == "FoldedNormAct"
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), model(X), rtol=1e-5, atol=1e-5)


# -- the fasterai drop-in -----------------------------------------------------------------------------
def test_bn_folder_drop_in():
    model = small_net()
    before = state_snapshot(model)
    folded = bnfold.BN_Folder().fold(model)
    assert_same_state(model, before)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    with torch.no_grad():
        assert max_rel_diff(model(X), folded(X)) < 1e-5


def test_bn_folder_does_not_fold_what_registration_order_gets_wrong():
    wrong = Model(  # registration order says conv -> bn; data flow says bn -> conv
        lambda m, x: m.conv(m.bn(x)), conv=nn.Conv2d(3, 3, 3, padding=1), bn=nn.BatchNorm2d(3)
    )
    model = randomize_norms(wrong).eval()
    folded = bnfold.BN_Folder().fold(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(model(X), folded(X))


def test_bn_folder_warns_and_returns_a_copy_when_it_cannot_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    model = Branchy().eval()
    with pytest.warns(UserWarning, match="BN_Folder could not trace Branchy"):
        folded = bnfold.BN_Folder().fold(model)
    assert folded is not model and isinstance(folded.bn, nn.BatchNorm2d)
    folded = bnfold.BN_Folder().fold(model, torch.ones(1, 3, 5, 5))
    assert isinstance(folded.bn, nn.Identity)


def test_without_example_inputs_linear_batchnorm1d_is_kept_with_advice():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    p = bnfold.plan(model)
    assert len(p.kept) == 1 and "pass example_inputs" in p.kept[0].reason


def test_torch_compiled_module_is_refused_with_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(TypeError, match=r"torch.compile'd module .*compiled._orig_mod"):
        bnfold.fold(torch.compile(model), torch.randn(1, 3, 8, 8))
    outer = nn.Sequential(torch.compile(model), nn.ReLU())
    with pytest.raises(TypeError, match="'0', a torch.compile'd module"):
        bnfold.plan(outer)
    assert isinstance(bnfold.fold(torch.compile(model)._orig_mod, torch.randn(1, 3, 8, 8))[1], nn.Identity)


def test_compare_latency_times_both_models_side_by_side():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    folded = bnfold.fold(model, x)
    calls = []
    latency = bnfold.compare_latency(model, folded, (x,), runs=4, warmup=1, on_run=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert latency.runs == 4 and latency.before_ms > 0 and latency.after_ms > 0
    assert latency.speedup == pytest.approx(latency.before_ms / latency.after_ms)
    assert latency.to_dict()["speedup"] == latency.speedup
    assert str(latency).startswith("latency:") and "median of 4 interleaved runs" in str(latency)
    assert not model.training and torch.is_grad_enabled()
    with pytest.raises(ValueError, match="runs must be a positive integer"):
        bnfold.compare_latency(model, folded, x, runs=0)


def test_a_model_failing_without_a_message_is_still_explained():
    def picky(m, x):
        if x.shape[-1] != 32:
            raise AssertionError
        return m.conv(x)

    with pytest.raises(bnfold.TraceError, match=r"AssertionError: \(no message; often an input of a size"):
        bnfold.fold(Model(picky, conv=nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 16, 16))
