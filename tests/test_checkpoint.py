"""Folded checkpoints: bnfold.save_folded writes the weights and a record of the folded structure, and
bnfold.load_folded rebuilds that structure on a freshly built model, without example inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bnfold
from bnfold.apply import records
from bnfold.io import checkpoint
from bnfold.rules.norms import elementwise_affine, identity_affine, last_channel_axis

from helpers import randomize_norms, state_snapshot

torchvision = pytest.importorskip("torchvision", reason="the checkpoints are of torchvision models")


def _needs_safetensors(path: Path) -> None:
    if path.suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="a .safetensors checkpoint needs safetensors")


def _fold_and_save(make: Any, x: torch.Tensor, path: Path, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """Fold a model with randomized statistics and save it, recording against a *fresh* model."""
    torch.manual_seed(0)
    model = make().eval()
    randomize_norms(model)
    folded = bnfold.fold(model, x, **kwargs)
    bnfold.save_folded(folded, path, original=make().eval())
    return model, folded


def _assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_resnet_round_trip_without_example_inputs(tmp_path, suffix):
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / f"folded{suffix}"
    _needs_safetensors(path)
    model, folded = _fold_and_save(lambda: torchvision.models.resnet18(weights=None, num_classes=7), x, path)
    loaded = bnfold.load_folded(torchvision.models.resnet18(weights=None, num_classes=7).eval(), path)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in folded.modules()]
    assert loaded.conv1.bias is not None
    _assert_same_outputs(loaded, model, x)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == (["folded.pt", "folded.pt.bnfold.json"] if suffix == ".pt" else ["folded.safetensors"])


def test_timm_norm_act_layers_keep_their_activation(tmp_path):
    x = torch.randn(1, 3, 64, 64)
    timm = pytest.importorskip("timm", reason="the model is timm's mobilenetv3_small_050")
    path = tmp_path / "m.safetensors"
    _needs_safetensors(path)
    model, _ = _fold_and_save(lambda: timm.create_model("mobilenetv3_small_050", pretrained=False), x, path)
    loaded = bnfold.load_folded(timm.create_model("mobilenetv3_small_050", pretrained=False).eval(), path)
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert "FoldedNormAct" in kinds and "BatchNormAct2d" not in kinds
    _assert_same_outputs(loaded, model, x)


class LayerScaled(nn.Module):
    """conv -> bn -> * gamma (a channel-wise constant), and a non-persistent shift that folds into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("shift", torch.randn(4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)) * self.gamma.view(1, -1, 1, 1)
        return self.fc(y.mean((2, 3))) + self.shift


def test_constants_set_neutral_are_restored_also_when_not_in_the_state_dict(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "m.pt"
    model, folded = _fold_and_save(LayerScaled, x, path)
    assert torch.equal(folded.gamma, torch.ones(8)) and torch.equal(folded.shift, torch.zeros(4))
    record = json.loads((tmp_path / "m.pt.bnfold.json").read_text())
    assert record["buffers"] == [{"path": "shift", "value": "zeros"}]
    fresh = LayerScaled().eval()
    assert not torch.equal(fresh.shift, torch.zeros(4))
    loaded = bnfold.load_folded(fresh, path)
    assert torch.equal(loaded.shift, torch.zeros(4))
    _assert_same_outputs(loaded, model, x)


def _weight_normed() -> nn.Module:
    return nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    )


