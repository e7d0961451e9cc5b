"""The real ``bnfold`` command, run as a subprocess the way users and pipelines run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import bnfold

from cli_models import Amplifier, SmallNet

TESTS = Path(__file__).parent
GOLDEN = TESTS / "golden"


def bnfold_cmd(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def pickled(tmp_path: Path) -> Path:
    path = tmp_path / "small.pt"
    torch.manual_seed(0)
    torch.save(SmallNet().eval(), path)
    return path


def _normalized(text: str) -> str:
    """Golden files pin the report, not the machine: the float error and timings vary with the CPU."""
    text = re.sub(r"max error:.*", "max error:  <error>", text)
    return text


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("BNFOLD_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


# -- inputs ------------------------------------------------------------------------------------------
def test_builtin_architecture_text_report_matches_golden(tmp_path):
    done = bnfold_cmd("torchvision:resnet18", "--input-shape", "1,3,32,32", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _golden("resnet18.txt", _normalized(done.stdout))


def test_pickled_model_text_report_matches_golden(tmp_path, pickled):
    done = bnfold_cmd(str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _golden("small_net.txt", _normalized(done.stdout))


def test_pickle_is_refused_without_the_flag(tmp_path, pickled):
    done = bnfold_cmd(str(pickled), "--input-shape", "2,3,8,8", cwd=tmp_path)
    assert done.returncode == 2
    assert "refusing to load" in done.stderr and "--trust-pickle" in done.stderr


def test_state_dict_weights_pt_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save(source.state_dict(), pt)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st))
    for weights in (pt, st):
        out = tmp_path / f"folded-{weights.suffix[1:]}.pt"
        done = bnfold_cmd(
            "torchvision:resnet18",
            "--num-classes",
            "5",
            "--weights",
            str(weights),
            "--input-shape",
            "1,3,32,32",
            "-o",
            str(out),
            "-q",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        # documented reload: fold the same architecture, then load the state_dict
        x = torch.randn(1, 3, 32, 32)
        skeleton = bnfold.fold(torchvision.models.resnet18(weights=None, num_classes=5).eval(), x)
        skeleton.load_state_dict(torch.load(out, weights_only=True))
        with torch.no_grad():
            torch.testing.assert_close(skeleton(x), source(x), rtol=1e-4, atol=1e-5)


def test_state_dict_given_as_the_model_is_explained(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    done = bnfold_cmd(str(path), cwd=tmp_path)
    assert done.returncode == 2 and "holds weights only" in done.stderr and "--weights" in done.stderr


def test_unknown_name_lists_close_names(tmp_path):
    done = bnfold_cmd("torchvision:resnet19", cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown torchvision architecture 'resnet19'; did you mean" in done.stderr
    assert "torchvision:resnet18" in done.stderr


def test_missing_library_names_the_extra(tmp_path):
    fake = tmp_path / "fake"
    (fake / "timm").mkdir(parents=True)
    (fake / "timm" / "__init__.py").write_text("raise ImportError('no timm here')\n")
    done = bnfold_cmd("timm:resnet18", cwd=tmp_path, env_extra={"PYTHONPATH": str(fake)})
    assert done.returncode == 2
    assert "pip install 'bnfold[timm]'" in done.stderr


def test_timm_architecture(tmp_path):
    done = bnfold_cmd("timm:mobilenetv3_small_050", "--input-shape", "1,3,64,64", "--json", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["folded"] == 34 and report["kept"] == 0


def test_detection_and_video_architectures_build_without_downloads(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    from bnfold.zoo import build_named_model

    detector = build_named_model(
        "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    )  # a pretrained backbone by default
    assert detector.input_shape == (1, 3, 224, 224)
    video = build_named_model("torchvision:r3d_18")
    assert video.input_shape == (1, 3, 16, 112, 112)


def test_verify_layers_for_a_model_that_amplifies_rounding(tmp_path):
    path = tmp_path / "amplifier.pt"
    torch.save(Amplifier().eval(), path)
    done = bnfold_cmd(str(path), "--trust-pickle", "--input-shape", "1,3,8,8", "-o", "out.pt", cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert "verification failed, nothing was written" in done.stderr
    assert "every folded layer matches" in done.stderr and "--verify layers" in done.stderr
    assert not (tmp_path / "out.pt").exists()
    done = bnfold_cmd(
        str(path), "--trust-pickle", "--input-shape", "1,3,8,8", "--verify", "layers", "--json", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["checked"] == "layers" and report["folded"] == 1
    assert report["max_rel_error"] < 1e-5


def test_wrong_input_shape(tmp_path):
    done = bnfold_cmd("torchvision:resnet18", "--input-shape", "1,5,32,32", cwd=tmp_path)
    assert done.returncode == 2
    assert "could not run on the example input (check --input-shape)" in done.stderr
    bad = bnfold_cmd("torchvision:resnet18", "--input-shape", "1,x,3", cwd=tmp_path)
    assert bad.returncode == 2 and "is not a shape" in bad.stderr


def test_unsupported_file_format(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a model")
    done = bnfold_cmd(str(path), cwd=tmp_path)
    assert done.returncode == 3 and "unsupported format '.onnx'" in done.stderr


def test_missing_file(tmp_path):
    done = bnfold_cmd(str(tmp_path / "nope.pt"), cwd=tmp_path)
    assert done.returncode == 3 and "nor an existing file" in done.stderr


# -- outputs -------------------------------------------------------------------------------------------
def test_json_report(tmp_path, pickled):
    done = bnfold_cmd(str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert report["folded"] == 2 and report["kept"] == 2
    assert report["checked"] == "outputs"
    assert isinstance(report["max_abs_error"], float) and report["max_abs_error"] < 1e-4
    rows = {row["name"]: row for row in report["layers"]}
    assert set(rows) == {"stem_bn", "bn", "head_bn", "norm"}
    assert rows["stem_bn"] == {
        "name": "stem_bn",
        "type": "BatchNorm2d",
        "decision": "folded",
        "partner": "stem",
        "partners": ["stem"],
        "kind": "backward",
        "direction": "backward",
        "reason": None,
    }
    assert rows["bn"]["decision"] == "kept" and "also feeds" in rows["bn"]["reason"]
    assert report["parameters_after"] < report["parameters_before"]


def test_output_state_dict_whole_module_and_refusals(tmp_path, pickled):
    out = tmp_path / "out.pt"
    done = bnfold_cmd(
        str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "-o", str(out), "--save-module", "-q", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    folded = torch.load(out, weights_only=False)
    original = torch.load(pickled, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), rtol=1e-4, atol=1e-5)
    assert isinstance(folded.stem_bn, torch.nn.Identity)
    # an existing output is refused without --force, and nothing is changed
    before = out.read_bytes()
    again = bnfold_cmd(str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "-o", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    assert out.read_bytes() == before
    forced = bnfold_cmd(
        str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "-o", str(out), "--force", "-q", cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    # the input file is never overwritten, even with --force
    original_bytes = pickled.read_bytes()
    same = bnfold_cmd(
        str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "-o", str(pickled), "--force", cwd=tmp_path
    )
    assert same.returncode == 2 and "never overwrites" in same.stderr
    assert pickled.read_bytes() == original_bytes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_safetensors_output(tmp_path, pickled):
    from safetensors.torch import load_file

    out = tmp_path / "out.safetensors"
    done = bnfold_cmd(str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "-o", str(out), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    x = torch.randn(2, 3, 8, 8)
    original = torch.load(pickled, weights_only=False)
    skeleton = bnfold.fold(torch.load(pickled, weights_only=False), x)
    skeleton.load_state_dict(load_file(str(out)))
    with torch.no_grad():
        torch.testing.assert_close(skeleton(x), original(x), rtol=1e-4, atol=1e-5)


def test_onnx_export_is_checked(tmp_path, pickled):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    done = bnfold_cmd(
        str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "--onnx", str(out), "--json", "-q", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["onnx"]["checked"] is True and report["onnx"]["ok"] is True
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = torch.load(pickled, weights_only=False)(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_dry_run_writes_nothing(tmp_path, pickled):
    out = tmp_path / "out.pt"
    done = bnfold_cmd(
        str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "--dry-run", "-o", str(out), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "2 norm layers folded, 2 kept" in done.stdout
    assert not out.exists()


def test_bench_reports_latency(tmp_path, pickled):
    done = bnfold_cmd(
        str(pickled),
        "--trust-pickle",
        "--input-shape",
        "2,3,8,8",
        "--bench",
        "--bench-runs",
        "5",
        "--json",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    bench = json.loads(done.stdout)["bench"]
    assert bench["runs"] == 5 and bench["before_ms"] > 0 and bench["after_ms"] > 0
    assert bench["speedup"] == pytest.approx(bench["before_ms"] / bench["after_ms"])


def test_help_documents_exit_codes(tmp_path):
    done = bnfold_cmd("--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "exit codes:" in done.stdout and "4 verification failed" in done.stdout


def test_dtype_option(tmp_path):
    done = bnfold_cmd(
        "torchvision:resnet18", "--input-shape", "1,3,32,32", "--dtype", "bfloat16", "--json", "-q", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["folded"] == 20 and report["max_rel_error"] < 6e-2


def test_cuda_device_runs_where_present_and_is_refused_where_absent(tmp_path):
    done = bnfold_cmd("torchvision:resnet18", "--input-shape", "1,3,32,32", "--device", "cuda", "-q", cwd=tmp_path)
    if torch.cuda.is_available():
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2 and "CUDA is not available" in done.stderr
