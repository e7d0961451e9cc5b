"""The command line's model: a built-in architecture with optional ``--weights``, or a whole pickled model.

When weights do not fit, the error says which keys are missing or unexpected and how many, which shapes
differ, whether the classifier size is all that differs (``--num-classes``), and whether the file is a folded
checkpoint. A pickled model's classes are looked up in the current folder, as ``python -m`` does, and a class
that was defined in a script's ``__main__`` is explained.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, clean_message
from ..io.checkpoint import read_record
from ..io.state_dict import PickledObjectError, StateDictError, compare_state, read_state_dict, strip_wrapper_prefixes
from .errors import CliError, ExitCode
from .zoo import ArchitectureError, build_named_model, parse_model_name

__all__ = ["LoadedModel", "load_model"]


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    input_shape: tuple[int, ...] | None  # the architecture's default input shape, if known
    notes: list[str]  # things the user should know (a stripped key prefix)


def _builder_call(spec: str, num_classes: int | None) -> str:
    """Python that builds the named architecture, for messages."""
    library, name = parse_model_name(spec) or ("", spec)
    classes = "" if num_classes is None else f", num_classes={num_classes}"
    if library == "torchvision":
        return f"torchvision.models.get_model('{name}', weights=None{classes})"
    return f"timm.create_model('{name}', pretrained=False{classes})"


def _load_weights(model: nn.Module, path: Path, spec: str, num_classes: int | None) -> list[str]:
    try:
        state, metadata = read_state_dict(path)
        record = read_record(path, metadata)
    except PickledObjectError as error:
        raise CliError(
            f"{error} If so, pass it as the model argument with --trust-pickle (bnfold {path} --trust-pickle "
            "--input-shape ...), or save model.state_dict() instead",
            ExitCode.UNREADABLE,
        ) from error
    except (StateDictError, CheckpointError) as error:
        raise CliError(str(error), ExitCode.UNREADABLE) from error
    load_hint = f"bnfold.load_folded({_builder_call(spec, num_classes)}, '{path}')"
    if record is not None:
        raise CliError(
            f"'{path}' is a folded checkpoint (written by bnfold): it is folded already. Load it in Python with "
            f"{load_hint}",
            ExitCode.UNREADABLE,
        )
    expected = model.state_dict()
    state, stripped = strip_wrapper_prefixes(state, set(expected))
    fit = compare_state(expected, state)
    if fit.ok:
        model.load_state_dict(state)
        return [f"removed the prefix {p} from every key of '{path}'" for p in stripped]
    details = fit.describe()
    if fit.looks_folded(model):
        raise CliError(
            f"'{path}' looks like a folded checkpoint of {spec} (its norm layers are missing and the layers before "
            f"them have gained biases): {details}. Folded checkpoints written by bnfold load with {load_hint}",
            ExitCode.UNREADABLE,
        )
    classes = fit.classifier_outputs()
    if classes is not None:
        hint = f"; only the classifier differs, with {classes} outputs in the file: pass --num-classes {classes}"
    elif fit.matching < fit.expected // 2:
        hint = f"; it does not look like weights for {spec}"
    else:
        hint = ""
    raise CliError(f"'{path}' does not fit {spec}: {details}{hint}", ExitCode.UNREADABLE)


def _pickle_error(path: Path, error: BaseException) -> CliError:
    """Say why a pickled model's class cannot be found, and what to do."""
    text = clean_message(error)
    missing_class = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", text)
    main = sys.modules.get("__main__")
    main_names = {"__main__", getattr(getattr(main, "__spec__", None), "name", "__main__")}
    if missing_class and missing_class.group(2) in main_names:  # pickle looked in the running program's __main__
        name = missing_class.group(1)
        return CliError(
            f"cannot load '{path}': its class {name} was defined in the script that saved it (its __main__), "
            f"which pickle cannot find from here. Either save the weights, torch.save(model.state_dict(), ...), "
            f"and load them into {name}() yourself (or pass them with --weights to a built-in architecture), or "
            f"move {name} into a module (e.g. models.py) that the script imports, save the model again, and run "
            "bnfold from the folder that holds that module",
            ExitCode.UNREADABLE,
        )
    if missing_class:
        name, module = missing_class.groups()
        return CliError(
            f"cannot load '{path}': module '{module}' has no {name}; the model was saved with another version of "
            "that code",
            ExitCode.UNREADABLE,
        )
    if isinstance(error, ModuleNotFoundError) and error.name:
        return CliError(
            f"cannot load '{path}': its classes live in the module '{error.name}', which is not importable from "
            f"here (bnfold searched the current folder, {os.getcwd()}): run bnfold from the folder that holds "
            f"{error.name.split('.')[0]}, or add that folder to PYTHONPATH",
            ExitCode.UNREADABLE,
        )
    return CliError(f"cannot load '{path}': {type(error).__name__}: {text}", ExitCode.UNREADABLE)


def _load_pickled_model(path: Path, trust: bool) -> nn.Module:
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
    # the classes a pickle names are imported; like `python -m`, look in the current folder too
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise _pickle_error(path, error) from error
    if not isinstance(loaded, nn.Module):
        raise CliError(f"'{path}' holds a {type(loaded).__name__}, not a torch.nn.Module", ExitCode.UNREADABLE)
    return loaded


def load_model(spec: str, weights: Path | None, num_classes: int | None, trust_pickle: bool, seed: int) -> LoadedModel:
    """The model the command line names (arguments already checked by bnfold.cli.validate)."""
    if parse_model_name(spec) is not None:
        torch.manual_seed(seed)
        try:
            named = build_named_model(spec, num_classes)
        except ArchitectureError as error:
            raise CliError(str(error), ExitCode.USAGE) from error
        notes = [] if weights is None else _load_weights(named.model, weights, spec, num_classes)
        return LoadedModel(named.model, named.input_shape, notes)
    return LoadedModel(_load_pickled_model(Path(spec), trust_pickle), None, [])