def test_parametrized_weights_get_their_folded_scale_back(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "m.safetensors"
    _needs_safetensors(path)
    model, folded = _fold_and_save(_weight_normed, x, path)
    assert len(folded[0].parametrizations.weight) == 2  # weight_norm, then bnfold's scale
    loaded = bnfold.load_folded(_weight_normed().eval(), path)
    assert [type(p).__name__ for p in loaded[0].parametrizations.weight] == [
        type(p).__name__ for p in folded[0].parametrizations.weight
    ]
    _assert_same_outputs(loaded, model, x)


def _without_biases() -> nn.Module:
    """Layers without bias whose weight a pre-hook computes: pruned, and the older hook-based weight_norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, bias=False))
    model.append(nn.BatchNorm2d(4))
    nn.utils.prune.l1_unstructured(model[0], "weight", 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated for the parametrization, still met in checkpoints
        nn.utils.weight_norm(model[2])
    return model


def test_layers_with_computed_weights_get_the_bias_folding_gave_them(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "m.pt"
    model, folded = _fold_and_save(_without_biases, x, path)
    record = json.loads((tmp_path / "m.pt.bnfold.json").read_text())
    assert record["biases"] == [{"path": "0", "shape": [8]}, {"path": "2", "shape": [4]}]
    loaded = bnfold.load_folded(_without_biases().eval(), path)
    assert loaded[0].bias is not None and loaded[2].bias is not None
    _assert_same_outputs(loaded, model, x)


# -- refusals ------------------------------------------------------------------------------------------
@pytest.fixture
def resnet_checkpoint(tmp_path) -> Path:
    path = tmp_path / "folded.pt"
    _fold_and_save(lambda: torchvision.models.resnet18(weights=None), torch.randn(1, 3, 32, 32), path)
    return path


def _unchanged(model: nn.Module) -> Any:
    types = [type(m) for m in model.modules()]
    state = state_snapshot(model)

    def check() -> None:
        assert [type(m) for m in model.modules()] == types
        now = model.state_dict()
        assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())

    return check


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torchvision.models.resnet34(weights=None), "does not fit this ResNet once folded: "),
        (lambda: torchvision.models.mobilenet_v2(weights=None), "holds a folded ResNet; this model is a MobileNetV2"),
        (
            lambda: torchvision.models.resnet18(weights=None, num_classes=10),
            "only the classifier differs: build the model with num_classes=1000",
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_and_the_model_left_as_it_was(resnet_checkpoint, make, message):
    model = make().eval()
    unchanged = _unchanged(model)
    with pytest.raises(bnfold.CheckpointError, match="^'.*folded.pt' ") as caught:
        bnfold.load_folded(model, resnet_checkpoint)
    assert message in str(caught.value)
    unchanged()


def test_an_already_folded_model_is_refused(resnet_checkpoint):
    folded = bnfold.load_folded(torchvision.models.resnet18(weights=None).eval(), resnet_checkpoint)
    unchanged = _unchanged(folded)
    with pytest.raises(bnfold.CheckpointError, match="is the model already folded"):
        bnfold.load_folded(folded, resnet_checkpoint)
    unchanged()


def test_a_checkpoint_without_record_says_so(tmp_path, resnet_checkpoint):
    (tmp_path / "folded.pt.bnfold.json").unlink()
    with pytest.raises(
        bnfold.CheckpointError, match="holds no bnfold fold record .nor a record file '.*folded.pt.bnfold.json'"
    ):
        bnfold.load_folded(torchvision.models.resnet18(weights=None).eval(), resnet_checkpoint)
    plain = tmp_path / "plain.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), plain)
    with pytest.raises(bnfold.CheckpointError, match="fits this model as it is: load it with model.load_state_dict"):
        bnfold.load_folded(torchvision.models.resnet18(weights=None).eval(), plain)


def test_saving_needs_the_unfolded_architecture(tmp_path):
    model = torchvision.models.resnet18(weights=None).eval()
    folded = bnfold.fold(model, torch.randn(1, 3, 32, 32), inplace=True)
    with pytest.raises(ValueError, match="got the folded model itself .folded with inplace=True.."):
        bnfold.save_folded(folded, tmp_path / "f.pt", original=folded)
    bnfold.save_folded(folded, tmp_path / "f.pt", original=torchvision.models.resnet18(weights=None))
    bnfold.load_folded(torchvision.models.resnet18(weights=None), tmp_path / "f.pt")


def test_bad_arguments(tmp_path, resnet_checkpoint):
    with pytest.raises(TypeError, match="expects a torch.nn.Module as its first argument, got str .build the"):
        bnfold.load_folded(str(resnet_checkpoint), torchvision.models.resnet18())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported suffix '.onnx'"):
        bnfold.load_folded(torchvision.models.resnet18(), tmp_path / "m.onnx")
    with pytest.raises(bnfold.CheckpointError, match="does not exist"):
        bnfold.load_folded(torchvision.models.resnet18(), tmp_path / "missing.pt")


# -- what a record can name ------------------------------------------------------------------------------
class ScaleNorm(nn.Module):
    """A per-channel scale and shift, foldable like a frozen batch norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)
        self.shift = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class Marker(nn.Module):
    """What a ScaleNorm leaves behind in this test: an identity that remembers the channel count."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def to_record(self) -> dict[str, Any]:
        return {"channels": self.channels}

    @classmethod
    def from_record(cls, spec: dict[str, Any], replaced: nn.Module) -> Marker:
        return cls(int(spec["channels"]))


def _scale_rule() -> bnfold.FoldRule:
    return bnfold.FoldRule(
        nn.Conv2d,
        ScaleNorm,
        affine=lambda m: (m.scale.detach().double(), m.shift.detach().double()),
        check=lambda m: None,
        replacement=lambda m: Marker(m.scale.numel()),
    )


def _scaled() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3), ScaleNorm(6))


def test_a_module_class_that_describes_itself_can_be_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "_RECORDED", dict(records._RECORDED))
    x = torch.randn(1, 3, 8, 8)
    model = _scaled().eval()
    folded = bnfold.fold(model, x, extra_rules=[_scale_rule()])
    path = tmp_path / "m.pt"
    with pytest.raises(
        bnfold.CheckpointError, match=r"^'1' was ScaleNorm and is now Marker, which bnfold cannot record"
    ):
        bnfold.save_folded(folded, path, original=model)
    assert list(tmp_path.iterdir()) == []  # nothing written
    checkpoint.recorded(Marker)
    bnfold.save_folded(folded, path, original=model)
    loaded = bnfold.load_folded(_scaled().eval(), path)
    assert isinstance(loaded[1], Marker) and loaded[1].channels == 6
    _assert_same_outputs(loaded, model, x)


def _layer_normed() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4, bias=False))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_norm_made_neutral_round_trips(tmp_path, suffix):
    """A norm rule that leaves the norm in place, made neutral: the record names only what changed in the
    structure (a bias gained); the neutral weights are ordinary weights."""
    rule = bnfold.NormRule(
        nn.LayerNorm,
        affine=elementwise_affine,
        check=lambda n: None,
        channel_axis=last_channel_axis,
        neutral=identity_affine,
        backward=lambda n: "it normalizes with each input's own statistics",
    )
    x = torch.randn(3, 8)
    path = tmp_path / f"m{suffix}"
    torch.manual_seed(0)
    model = _layer_normed().eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    folded = bnfold.fold(model, x, extra_rules=[rule])
    bnfold.save_folded(folded, path, original=_layer_normed().eval())
    record = checkpoint.read_record(path, None if suffix == ".pt" else _metadata(path))
    assert record is not None
    assert record.replaced == () and [b.path for b in record.biases] == ["2"]
    loaded = bnfold.load_folded(_layer_normed().eval(), path)
    assert type(loaded[1]) is nn.LayerNorm and torch.equal(loaded[1].weight, torch.ones(16))
    assert torch.equal(loaded[1].bias, torch.zeros(16))
    assert list(loaded.state_dict()) == list(folded.state_dict())
    _assert_same_outputs(loaded, model, x)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()
