"""The ``bnfold`` command: fold a saved or built-in model, check it, report, and write the result.

Exit codes (also in ``--help``):
  0  success
  1  unexpected internal error
  2  bad arguments or a refusal (unknown name, pickle without --trust-pickle, existing output without
     --force, an input shape the model cannot run on)
  3  the input cannot be read (missing file, unsupported format, weights that do not match)
  4  verification failed: the folded model's outputs differ (nothing is written)
  5  an output could not be written, or the ONNX check failed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from . import __version__
from .api import fold_with_report, plan
from .errors import BnfoldError, TraceError, VerificationError
from .latency import Latency, compare_latency
from .report import FoldReport, plan_rows, render_plan, render_report
from .zoo import ArchitectureError, build_named_model, parse_model_name

__all__ = ["main", "ExitCode"]


class ExitCode:
    OK = 0
    INTERNAL = 1
    USAGE = 2
    UNREADABLE = 3
    VERIFICATION = 4
    OUTPUT = 5


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

EPILOG = """\
model:
  torchvision:<name>, timm:<name>   a built-in architecture with random weights (nothing downloaded);
                                    add --weights FILE to load a state_dict (.pt/.pth or .safetensors)
  FILE.pt                           a whole pickled model (torch.save(model)); loading a pickle runs
                                    arbitrary code, so it needs --trust-pickle

outputs:
  -o out.pt            the folded model's state_dict (load it with torch.load(..., weights_only=True)
                       into bnfold.fold(<same architecture>, example_input))
  -o out.safetensors   the same, as safetensors
  -o out.pt --save-module   the whole folded module (pickled)
  --onnx out.onnx      an ONNX export, checked with onnxruntime when it is installed
  Existing files are never overwritten without --force; the input file never is.

exit codes:
  0 success   1 internal error   2 bad arguments or refusal   3 unreadable input
  4 verification failed (nothing written)   5 output could not be written / ONNX check failed
