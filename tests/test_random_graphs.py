"""Property test over random model graphs: stacks of conv / bn / relu / add / concat, with shared
modules and in-place ops. Whatever the graph, folding must never change the outputs."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold

from helpers import randomize_norms

OPS = [
    "conv_bn",
    "conv_bn",
    "conv_bn",
    "conv",
    "bn",
    "bn",
    "relu",
    "relu_",
    "add",
    "cat",
    "add_",
    "shared_conv",
    "shared_bn",
    "conv_t",
]


class Program(nn.Module):
    """Interprets a list of (op, a, b, width) steps over a growing list of values."""

    def __init__(self, steps: list[tuple[str, int, int, int]], in_channels: int = 3):
        super().__init__()
        self.steps: list[tuple[str, int, int, int, int]] = []
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.dropout = nn.Dropout(0.5)
        self.scales = nn.ParameterList()
        channels = [in_channels]
        for op, a, b, width in steps:
            src = len(channels) - 1 if a < 30 else a % len(channels)  # mostly a chain, sometimes a branch
            c = channels[src]
            if op == "conv_bn":
                self.convs.append(nn.Conv2d(c, width, 3, padding=1, bias=bool(b % 2)))
                self.norms.append(nn.BatchNorm2d(width))
                self.steps.append(("conv", src, 0, len(self.convs) - 1, 0))
                self.steps.append(("bn", len(channels), 0, len(self.norms) - 1, 0))
                channels += [width, width]
            elif op == "bn_conv":
                self.norms.append(nn.BatchNorm2d(c))
                self.convs.append(nn.Conv2d(c, width, 1, bias=bool(b % 2)))
                self.steps.append(("bn", src, 0, len(self.norms) - 1, 0))
                self.steps.append(("conv", len(channels), 0, len(self.convs) - 1, 0))
                channels += [c, width]
            elif op == "dropout":
                self.steps.append(("dropout", src, 0, 0, 0))
                channels.append(c)
            elif op == "scale":  # a per-channel parameter: multiplied (even b) or added (odd b)
                self.scales.append(nn.Parameter(torch.rand(c, 1, 1) + 0.5))
                self.steps.append(("scale", src, b % 2, len(self.scales) - 1, 0))
                channels.append(c)
            elif op in ("conv", "conv_t", "conv1x1", "reflect_conv"):
                if op == "conv1x1":
                    layer = nn.Conv2d(c, width, 1, bias=bool(b % 2))
                elif op == "reflect_conv":
                    layer = nn.Conv2d(c, width, 3, padding=1, padding_mode="reflect", bias=bool(b % 2))
                else:
                    layer = (nn.Conv2d if op == "conv" else nn.ConvTranspose2d)(
                        c, width, 3, padding=1, bias=bool(b % 2)
                    )
                self.convs.append(layer)
                self.steps.append(("conv", src, 0, len(self.convs) - 1, 0))
                channels.append(width)
            elif op == "shared_conv":
                index = next((i for i, m in enumerate(self.convs) if m.in_channels == c), None)
                if index is None:
                    continue
                self.steps.append(("conv", src, 0, index, 0))
                channels.append(self.convs[index].out_channels)  # shared: called once more
            elif op == "bn":
                self.norms.append(nn.BatchNorm2d(c, affine=bool(b % 3)))
                self.steps.append(("bn", src, 0, len(self.norms) - 1, 0))
                channels.append(c)
            elif op == "shared_bn":
                index = next((i for i, m in enumerate(self.norms) if m.num_features == c), None)
                if index is None:
                    continue
                self.steps.append(("bn", src, 0, index, 0))
                channels.append(c)
            elif op in ("relu", "relu_", "add_"):
                self.steps.append((op, src, 0, 0, 0))
                channels.append(c)
            elif op in ("add", "cat"):
                other = b % len(channels)
                if op == "add" and channels[other] != c:
                    continue
                self.steps.append((op, src, other, 0, 0))
                channels.append(c + channels[other] if op == "cat" else c)
        self.outputs = sorted({len(channels) - 1, (len(channels) - 1) // 2})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = [x]
        for op, a, b, index, _ in self.steps:
            v = values[a]
            if op == "conv":
                out = self.convs[index](v)
            elif op == "dropout":
                out = self.dropout(v)
            elif op == "scale":
                out = v + self.scales[index] if b else v * self.scales[index]
            elif op == "bn":
                out = self.norms[index](v)
            elif op == "relu":
                out = torch.relu(v)
            elif op == "relu_":
                out = torch.relu_(v)  # in place: every earlier reader of v has already run
            elif op == "add_":
                out = v.add_(0.5)
            elif op == "add":
                out = v + values[b]
            else:
                out = torch.cat([v, values[b]], dim=1)
            values.append(out)
        return tuple(values[i] for i in self.outputs)


steps_strategy = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(0, 50), st.sampled_from([3, 4, 5])),
    min_size=1,
    max_size=14,
)


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(t.clone() for t in model(x.clone()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_strategy, seed=st.integers(0, 1000))
def test_folding_never_changes_outputs(steps, seed):
    torch.manual_seed(seed)
    model = randomize_norms(Program(steps), seed).eval()
    x = torch.randn(2, 3, 5, 5)
    expected = _outputs(model, x)
    result = bnfold.fold_with_report(model, x)  # raises VerificationError if outputs changed
    plan = result.report.plan
    norm_rows = [r for r in plan.rows if not r.norm_type.startswith("channel-wise")]
    assert len(norm_rows) == len(model.norms)
    event(f"folded {min(len(plan.sites), 3)}+")
    for e, a in zip(expected, _outputs(result.model, x), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max().clamp_min(1.0)))
    # the same graph traced symbolically must never fold something execution tracing keeps
    symbolic = bnfold.plan(model)
    assert {s.norm for s in symbolic.sites} <= {s.norm for s in plan.sites}
