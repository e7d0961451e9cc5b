"""Outputs written as one set: all of them, or none, and nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bnfold.io import output_files as files
from bnfold.io.output_files import OutputSet


def test_a_failed_rename_puts_back_every_file_of_the_set(tmp_path, monkeypatch):
    first, second = tmp_path / "a.pt", tmp_path / "b.onnx"
    first.write_text("earlier a")
    real_replace = os.replace

    def failing_replace(src: Path, dst: Path) -> None:
        if Path(dst) == second:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with OutputSet() as outputs:
        outputs.stage(first).write_text("new a")
        outputs.stage(second).write_text("new b")
        with pytest.raises(OSError, match="disk full"):
            outputs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
    assert first.read_text() == "earlier a"


def test_leaving_without_commit_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError), OutputSet() as outputs:
        outputs.stage(tmp_path / "a.pt").write_text("new")
        raise RuntimeError("a later step failed")
    assert list(tmp_path.iterdir()) == []


def test_removals_happen_with_the_commit(tmp_path):
    stale = tmp_path / "old.pt.bnfold.json"
    stale.write_text("{}")
    with OutputSet() as outputs:
        outputs.stage(tmp_path / "old.pt").write_text("module")
        outputs.remove(stale)
        assert stale.exists()
        outputs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]