"""


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a shape; write it as comma-separated sizes, e.g. 1,3,224,224"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape: every size must be a positive integer")
    return dims


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnfold",
        description="Fold BatchNorm layers into the neighbouring Conv/Linear layers, check the outputs, and report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="torchvision:<name>, timm:<name>, or a pickled model file (see below)")
    parser.add_argument(
        "--weights", type=Path, help="state_dict for a built-in architecture (.pt/.pth or .safetensors)"
    )
    parser.add_argument(
        "--num-classes", type=int, help="classifier size of a built-in architecture (to match --weights)"
    )
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow loading a whole pickled model (runs its code)"
    )
    parser.add_argument(
        "--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (default: the architecture's)"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype to fold and check in")
    parser.add_argument(
        "--verify",
        choices=["outputs", "layers"],
        default="outputs",
        help="check the model's outputs (default), or each folded layer on the original's inputs "
        "(for detection models, whose outputs jump with tiny rounding differences)",
    )
    parser.add_argument("--device", default="cpu", help="device to fold and check on, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and the example input")
    parser.add_argument(
        "-o", "--output", type=Path, help="write the folded model here (.pt/.pth state_dict, .safetensors)"
    )
    parser.add_argument(
        "--save-module", action="store_true", help="with -o: save the whole module instead of a state_dict"
    )
    parser.add_argument("--onnx", type=Path, help="export the folded model to ONNX and check it with onnxruntime")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument("--dry-run", action="store_true", help="show the plan only; fold nothing, write nothing")
    parser.add_argument("--bench", action="store_true", help="measure inference latency before and after folding")
    parser.add_argument("--bench-runs", type=int, default=30, help="timed runs per model for --bench (default 30)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout, and nothing else")
    parser.add_argument("--no-color", action="store_true", help="no colour, even on a terminal")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    parser.add_argument("--version", action="version", version=f"bnfold {__version__}")
    return parser


class Progress:
    """Stage messages and a progress bar on stderr (a bar only on a terminal)."""

    def __init__(self, stream: IO[str], enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.enabled:
            self.stream.write(f"{text} ...")
            self.stream.flush()
        try:
            yield
        except BaseException:
            if self.enabled:
                self.stream.write(" failed\n")
            raise
        if self.enabled:
            self.stream.write(f" done ({time.perf_counter() - start:.1f} s)\n")
            self.stream.flush()

    def bar(self, label: str, done: int, total: int) -> None:
        if not self.tty:
            return
        width = 30
        filled = width * done // max(total, 1)
        self.stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CliError(f"weights file '{path}' does not exist", ExitCode.UNREADABLE)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CliError(
                "reading .safetensors needs the safetensors package: pip install safetensors", ExitCode.UNREADABLE
            ) from None
        try:
            return dict(load_file(str(path)))
        except Exception as error:
            raise CliError(f"cannot read '{path}' as safetensors: {error}", ExitCode.UNREADABLE) from error
    if path.suffix not in _TORCH_SUFFIXES:
        raise CliError(
            f"cannot read '{path}': unsupported format '{path.suffix}'; weights must be a state_dict in a "
            ".pt/.pth file or a .safetensors file",
            ExitCode.UNREADABLE,
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CliError(
            f"cannot read '{path}' as a state_dict with weights_only=True ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); if it is a whole pickled model, pass it as the "
            "model argument with --trust-pickle",
            ExitCode.UNREADABLE,
        ) from error
    for key in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CliError(f"'{path}' does not hold a state_dict (a dict of tensors)", ExitCode.UNREADABLE)
    return loaded


def _load_pickled_model(path: Path, trust: bool) -> nn.Module:
    if not path.exists():
        raise CliError(
            f"'{path}' is neither an architecture name (torchvision:<name>, timm:<name>) nor an existing file",
            ExitCode.UNREADABLE,
        )
    if path.suffix == ".safetensors":
        raise CliError(
            f"'{path}' holds weights only; name the architecture and pass the file as weights, e.g. "
            f"bnfold torchvision:resnet18 --weights {path}",
            ExitCode.USAGE,
        )
    if path.suffix not in _TORCH_SUFFIXES:
        raise CliError(
            f"cannot read '{path}': unsupported format '{path.suffix}'. Accepted: an architecture name with an "
            "optional --weights .pt/.pth/.safetensors state_dict, or a whole pickled model (.pt/.pth) with --trust-pickle",
            ExitCode.UNREADABLE,
        )
    if not trust:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            weights_only = True
        except Exception:  # not loadable as plain weights: a pickled object
            weights_only = False
        if weights_only:
            raise CliError(
                f"'{path}' holds weights only (a state_dict); name the architecture and pass the file as weights, "
                f"e.g. bnfold torchvision:resnet18 --weights {path}",
                ExitCode.USAGE,
            )
        raise CliError(
            f"refusing to load '{path}': it is a pickled model, and unpickling runs arbitrary code from the file. "
            "If you trust its source, pass --trust-pickle",
            ExitCode.USAGE,
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CliError(f"cannot load '{path}': {type(error).__name__}: {error}", ExitCode.UNREADABLE) from error
    if not isinstance(loaded, nn.Module):
        raise CliError(f"'{path}' holds a {type(loaded).__name__}, not a torch.nn.Module", ExitCode.UNREADABLE)
    return loaded


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...] | None, Path | None]:
    """(model, default input shape, input file)."""
    if parse_model_name(args.model) is not None:
        torch.manual_seed(args.seed)
        try:
            named = build_named_model(args.model, args.num_classes)
        except ArchitectureError as error:
            raise CliError(str(error), ExitCode.USAGE) from error
        if args.weights is not None:
            state = _load_state_dict(args.weights)
            try:
                named.model.load_state_dict(state)
            except RuntimeError as error:
                raise CliError(
                    f"'{args.weights}' does not fit {args.model}: {str(error).splitlines()[0]} "
                    "(is --num-classes right?)",
                    ExitCode.UNREADABLE,
                ) from error
        return named.model, named.input_shape, args.weights
    if args.weights is not None:
        raise CliError("--weights needs an architecture name as the model, e.g. torchvision:resnet18", ExitCode.USAGE)
    path = Path(args.model)
    if ":" in args.model and not path.exists():
        raise CliError(f"unknown model source in '{args.model}'; use torchvision:<name> or timm:<name>", ExitCode.USAGE)
    return _load_pickled_model(path, args.trust_pickle), None, path


def _same_file(a: Path, b: Path | None) -> bool:
    return b is not None and a.resolve() == b.resolve()


def _check_outputs(args: argparse.Namespace, input_file: Path | None) -> None:
    targets = [p for p in (args.output, args.onnx) if p is not None]
    for target in targets:
        if _same_file(target, input_file) or _same_file(target, args.weights):
            raise CliError(
                f"refusing to write '{target}': it is the input file, which bnfold never overwrites", ExitCode.USAGE
            )
        if target.exists() and not args.force:
            raise CliError(f"'{target}' already exists; pass --force to overwrite it", ExitCode.USAGE)
        if not target.parent.exists():
            raise CliError(f"cannot write '{target}': folder '{target.parent}' does not exist", ExitCode.USAGE)
    if args.output is not None and args.output.suffix not in (*_TORCH_SUFFIXES, ".safetensors"):
        raise CliError(
            f"-o '{args.output}': unsupported suffix; use .pt/.pth (state_dict or --save-module) or .safetensors",
            ExitCode.USAGE,
        )
    if args.save_module and (args.output is None or args.output.suffix == ".safetensors"):
        raise CliError("--save-module needs -o with a .pt/.pth file", ExitCode.USAGE)
    if len(targets) == 2 and _same_file(targets[0], targets[1]):
        raise CliError("-o and --onnx name the same file", ExitCode.USAGE)


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written ``target``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _write_model(model: nn.Module, target: Path, save_module: bool) -> None:
    if target.suffix == ".safetensors":
        from safetensors.torch import save_file

        state = _state_dict_for_saving(model)
        # safetensors refuses shared storage (tied weights): store private copies
        atomic_write(target, lambda p: save_file({k: v.clone() for k, v in state.items()}, str(p)))
    elif save_module:
        atomic_write(target, lambda p: torch.save(model, p))
    else:
        atomic_write(target, lambda p: torch.save(_state_dict_for_saving(model), p))


def _export_onnx(model: nn.Module, example: torch.Tensor, target: Path) -> dict[str, Any]:
    """Export to ONNX and, with onnxruntime, compare its output to PyTorch's."""
    result: dict[str, Any] = {"path": str(target), "checked": False, "max_abs_error": None}

    def export(path: Path) -> None:
        with warnings_silenced():
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["output"]
            )

    atomic_write(target, export)
    try:
        import onnxruntime
    except ImportError:
        result["note"] = "onnxruntime is not installed: the export was not checked"
        return result
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.detach().cpu().float().numpy()})[0]
    with torch.no_grad():
        expected = model(example).detach().cpu().float()
    error = float((torch.from_numpy(got) - expected).abs().max())
    scale = float(expected.abs().max())
    result.update(checked=True, max_abs_error=error, ok=error <= 1e-3 * max(scale, 1.0))
    return result


