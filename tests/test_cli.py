"""The ``bnfold`` command. Most tests run it in this process (``bnfold.cli.main.main`` with its own
stdout, stderr, folder and environment), as a subprocess would see it but without importing torch again each
time; the tests of what only a process shows (``python -m bnfold``, the installed launcher, help and argument
errors answering without importing torch, the exit status of a real process) start one."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import bnfold
from bnfold.cli.main import main

from cli_models import Amplifier, SmallNet

torchvision = pytest.importorskip("torchvision", reason="the command's built-in architectures need torchvision")

TESTS = Path(__file__).parent
GOLDEN = TESTS / "golden"
COLUMNS_80 = {"COLUMNS": "80"}  # the width the report wraps to, as on an 80-column terminal


@dataclass(frozen=True)
class Done:
    """What a run of the command gave: its exit status and what it wrote."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _as_a_process_would_run(cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """Run in ``cwd`` with ``env`` set, and leave this process as it was: its folder, environment, import path,
    and no module imported from ``cwd`` (a pickled model's own module) left behind."""
    folder, saved_env, saved_path = os.getcwd(), dict(os.environ), list(sys.path)
    modules = set(sys.modules)
    os.chdir(cwd)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(folder)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
        for name in set(sys.modules) - modules:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(cwd)):
                del sys.modules[name]


def bnfold_cmd(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> Done:
    """Run ``bnfold ARGS`` in this process, its output going to a pipe (not a terminal: the report wraps to
    80 columns unless ``COLUMNS`` says otherwise, as for a process whose output is captured)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    env = {"COLUMNS": "80", **(env_extra or {})}
    with _as_a_process_would_run(cwd, env), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse: --help, --version, a bad argument
            code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    return Done(code, stdout.getvalue(), stderr.getvalue())


def bnfold_process(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bnfold ARGS`` as a process of its own."""
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


def _needs_onnx() -> None:
    pytest.importorskip("onnx", reason="the ONNX export needs onnx")
    pytest.importorskip("onnxruntime", reason="the ONNX output is checked with onnxruntime")


# -- inputs ------------------------------------------------------------------------------------------
def test_builtin_architecture_text_report_matches_golden(tmp_path):
    done = bnfold_cmd("torchvision:resnet18", "--input-shape", "1,3,32,32", "-q", cwd=tmp_path, env_extra=COLUMNS_80)
    assert done.returncode == 0, done.stderr
    _golden("resnet18.txt", _normalized(done.stdout))


def test_pickled_model_text_report_matches_golden(tmp_path, pickled):
    done = bnfold_cmd(
        str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "-q", cwd=tmp_path, env_extra=COLUMNS_80
    )
    assert done.returncode == 0, done.stderr
    _golden("small_net.txt", _normalized(done.stdout))
    assert max(len(line) for line in done.stdout.splitlines()) <= 80  # the reasons wrap to the terminal


def test_pickle_is_refused_without_the_flag(tmp_path, pickled):
    # a real process: its exit status is the command's, after torch has loaded
    done = bnfold_process(str(pickled), "--input-shape", "2,3,8,8", cwd=tmp_path)
    assert done.returncode == 2
    assert "refusing to load" in done.stderr and "--trust-pickle" in done.stderr


def test_state_dict_weights_pt_and_safetensors(tmp_path):
    save_file = pytest.importorskip("safetensors.torch", reason="safetensors weights need safetensors").save_file

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
        # documented reload: a freshly built model of the same architecture, no example inputs
        x = torch.randn(1, 3, 32, 32)
        loaded = bnfold.load_folded(torchvision.models.resnet18(weights=None, num_classes=5).eval(), out)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), source(x), rtol=1e-4, atol=1e-5)


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


def test_missing_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # importing timm fails, as when it is not installed
    done = bnfold_cmd("timm:resnet18", cwd=tmp_path)
    assert done.returncode == 2
    assert "pip install 'bnfold[timm]'" in done.stderr


