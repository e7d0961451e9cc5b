"""What the ``bnfold`` command does once its arguments are valid: load the model, fold and check it, measure,
write the outputs as one set, and report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from ..api import fold_with_report, plan
from ..apply.edits import EditLog
from ..apply.records import record_of_edits
from ..check.latency import Latency, compare_latency
from ..discover.nested import iter_tensors
from ..errors import CheckpointError, clean_message
from ..io.checkpoint import record_path, write_folded
from ..io.output_files import OutputSet
from ..report import FoldReport, plan_rows, render_plan, render_report, wrap_field
from .errors import CliError, ExitCode
from .loading import load_model

__all__ = ["execute"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# how far onnxruntime's outputs may be from PyTorch's, relative to the output's scale (at least 1)
_ONNX_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}


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

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"bnfold: note: {text}\n")

    def bar(self, label: str, done: int, total: int) -> None:
        if not self.tty:
            return
        width = 30
        filled = width * done // max(total, 1)
        self.stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


@contextlib.contextmanager
def _warnings_silenced() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- ONNX ----------------------------------------------------------------------------------------------
def _cannot_run(error: BaseException) -> bool:
    """Whether onnxruntime failed because it cannot run this model here (a dtype without CPU kernels), not
    because the export is wrong."""
    kind = type(error).__name__
    text = str(error)
    return kind == "NotImplemented" or (kind in ("InvalidGraph", "Fail") and "Type Error" in text)


def _unchecked(result: dict[str, Any], why: str) -> dict[str, Any]:
    result["note"] = f"written, not checked, because {why}"
    return result


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _warnings_silenced():
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"])


def _check_onnx(model: nn.Module, example: torch.Tensor, written: Path, shown: Path) -> dict[str, Any]:
    """Run the exported file with onnxruntime on the example input, in the model's dtype, and compare every
    output with PyTorch's. Not checked (with the reason) when onnxruntime cannot run it."""
    result: dict[str, Any] = {"path": str(shown), "checked": False, "max_abs_error": None}
    dtype = example.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    try:
        import onnxruntime
    except ImportError:
        return _unchecked(result, "onnxruntime is not installed (pip install onnxruntime)")

    def why(error: BaseException) -> str:
        message = _ort(error).replace(str(written), str(shown)).replace(written.name, shown.name)
        if type(error).__name__ == "NotImplemented":
            return f"onnxruntime has no {dtype_name} CPU kernel for one of its operators ({message})"
        return f"onnxruntime rejects {dtype_name} here ({message})"

    try:
        session = onnxruntime.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    except Exception as error:
        if _cannot_run(error):
            return _unchecked(result, why(error))
        raise
    if dtype == torch.bfloat16:
        return _unchecked(result, "onnxruntime's Python API takes numpy arrays, and numpy has no bfloat16")
    feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
    try:
        got = session.run(None, feed)
    except Exception as error:
        if _cannot_run(error):
            return _unchecked(result, why(error))
        raise
    with torch.no_grad():
        expected = list(iter_tensors(model(example)))
    if len(expected) != len(got):
        return _unchecked(result, f"the model returns {len(expected)} tensors and the ONNX export {len(got)}")
    worst = scale = 0.0
    for mine, theirs in zip(expected, got, strict=True):
        reference = mine.detach().cpu().double()
        actual = torch.from_numpy(theirs).double()
        if actual.shape != reference.shape:
            return {**result, "checked": True, "ok": False, "max_abs_error": float("inf"), "dtype": dtype_name}
        worst = max(worst, float((actual - reference).abs().max()) if reference.numel() else 0.0)
        scale = max(scale, float(reference.abs().max()) if reference.numel() else 0.0)
    tolerance = _ONNX_RTOL.get(dtype, 1e-3) * max(scale, 1.0)
    result.update(checked=True, max_abs_error=worst, ok=worst <= tolerance, dtype=dtype_name)
    return result


def _ort(error: BaseException) -> str:
    """onnxruntime's message without its '[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED :' prefix."""
    text = clean_message(error).splitlines()[0] if str(error) else type(error).__name__
    return text.rsplit(" : ", 1)[-1].strip()


# -- the run ---------------------------------------------------------------------------------------------
def _width() -> int:
    """Columns to wrap the report to: the terminal's (or $COLUMNS), 80 when it is not a terminal."""
    return shutil.get_terminal_size((80, 24)).columns


def _colour(text: str, enabled: bool) -> str:
    if not enabled:
        return text
    colours = {"folded": "\033[32m", "fold": "\033[32m", "kept": "\033[33m", "keep": "\033[33m"}
    lines = []
    for line in text.splitlines():
        for word, code in colours.items():
            if f"  {word}  " in line:
                line = line.replace(f"  {word}  ", f"  {code}{word}\033[0m  ", 1)
                break
        lines.append(line)
    return "\n".join(lines)