@contextlib.contextmanager
def warnings_silenced() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _colour(text: str, enabled: bool) -> str:
    if not enabled:
        return text
    colours = {"folded": "\033[32m", "kept": "\033[33m"}
    lines = []
    for line in text.splitlines():
        for word, code in colours.items():
            line = line.replace(f"  {word}  ", f"  {code}{word}\033[0m  ", 1)
        lines.append(line)
    return "\n".join(lines)


def run(argv: list[str] | None, stdout: IO[str], stderr: IO[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = Progress(stderr, enabled=not args.quiet)
    colour = stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ and not args.json

    dtype = _DTYPES[args.dtype]
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise CliError(f"--device '{args.device}' is not a device: {error}", ExitCode.USAGE) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: CUDA is not available on this machine", ExitCode.USAGE)
    if args.bench_runs < 1:
        raise CliError("--bench-runs must be at least 1", ExitCode.USAGE)

    with progress.stage(f"loading {args.model}"):
        model, default_shape, input_file = _load_model(args)
    _check_outputs(args, input_file)
    shape = args.input_shape or default_shape
    if shape is None:
        raise CliError(f"--input-shape is required for '{args.model}' (e.g. --input-shape 1,3,224,224)", ExitCode.USAGE)
    model = model.to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    if args.dry_run:
        with progress.stage("tracing"):
            found = plan(model, example)
        if args.json:
            json.dump(
                {"folded": len(found.sites), "kept": len(found.kept), "dry_run": True, "layers": plan_rows(found)},
                stdout,
                indent=2,
            )
            stdout.write("\n")
        else:
            stdout.write(_colour(render_plan(found), colour) + "\n")
        return ExitCode.OK

    with progress.stage(f"folding and checking {'outputs' if args.verify == 'outputs' else 'each folded layer'}"):
        result = fold_with_report(model, example, verify=args.verify)
    report: dict[str, Any] = {}
    bench = None
    if args.bench:
        bench = compare_latency(
            model, result.model, example, runs=args.bench_runs, on_run=lambda i, n: progress.bar("benchmark", i, n)
        )
    written: list[str] = []
    onnx_result = None
    try:
        if args.output is not None:
            with progress.stage(f"writing {args.output}"):
                _write_model(result.model, args.output, args.save_module)
            written.append(str(args.output))
        if args.onnx is not None:
            with progress.stage(f"exporting {args.onnx}"):
                onnx_result = _export_onnx(result.model, example, args.onnx)
            written.append(str(args.onnx))
    except CliError:
        raise
    except Exception as error:
        raise CliError(f"could not write the output: {type(error).__name__}: {error}", ExitCode.OUTPUT) from error

    if args.json:
        report = result.report.to_dict()
        report["bench"] = None if bench is None else bench.to_dict()
        report["onnx"] = onnx_result
        report["written"] = written
        json.dump(report, stdout, indent=2)
        stdout.write("\n")
    else:
        stdout.write(_colour(_text_report(result.report, bench, onnx_result, written), colour) + "\n")
    if onnx_result is not None and onnx_result.get("checked") and not onnx_result.get("ok"):
        stderr.write(f"bnfold: the ONNX model's outputs differ from PyTorch's by {onnx_result['max_abs_error']:.3g}\n")
        return ExitCode.OUTPUT
    return ExitCode.OK


def _text_report(report: FoldReport, bench: Latency | None, onnx: dict[str, Any] | None, written: list[str]) -> str:
    lines = [render_report(report)]
    if bench is not None:
        lines.append(str(bench))
    if onnx is not None:
        if onnx["checked"]:
            verdict = "matches" if onnx.get("ok") else "DIFFERS"
            lines.append(f"onnx:       {onnx['path']} ({verdict} PyTorch: max error {onnx['max_abs_error']:.3g})")
        else:
            lines.append(f"onnx:       {onnx['path']} ({onnx.get('note')})")
    for path in written:
        lines.append(f"wrote:      {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bnfold`` command; returns the exit code."""
    try:
        return run(argv, sys.stdout, sys.stderr)
    except CliError as error:
        sys.stderr.write(f"bnfold: error: {error}\n")
        return error.code
    except VerificationError as error:
        sys.stderr.write(f"bnfold: verification failed, nothing was written: {error}\n")
        return ExitCode.VERIFICATION
    except TraceError as error:
        sys.stderr.write(
            f"bnfold: error: the model could not run on the example input (check --input-shape): {error}\n"
        )
        return ExitCode.USAGE
    except BnfoldError as error:
        sys.stderr.write(f"bnfold: error: {error}\n")
        return ExitCode.INTERNAL
    except KeyboardInterrupt:
        sys.stderr.write("bnfold: interrupted\n")
        return 130
