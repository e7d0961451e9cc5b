"""The ``bnfold`` command: parse and check the arguments, then hand over to :mod:`bnfold.command`.

Everything here runs before torch is imported (importing it takes seconds): ``--help``, ``--version`` and
every mistake in the arguments (a bad shape, an output that exists or is a folder, a wrong suffix) answer at
once. Only a valid command loads torch and the model.

Exit codes (also in ``--help``):
  0  success
  1  unexpected internal error
  2  bad arguments or a refusal (unknown name, pickle without --trust-pickle, existing output without
     --force, an input shape the model cannot run on)
  3  the input cannot be read (missing file, unsupported format, weights that do not match)
  4  verification failed: the folded model's outputs differ (nothing is written)
  5  an output could not be written, or the ONNX check failed (nothing is written)
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from typing import IO

from .. import __version__
from ..errors import BnfoldError, TraceError, VerificationError, clean_message
from .errors import CliError, ExitCode
from .zoo import libraries_with, parse_model_name

__all__ = ["main", "run", "ExitCode", "CliError", "build_parser"]


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DTYPES = ("float32", "float16", "bfloat16", "float64")
RECORD_SUFFIX = ".bnfold.json"  # the fold record next to a .pt state_dict (see bnfold.checkpoint)

EPILOG = """\
model:
  torchvision:<name>, timm:<name>   a built-in architecture with random weights (nothing downloaded);
                                    timm names may carry a pretrained tag (timm:resnet50.a1_in1k: that
                                    tag's configuration, random weights); add --weights FILE to load a
                                    state_dict (.pt/.pth or .safetensors)
  FILE.pt                           a whole pickled model (torch.save(model)); loading a pickle runs
                                    arbitrary code, so it needs --trust-pickle

outputs (written together: if any step fails, none of them is):
  -o out.safetensors   the folded state_dict, with a record of what was folded in its metadata
  -o out.pt            the same as a torch file, the record next to it in out.pt.bnfold.json;
                       load either with bnfold.load_folded(<same architecture, freshly built>, path)
  -o out.pt --save-module   the whole folded module (pickled)
  --onnx out.onnx      an ONNX export, checked with onnxruntime (in its dtype) when it is installed
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
        "--num-classes", type=_positive, help="classifier size of a built-in architecture (to match --weights)"
    )
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow loading a whole pickled model (runs its code)"
    )
    parser.add_argument(
        "--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (default: the architecture's)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to fold and check in")
    parser.add_argument(
        "--verify",
        choices=["outputs", "layers"],
        default="outputs",
        help="check the model's outputs (default; a float64 run of the original tells amplified rounding from "
        "a wrong fold), or only each folded layer on the original's inputs (not the model end to end)",
    )
    parser.add_argument("--device", default="cpu", help="device to fold and check on, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and the example input")
    parser.add_argument(
        "-o", "--output", type=Path, help="write the folded model here (.safetensors or .pt/.pth state_dict)"
    )
    parser.add_argument(
        "--save-module", action="store_true", help="with -o: save the whole module instead of a state_dict"
    )
    parser.add_argument("--onnx", type=Path, help="export the folded model to ONNX and check it with onnxruntime")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument(
        "--reparameterize",
        action="store_true",
        help="also merge parallel branches of one tensor (RepVGG, MobileOne, ...) into one convolution each",
    )
    parser.add_argument(
        "--equalize",
        action="store_true",
        help="then equalize per-channel weight ranges across layers, exactly, for 8-bit quantization",
    )
    parser.add_argument("--dry-run", action="store_true", help="show the plan only; fold nothing, write nothing")
    parser.add_argument("--bench", action="store_true", help="measure inference latency before and after folding")
    parser.add_argument(
        "--bench-runs", type=_positive, default=30, help="timed runs per model for --bench (default 30)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout, and nothing else")
    parser.add_argument("--no-color", action="store_true", help="no colour, even on a terminal")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    parser.add_argument("--version", action="version", version=f"bnfold {__version__}")
    return parser