def _write_outputs(
    args: argparse.Namespace, edits: EditLog, folded: nn.Module, example: torch.Tensor, progress: Progress
) -> tuple[list[str], dict[str, Any] | None]:
    """Write every output, all or none; return the paths written and the ONNX check."""
    onnx_result = None
    with OutputSet() as outputs:
        try:
            if args.output is not None:
                with progress.stage(f"writing {args.output}"):
                    if args.save_module:
                        torch.save(folded, outputs.stage(args.output))
                        stale = record_path(args.output)  # left by an earlier run: it would describe another file
                        if args.force and stale.exists():
                            outputs.remove(stale)
                    else:
                        write_folded(folded, record_of_edits(edits, folded), args.output, outputs)
            if args.onnx is not None:
                with progress.stage(f"exporting and checking {args.onnx}"):
                    staged = outputs.stage(args.onnx)
                    _export_onnx(folded, example, staged)
                    onnx_result = _check_onnx(folded, example, staged, args.onnx)
            if onnx_result is not None and onnx_result.get("checked") and not onnx_result.get("ok"):
                raise CliError(
                    f"the ONNX model's outputs differ from PyTorch's by {onnx_result['max_abs_error']:.3g} (in "
                    f"{onnx_result.get('dtype')}), so nothing was written",
                    ExitCode.OUTPUT,
                )
            outputs.commit()
        except CliError:
            raise
        except CheckpointError as error:
            raise CliError(
                f"could not write '{args.output}', so nothing was written: {error}", ExitCode.OUTPUT
            ) from error
        except Exception as error:
            raise CliError(
                f"could not write the outputs, so none was written: {type(error).__name__}: {clean_message(error)}",
                ExitCode.OUTPUT,
            ) from error
        return [str(p) for p in outputs.committed], onnx_result


def execute(args: argparse.Namespace, stdout: IO[str], stderr: IO[str]) -> int:
    """Run the command; ``args`` passed bnfold.cli.validate."""
    progress = Progress(stderr, enabled=not args.quiet)
    colour = stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ and not args.json
    width = _width()

    dtype = _DTYPES[args.dtype]
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise CliError(f"--device '{args.device}' is not a device: {clean_message(error)}", ExitCode.USAGE) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: CUDA is not available on this machine", ExitCode.USAGE)

    with progress.stage(f"loading {args.model}"):
        loaded = load_model(args.model, args.weights, args.num_classes, args.trust_pickle, args.seed)
    for note in loaded.notes:
        progress.note(note)
    shape = args.input_shape or loaded.input_shape
    if shape is None:
        raise CliError(f"--input-shape is required for '{args.model}' (e.g. --input-shape 1,3,224,224)", ExitCode.USAGE)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    if args.dry_run:
        if args.output is not None or args.onnx is not None:
            progress.note("a dry run writes nothing: -o and --onnx are ignored")
        with progress.stage("tracing"):
            found = plan(model, example, reparameterize=args.reparameterize, equalize=args.equalize)
        if args.json:
            json.dump(
                {
                    "model": found.model_type,
                    "traced_with": found.traced_with,
                    "folded": found.folded,
                    "kept": len(found.kept),
                    "merged": found.merged,
                    "equalized": found.equalized,
                    "dry_run": True,
                    "layers": plan_rows(found),
                    "input_shape": list(shape),
                    "dtype": args.dtype,
                },
                stdout,
                indent=2,
            )
            stdout.write("\n")
        else:
            stdout.write(_colour(render_plan(found, width=width, planned=True), colour) + "\n")
        return ExitCode.OK

    with progress.stage(f"folding and checking {'outputs' if args.verify == 'outputs' else 'each folded layer'}"):
        result = fold_with_report(
            model, example, verify=args.verify, reparameterize=args.reparameterize, equalize=args.equalize
        )
    bench = None
    if args.bench:
        bench = compare_latency(
            model, result.model, example, runs=args.bench_runs, on_run=lambda i, n: progress.bar("benchmark", i, n)
        )
    written, onnx_result = _write_outputs(args, result.edits, result.model, example, progress)

    if args.json:
        report = result.report.to_dict()
        report["input_shape"] = list(shape)
        report["dtype"] = args.dtype
        report["bench"] = None if bench is None else bench.to_dict()
        report["onnx"] = onnx_result
        report["written"] = written
        json.dump(report, stdout, indent=2)
        stdout.write("\n")
    else:
        stdout.write(_colour(_text_report(result.report, bench, onnx_result, written, width), colour) + "\n")
    return ExitCode.OK


def _text_report(
    report: FoldReport, bench: Latency | None, onnx: dict[str, Any] | None, written: list[str], width: int
) -> str:
    lines = [render_report(report, width=width)]
    if bench is not None:
        lines.extend(str(bench).splitlines())
    if onnx is not None:
        if onnx["checked"]:
            lines.append(
                f"onnx:       {onnx['path']} (matches PyTorch in {onnx['dtype']}: max error {onnx['max_abs_error']:.3g})"
            )
        else:
            lines.append(f"onnx:       {onnx['path']} ({onnx.get('note')})")
    for path in written:
        lines.append(f"wrote:      {path}")
    return "\n".join([lines[0], *(wrap_field(line, width) for line in lines[1:])])