def test_timm_architecture(tmp_path):
    pytest.importorskip("timm", reason="timm architectures need timm")
    done = bnfold_cmd("timm:mobilenetv3_small_050", "--input-shape", "1,3,64,64", "--json", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["folded"] == 34 and report["kept"] == 0


def test_detection_and_video_architectures_build_without_downloads(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    from bnfold.cli.zoo import build_named_model

    detector = build_named_model(
        "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    )  # a pretrained backbone by default
    assert detector.input_shape == (1, 3, 224, 224)
    video = build_named_model("torchvision:r3d_18")
    assert video.input_shape == (1, 3, 16, 112, 112)


def test_a_model_that_amplifies_rounding_folds_after_a_float64_run(tmp_path):
    path = tmp_path / "amplifier.pt"
    torch.save(Amplifier().eval(), path)
    done = bnfold_cmd(str(path), "--trust-pickle", "--input-shape", "1,3,8,8", "-o", "out.pt", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["checked"] == "float64" and report["folded"] == 1
    assert (tmp_path / "out.pt").exists()
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
    load_file = pytest.importorskip("safetensors.torch", reason="safetensors outputs need safetensors").load_file

    out = tmp_path / "out.safetensors"
    done = bnfold_cmd(str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "-o", str(out), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    x = torch.randn(2, 3, 8, 8)
    original = torch.load(pickled, weights_only=False)
    assert set(load_file(str(out))) == set(bnfold.fold(original, x).state_dict())
    loaded = bnfold.load_folded(SmallNet().eval(), out)  # the record travels in the safetensors metadata
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=1e-4, atol=1e-5)


def test_onnx_export_is_checked(tmp_path, pickled):
    _needs_onnx()
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
    assert "dry run, nothing changed: 2 norm layers would be folded, 2 kept" in done.stdout
    decisions = {line.split()[0]: line.split()[2] for line in done.stdout.splitlines()[3:] if len(line.split()) > 2}
    assert decisions["stem_bn"] == "fold" and decisions["bn"] == "keep"
    assert "folded" not in done.stdout.replace("would be folded", "")
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
    for key in ("before", "after"):  # the spread of the runs, not one number
        t = bench[key]
        assert 0 < t["min_ms"] <= t["q1_ms"] <= t["median_ms"] <= t["q3_ms"] <= t["max_ms"]
    assert bench["before"]["median_ms"] == bench["before_ms"]


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


# -- outputs in any dtype, written as one set ----------------------------------------------------------------
def _pickle(tmp_path: Path, model: torch.nn.Module, name: str = "model.pt") -> Path:
    path = tmp_path / name
    torch.save(model.eval(), path)
    return path


def _left_behind(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old")))


def test_onnx_check_runs_in_the_exported_dtype(tmp_path):
    _needs_onnx()
    done = bnfold_cmd(
        "torchvision:resnet18", "--input-shape", "1,3,32,32", "--dtype", "float16", "-o", "f16.pt", "--onnx",
        "f16.onnx", "--json", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    onnx = json.loads(done.stdout)["onnx"]
    assert onnx["checked"] is True and onnx["ok"] is True and onnx["dtype"] == "float16"
    assert (tmp_path / "f16.pt").exists() and (tmp_path / "f16.onnx").exists()


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_onnx_that_onnxruntime_cannot_run_is_written_and_says_why(tmp_path, dtype):
    _needs_onnx()
    out = f"{dtype}.onnx"
    done = bnfold_cmd(
        "torchvision:resnet18", "--input-shape", "1,3,32,32", "--dtype", dtype, "--onnx", out, "-q", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert f"onnx:       {out} (written, not checked, because onnxruntime" in done.stdout
    assert dtype in done.stdout.split("onnx:", 1)[1]
    assert (tmp_path / out).exists() and not _left_behind(tmp_path)


def test_a_failed_export_leaves_none_of_the_outputs(tmp_path):
    from cli_models import NoExport

    model = _pickle(tmp_path, NoExport())
    args = (str(model), "--trust-pickle", "--input-shape", "1,3,8,8", "-o", "out.pt", "--onnx", "out.onnx")
    done = bnfold_cmd(*args, cwd=tmp_path)
    assert done.returncode == 5
    assert "none was written" in done.stderr and "cannot be exported" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    # with --force over earlier outputs, the earlier files stay as they were
    (tmp_path / "out.pt").write_bytes(b"earlier")
    (tmp_path / "out.onnx").write_bytes(b"earlier onnx")
    forced = bnfold_cmd(*args, "--force", cwd=tmp_path)
    assert forced.returncode == 5
    assert (tmp_path / "out.pt").read_bytes() == b"earlier" and (tmp_path / "out.onnx").read_bytes() == b"earlier onnx"
    assert not (tmp_path / "out.pt.bnfold.json").exists() and not _left_behind(tmp_path)


def test_an_onnx_file_that_computes_something_else_is_not_written(tmp_path):
    _needs_onnx()
    from cli_models import ExportsSomethingElse

    model = _pickle(tmp_path, ExportsSomethingElse())
    done = bnfold_cmd(
        str(model),
        "--trust-pickle",
        "--input-shape",
        "1,3,8,8",
        "-o",
        "out.safetensors",
        "--onnx",
        "out.onnx",
        cwd=tmp_path,
    )
    assert done.returncode == 5
    assert "the ONNX model's outputs differ from PyTorch's" in done.stderr and "nothing was written" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.fixture
def umask(request) -> Iterator[int]:
    """Run the test under the umask given, as a shell's ``umask`` would set it for the command."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], indirect=["umask"])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    _needs_onnx()
    pytest.importorskip("safetensors", reason="one of the outputs is a .safetensors file")
    from cli_models import OnePair

    model = _pickle(tmp_path, OnePair())

    def run(*args: str) -> None:
        done = bnfold_cmd(str(model), "--trust-pickle", "--input-shape", "1,3,8,8", "-q", *args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr

    run("-o", "state.pt", "--onnx", "model.onnx")
    run("-o", "state.safetensors")
    run("-o", "module.pt", "--save-module")
    written = ["state.pt", "state.pt.bnfold.json", "model.onnx", "state.safetensors", "module.pt"]
    assert {name: oct((tmp_path / name).stat().st_mode & 0o777) for name in written} == dict.fromkeys(
        written, oct(mode)
    )
    # a file replaced with --force keeps its own permissions, as torch.save would
    (tmp_path / "state.pt").chmod(0o600)
    run("-o", "state.pt", "--force")
    assert (tmp_path / "state.pt").stat().st_mode & 0o777 == 0o600


# -- weights that do not fit -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet5(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A resnet18 with 5 classes and its state_dict in a file."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(5)
    state = torchvision.models.resnet18(weights=None, num_classes=5).state_dict()
    torch.save(state, folder / "resnet5.pt")
    return folder, state


def _weights(folder: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    path = folder / name
    torch.save(state, path)
    return path


def test_weights_with_a_module_prefix_load(tmp_path, resnet5):
    _, state = resnet5
    path = _weights(tmp_path, "ddp.pt", {f"module.{k}": v for k, v in state.items()})
    done = bnfold_cmd(
        "torchvision:resnet18",
        "--num-classes",
        "5",
        "--weights",
        str(path),
        "--input-shape",
        "1,3,32,32",
        "-o",
        "folded.pt",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "removed the prefix 'module.' (DataParallel/DistributedDataParallel)" in done.stderr
    source = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    source.load_state_dict(state)
    loaded = bnfold.load_folded(torchvision.models.resnet18(weights=None, num_classes=5).eval(), tmp_path / "folded.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=1e-4, atol=1e-5)


def test_weights_with_one_key_missing_name_it(tmp_path, resnet5):
    _, state = resnet5
    path = _weights(tmp_path, "w.pt", {k: v for k, v in state.items() if k != "layer2.1.bn1.running_var"})
    done = bnfold_cmd("torchvision:resnet18", "--num-classes", "5", "--weights", str(path), cwd=tmp_path)
    assert done.returncode == 3
    assert (
        "does not fit torchvision:resnet18: 121 of 122 keys fit, 1 missing from the file (layer2.1.bn1.running_var)"
        in done.stderr
    )
    assert "--num-classes" not in done.stderr


def test_weights_of_another_architecture_show_the_keys_with_counts(tmp_path):
    path = _weights(tmp_path, "w.pt", torchvision.models.mobilenet_v2(weights=None).state_dict())
    done = bnfold_cmd("torchvision:resnet18", "--weights", str(path), cwd=tmp_path)
    assert done.returncode == 3
    message = done.stderr
    assert re.search(
        r"\d+ missing from the file \(conv1\.weight, bn1\.weight, bn1\.bias, \.\.\. \(\d+ more\)\)", message
    )
    assert re.search(r"\d+ unexpected \(features\.0\.0\.weight, ", message)
    assert "it does not look like weights for torchvision:resnet18" in message
    assert "--num-classes" not in message


def test_weights_for_another_number_of_classes_suggest_num_classes(tmp_path, resnet5):
    folder, _ = resnet5
    done = bnfold_cmd("torchvision:resnet18", "--weights", str(folder / "resnet5.pt"), cwd=tmp_path)
    assert done.returncode == 3
    assert "fc.weight: [1000, 512] here, [5, 512] in the file" in done.stderr
    assert "only the classifier differs, with 5 outputs in the file: pass --num-classes 5" in done.stderr


def test_a_folded_checkpoint_given_as_weights_says_how_to_load_it(tmp_path, resnet5):
    folder, _ = resnet5
    common = ("torchvision:resnet18", "--num-classes", "5", "--input-shape", "1,3,32,32", "-q")
    assert bnfold_cmd(*common, "--weights", str(folder / "resnet5.pt"), "-o", "folded.pt", cwd=tmp_path).returncode == 0
    done = bnfold_cmd(*common, "--weights", "folded.pt", cwd=tmp_path)
    assert done.returncode == 3
    assert "'folded.pt' is a folded checkpoint (written by bnfold): it is folded already" in done.stderr
    assert (
        "bnfold.load_folded(torchvision.models.get_model('resnet18', weights=None, num_classes=5), 'folded.pt')"
        in done.stderr
    )
    # without its record, the keys still give it away
    (tmp_path / "folded.pt.bnfold.json").unlink()
    done = bnfold_cmd(*common, "--weights", "folded.pt", cwd=tmp_path)
    assert done.returncode == 3
    assert "looks like a folded checkpoint of torchvision:resnet18" in done.stderr
    assert "--num-classes" not in done.stderr


def test_a_whole_model_given_as_weights_is_explained_without_colour_codes(tmp_path, pickled):
    done = bnfold_cmd("torchvision:resnet18", "--weights", str(pickled), cwd=tmp_path)
    assert done.returncode == 3
    assert "holds a pickled object, not a state_dict" in done.stderr and "--trust-pickle" in done.stderr
    assert "\x1b" not in done.stderr


# -- pickled models whose classes live in the user's files -------------------------------------------------
MYMODELS = """
import torch
from torch import nn

class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))
"""


def _installed_command(tmp_path: Path) -> Path:
    """A launcher like the installed ``bnfold`` script: unlike ``python -m``, it does not put the current
    folder on sys.path."""
    launcher = tmp_path / "bin" / "bnfold_launcher.py"
    launcher.parent.mkdir()
    launcher.write_text("import sys\nfrom bnfold.cli.main import main\nsys.exit(main())\n")
    return launcher


def _run_launcher(launcher: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run(
        [sys.executable, str(launcher), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_pickled_model_whose_class_is_in_the_current_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodels.py").write_text(MYMODELS)
    with monkeypatch.context() as patch:  # as a training script in that folder would save it
        patch.syspath_prepend(str(project))
        import mymodels

        torch.save(mymodels.MyNet().eval(), project / "net.pt")
        del sys.modules["mymodels"]
    # a process: the installed command, unlike `python -m`, does not put the current folder on sys.path
    launcher = _installed_command(tmp_path)
    done = _run_launcher(launcher, "net.pt", "--trust-pickle", "--input-shape", "1,3,8,8", "--json", "-q", cwd=project)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["folded"] == 1
    # from another folder, the module cannot be found: the error says where to run bnfold
    elsewhere = bnfold_cmd(str(project / "net.pt"), "--trust-pickle", "--input-shape", "1,3,8,8", cwd=tmp_path)
    assert elsewhere.returncode == 3
    assert "its classes live in the module 'mymodels', which is not importable from here" in elsewhere.stderr
    assert "run bnfold from the folder that holds mymodels" in elsewhere.stderr


def test_pickled_model_whose_class_was_defined_in_a_script(tmp_path, monkeypatch):
    script = {"__name__": "__main__"}  # the class of a script run as `python train.py`
    exec(MYMODELS, script)
    with monkeypatch.context() as patch:  # pickle finds the class in the running script, as the script did
        patch.setattr(sys.modules["__main__"], "MyNet", script["MyNet"], raising=False)
        torch.save(script["MyNet"]().eval(), tmp_path / "net.pt")
    done = bnfold_cmd("net.pt", "--trust-pickle", "--input-shape", "1,3,8,8", cwd=tmp_path)
    assert done.returncode == 3
    assert "its class MyNet was defined in the script that saved it (its __main__)" in done.stderr
    assert "torch.save(model.state_dict(), ...)" in done.stderr and "move MyNet into a module" in done.stderr
    assert "Can't get attribute" not in done.stderr


# -- instant help and argument errors ----------------------------------------------------------------------
def _imports_torch(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run the command with ``-X importtime``: whether any torch module was imported."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bnfold", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "bnfold.cli.main" in imported  # the command really ran
    return done, any(name == "torch" or name.startswith("torch.") for name in imported)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--help"], 0, None),
        (["--version"], 0, None),
        (["torchvision:resnet18", "--bench-runs", "0"], 2, "--bench-runs: must be at least 1"),
        (["torchvision:resnet18", "--input-shape", "1,x,3"], 2, "is not a shape"),
        (["torchvision:resnet18", "--dtype", "float8"], 2, "invalid choice: 'float8'"),
        (["torchvision:resnet18", "-o", "out.txt"], 2, "-o 'out.txt': unsupported suffix '.txt'"),
        (["torchvision:resnet18", "--onnx", "out.pt"], 2, "--onnx 'out.pt': an ONNX file must end in .onnx"),
        (["torchvision:resnet18", "-o", "exists.pt"], 2, "'exists.pt' already exists; pass --force"),
        (["torchvision:resnet18", "-o", "folder", "--force"], 2, "-o 'folder' is a directory"),
        (["torchvision:resnet18", "--device", "cuda 0"], 2, "is not a device"),
        (["torchvision:resnet18", "--save-module"], 2, "--save-module needs -o"),
        (["model.onnx"], 3, "unsupported format '.onnx'"),
        (["hub:resnet18"], 2, "unknown model source 'hub'"),
    ],
)
def test_help_version_and_argument_errors_answer_without_torch(tmp_path, args, code, message):
    (tmp_path / "exists.pt").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"x")
    done, torch_imported = _imports_torch(*args, cwd=tmp_path)
    assert done.returncode == code, done.stderr[-2000:]
    if message is not None:
        assert message in done.stderr
    assert not torch_imported


# -- names ----------------------------------------------------------------------------------------------
def test_timm_pretrained_tag_builds_its_configuration_with_random_weights(tmp_path):
    pytest.importorskip("timm", reason="timm architectures need timm")
    load_file = pytest.importorskip("safetensors.torch", reason="safetensors outputs need safetensors").load_file
    done = bnfold_cmd("timm:resnet18.a3_in1k", "--dry-run", "--json", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["input_shape"] == [1, 3, 160, 160]  # resnet18.a3_in1k was trained at 160 x 160
    assert report["folded"] == 20
    done = bnfold_cmd(
        "timm:mobilenetv3_large_100.miil_in21k", "--input-shape", "1,3,32,32", "-o", "m.safetensors", "-q", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert load_file(str(tmp_path / "m.safetensors"))["classifier.weight"].shape[0] == 11221  # the tag's classes


def test_unknown_timm_tag_lists_known_ones(tmp_path):
    pytest.importorskip("timm", reason="timm architectures need timm")
    done = bnfold_cmd("timm:resnet18.a9_in1k", cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown timm tag 'a9_in1k' for resnet18; its tags include resnet18." in done.stderr
    assert "resnet18.a1_in1k" in done.stderr


@pytest.mark.parametrize(
    "name, hint",
    [
        ("resnet50", "did you mean torchvision:resnet50 or timm:resnet50?"),
        ("resnet50d", "did you mean timm:resnet50d?"),
        ("notanet", "architecture names take their library: torchvision:<name> or timm:<name>"),
    ],
)
def test_bare_architecture_name_suggests_its_library(tmp_path, name, hint):
    pytest.importorskip("timm", reason="timm architectures need timm")
    done = bnfold_cmd(name, cwd=tmp_path)
    assert done.returncode == 2
    assert f"'{name}' is not a file, and names no architecture on its own; {hint}" in done.stderr


def test_output_that_is_a_directory_says_so_with_or_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    for extra in ([], ["--force"]):
        done = bnfold_cmd("torchvision:resnet18", "-o", "out", *extra, cwd=tmp_path)
        assert done.returncode == 2
        assert "-o 'out' is a directory; name a file in it, e.g. out/folded.pt" in done.stderr
    done = bnfold_cmd("torchvision:resnet18", "--onnx", "out", cwd=tmp_path)
    assert (
        done.returncode == 2 and "--onnx 'out' is a directory; name a file in it, e.g. out/folded.onnx" in done.stderr
    )


# -- words ----------------------------------------------------------------------------------------------
def test_reasons_name_ops_as_users_write_them(tmp_path):
    from cli_models import ReluBetween

    model = _pickle(tmp_path, ReluBetween())
    done = bnfold_cmd(str(model), "--trust-pickle", "--input-shape", "1,3,8,8", "--json", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["layers"]
    assert row["decision"] == "kept" and "'torch.relu'" in row["reason"]
    assert "_VariableFunctionsClass" not in done.stdout


def test_densenet_reasons_name_every_input_of_the_concatenation(tmp_path):
    done = bnfold_cmd(
        "torchvision:densenet121", "--input-shape", "1,3,32,32", "--dry-run", "--json", "-q", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)["layers"]}
    reason = rows["features.denseblock1.denselayer3.norm1"]["reason"]
    assert reason.startswith(
        "it reads a torch.cat of 3 tensors, and folds into each only when it is a layer's output that nothing else "
        "reads: 'features.pool0' (MaxPool2d) is not a layer it can fold into; the outputs of "
        "'features.denseblock1.denselayer1.conv2' and 'features.denseblock1.denselayer2.conv2' are also read elsewhere"
    )


def test_one_norm_layer_is_singular(tmp_path):
    from cli_models import OnePair

    model = _pickle(tmp_path, OnePair())
    done = bnfold_cmd(str(model), "--trust-pickle", "--input-shape", "1,3,8,8", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "OnePair (traced with example_inputs): 1 norm layer folded, 0 kept"


def test_report_wraps_to_a_narrow_terminal(tmp_path, pickled):
    done = bnfold_cmd(
        str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8", "--bench", "--bench-runs", "3", "-q",
        cwd=tmp_path, env_extra={"COLUMNS": "72"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 72
    assert any(line.startswith(" " * 44) for line in lines)  # a reason continued under its column


# -- a benchmark that shows its spread ----------------------------------------------------------------------
def test_bench_warns_when_the_runs_vary_too_much(tmp_path):
    from cli_models import Jittery

    model = _pickle(tmp_path, Jittery())
    args = (str(model), "--trust-pickle", "--input-shape", "1,3,8,8", "--bench", "--bench-runs", "8", "-q")
    done = bnfold_cmd(*args, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    bench = json.loads(done.stdout)["bench"]
    assert bench["before"]["max_ms"] - bench["before"]["min_ms"] >= 15  # every other run sleeps 20 ms
    assert "the speed-up is not reliable" in bench["warning"]
    text = bnfold_cmd(*args, cwd=tmp_path, env_extra=COLUMNS_80)
    assert text.returncode == 0, text.stderr
    assert (
        "\nspread:     before " in text.stdout
        and "\nwarning:    the original and folded models' run times vary" in text.stdout
    )


def test_reparameterize_merges_branches_and_the_checkpoint_loads(tmp_path):
    timm = pytest.importorskip("timm", reason="timm:repvgg_a0 needs timm")
    pytest.importorskip("safetensors", reason="the merged model is written as .safetensors")
    planned = bnfold_cmd(
        "timm:repvgg_a0", "--input-shape", "1,3,64,64", "--reparameterize", "--dry-run", "--json", "-q", cwd=tmp_path
    )
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["merged"] == 22
    done = bnfold_cmd(
        "timm:repvgg_a0",
        "--input-shape",
        "1,3,64,64",
        "--reparameterize",
        "-o",
        "deploy.safetensors",
        "--json",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["merged"] == 22 and report["kept"] == 0 and len(report["merges"]) == 22
    assert report["merges"][0]["result"].startswith("Conv2d(")
    fresh = bnfold.load_folded(timm.create_model("repvgg_a0", pretrained=False).eval(), tmp_path / "deploy.safetensors")
    assert sum(isinstance(m, bnfold.MergedConv) for m in fresh.modules()) == 22
    with torch.no_grad():
        assert fresh(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_equalize_plans_folds_and_writes_a_checkpoint_that_loads(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision:resnet18 needs torchvision")
    pytest.importorskip("safetensors", reason="the equalized model is written as .safetensors")
    planned = bnfold_cmd(
        "torchvision:resnet18", "--input-shape", "1,3,32,32", "--equalize", "--dry-run", "--json", "-q", cwd=tmp_path
    )
    assert planned.returncode == 0, planned.stderr
    rows = json.loads(planned.stdout)
    lowered = [r for r in rows["layers"] if (r["reason"] or "").startswith("equalizing it would lower")]
    assert rows["equalized"] + len(lowered) == 8  # each block's conv1 -> relu -> conv2, kept when it would not help
    done = bnfold_cmd(
        "torchvision:resnet18",
        "--input-shape",
        "1,3,32,32",
        "--equalize",
        "-o",
        "eq.safetensors",
        "--json",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["equalized"] == rows["equalized"] and len(report["equalized_layers"]) == 2 * report["equalized"]
    fresh = bnfold.load_folded(torchvision.models.resnet18(weights=None).eval(), tmp_path / "eq.safetensors")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fresh.modules())