# -- checks that need neither torch nor the model -----------------------------------------------------------
def _same_file(a: Path, b: Path | None) -> bool:
    return b is not None and a.resolve() == b.resolve()


def _looks_like_a_name(text: str) -> bool:
    """``resnet50`` (an architecture name without its library), not a path."""
    return bool(re.fullmatch(r"[A-Za-z][\w.\-]*", text)) and Path(text).suffix not in (*TORCH_SUFFIXES, ".safetensors")


def input_file(args: argparse.Namespace) -> Path | None:
    """The file the model comes from, when it is one."""
    return None if parse_model_name(args.model) is not None else Path(args.model)


def _check_model_argument(args: argparse.Namespace) -> None:
    if parse_model_name(args.model) is not None:
        return
    path = Path(args.model)
    if not path.exists():
        library, sep, name = args.model.partition(":")
        if sep and name and not library.startswith((".", "/")):
            raise CliError(
                f"unknown model source '{library}' in '{args.model}'; use torchvision:<name> or timm:<name>",
                ExitCode.USAGE,
            )
        found = libraries_with(args.model) if _looks_like_a_name(args.model) else []
        if found or (_looks_like_a_name(args.model) and not path.suffix):
            hint = (
                f"did you mean {' or '.join(found)}?"
                if found
                else "architecture names take their library: torchvision:<name> or timm:<name>"
            )
            raise CliError(
                f"'{args.model}' is not a file, and names no architecture on its own; {hint}", ExitCode.USAGE
            )
        raise CliError(
            f"'{args.model}' is neither an architecture name (torchvision:<name>, timm:<name>) nor an existing file",
            ExitCode.UNREADABLE,
        )
    if path.is_dir():
        raise CliError(f"'{path}' is a directory, not a model file", ExitCode.UNREADABLE)
    if path.suffix == ".safetensors":
        raise CliError(
            f"'{path}' holds weights only; name the architecture and pass the file as weights, e.g. "
            f"bnfold torchvision:resnet18 --weights {path}",
            ExitCode.USAGE,
        )
    if path.suffix not in TORCH_SUFFIXES:
        raise CliError(
            f"cannot read '{path}': unsupported format '{path.suffix}'. Accepted: an architecture name with an "
            "optional --weights .pt/.pth/.safetensors state_dict, or a whole pickled model (.pt/.pth) with --trust-pickle",
            ExitCode.UNREADABLE,
        )
    if args.weights is not None:
        raise CliError("--weights needs an architecture name as the model, e.g. torchvision:resnet18", ExitCode.USAGE)
    if args.num_classes is not None:
        raise CliError("--num-classes applies to an architecture name, not to a model file", ExitCode.USAGE)


def _check_weights_argument(args: argparse.Namespace) -> None:
    weights = args.weights
    if weights is None:
        return
    if not weights.exists():
        raise CliError(f"weights file '{weights}' does not exist", ExitCode.UNREADABLE)
    if weights.is_dir():
        raise CliError(f"--weights '{weights}' is a directory, not a weights file", ExitCode.UNREADABLE)
    if weights.suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        raise CliError(
            f"cannot read '{weights}': unsupported format '{weights.suffix}'; weights must be a state_dict in a "
            ".pt/.pth file or a .safetensors file",
            ExitCode.UNREADABLE,
        )


