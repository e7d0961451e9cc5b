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
        print("ok", bnfold.compat.norm_act_types(), bnfold.compat.frozen_batchnorm_types())
        """
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok () ()"