def output_files(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Every file the run writes, with the option that names it."""
    files: list[tuple[str, Path]] = []
    if args.output is not None:
        files.append(("-o", args.output))
        if args.output.suffix in TORCH_SUFFIXES and not args.save_module:
            files.append(("-o (its fold record)", args.output.with_name(args.output.name + RECORD_SUFFIX)))
    if args.onnx is not None:
        files.append(("--onnx", args.onnx))
    return files


def _check_outputs(args: argparse.Namespace) -> None:
    for option, target in (("-o", args.output), ("--onnx", args.onnx)):
        if target is not None and target.is_dir():
            example = target / ("folded" + (".onnx" if option == "--onnx" else ".pt"))
            raise CliError(f"{option} '{target}' is a directory; name a file in it, e.g. {example}", ExitCode.USAGE)
    if args.output is not None and args.output.suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        hint = " (for ONNX, use --onnx)" if args.output.suffix == ".onnx" else ""
        raise CliError(
            f"-o '{args.output}': unsupported suffix '{args.output.suffix}'; use .safetensors or .pt/.pth "
            f"(a state_dict, or the whole module with --save-module){hint}",
            ExitCode.USAGE,
        )
    if args.onnx is not None and args.onnx.suffix != ".onnx":
        raise CliError(f"--onnx '{args.onnx}': an ONNX file must end in .onnx", ExitCode.USAGE)
    if args.save_module and (args.output is None or args.output.suffix not in TORCH_SUFFIXES):
        raise CliError("--save-module needs -o with a .pt/.pth file", ExitCode.USAGE)
    if args.output is not None and args.onnx is not None and _same_file(args.output, args.onnx):
        raise CliError("-o and --onnx name the same file", ExitCode.USAGE)
    source = input_file(args)
    for option, target in output_files(args):
        if _same_file(target, source) or _same_file(target, args.weights):
            raise CliError(
                f"refusing to write '{target}': it is the input file, which bnfold never overwrites", ExitCode.USAGE
            )
        if not target.parent.is_dir():
            raise CliError(f"cannot write '{target}': folder '{target.parent}' does not exist", ExitCode.USAGE)
        if target.exists() and not args.force:
            raise CliError(f"{option} '{target}' already exists; pass --force to overwrite it", ExitCode.USAGE)


def _check_packages(args: argparse.Namespace) -> None:
    """The optional packages the files named need, before any work is done."""
    safetensors = [p for p in (args.weights, args.output) if p is not None and p.suffix == ".safetensors"]
    if safetensors and importlib.util.find_spec("safetensors") is None:
        raise CliError(
            f"'{safetensors[0]}' needs the safetensors package: pip install safetensors (or 'bnfold[export]')",
            ExitCode.USAGE,
        )


def validate(args: argparse.Namespace) -> None:
    """Every check of the arguments that needs neither torch nor the model."""
    if not re.fullmatch(r"[a-z_]+(:\d+)?", args.device):
        raise CliError(f"--device '{args.device}' is not a device; write it as cpu, cuda or cuda:1", ExitCode.USAGE)
    _check_model_argument(args)
    _check_weights_argument(args)
    _check_outputs(args)
    _check_packages(args)
    if input_file(args) is not None and args.trust_pickle and args.input_shape is None:
        raise CliError(
            f"--input-shape is required for a model file such as '{args.model}' (e.g. --input-shape 1,3,224,224)",
            ExitCode.USAGE,
        )


def run(argv: list[str] | None, stdout: IO[str], stderr: IO[str]) -> int:
    """Parse ``argv``, check it, and run the command (importing torch only then)."""
    args = build_parser().parse_args(argv)
    validate(args)
    from .run import execute

    return execute(args, stdout, stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bnfold`` command; returns the exit code."""
    try:
        return run(argv, sys.stdout, sys.stderr)
    except CliError as error:
        sys.stderr.write(f"bnfold: error: {clean_message(error)}\n")
        return error.code
    except VerificationError as error:
        sys.stderr.write(f"bnfold: verification failed, nothing was written: {clean_message(error)}\n")
        return ExitCode.VERIFICATION
    except TraceError as error:
        sys.stderr.write(
            f"bnfold: error: the model could not run on the example input (check --input-shape): {clean_message(error)}\n"
        )
        return ExitCode.USAGE
    except BnfoldError as error:
        sys.stderr.write(f"bnfold: error: {clean_message(error)}\n")
        return ExitCode.INTERNAL
    except KeyboardInterrupt:
        sys.stderr.write("bnfold: interrupted\n")
        return 130
