"""The errors bnfold raises: one base class, one subclass per pipeline stage.

Bad arguments from the caller raise the built-in ``TypeError`` / ``ValueError``
instead; everything that goes wrong while discovering, folding or checking a
model is a :class:`BnfoldError`, so ``except bnfold.BnfoldError`` catches all of
bnfold's own failures and nothing else.
"""

from __future__ import annotations

import re

__all__ = ["BnfoldError", "TraceError", "FoldError", "VerificationError", "CheckpointError", "clean_message"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def clean_message(error: BaseException | str) -> str:
    """An error's text without terminal colour codes (torch puts some into its load errors), for messages
    that quote it.

    >>> clean_message("\\x1b[1mbold\\x1b[0m text")
    'bold text'
    """
    return _ANSI.sub("", str(error)).strip()


class BnfoldError(Exception):
    """Base class of every error bnfold raises about a model."""


class TraceError(BnfoldError):
    """The data flow of the model could not be discovered (tracing or running it failed)."""


class FoldError(BnfoldError):
    """A planned fold could not be applied to the model.

    Attributes:
        norm: the norm (constant, or merged block) whose fold failed, when it is known.
    """

    def __init__(self, message: str, *, norm: str | None = None) -> None:
        super().__init__(message)
        self.norm = norm


class VerificationError(BnfoldError):
    """The folded model's outputs differ from the original's beyond the tolerance.

    Attributes:
        output: path of the worst output in the model's output structure, e.g. ``"[0]['logits']"``.
        error: its maximum absolute difference.
        tolerance: the tolerance it was compared against.
        layers_match: after a failed output check, whether every folded layer matched the original on the
            same inputs (``False``: a fold is wrong, and the message names it; ``True``: each fold is right but
            the outputs are not, so the plan misread how the layers are connected; ``None``: the per-layer
            check could not run).
    """

    def __init__(
        self, message: str, *, output: str, error: float, tolerance: float, layers_match: bool | None = None
    ) -> None:
        super().__init__(message)
        self.output = output
        self.error = error
        self.tolerance = tolerance
        self.layers_match = layers_match


class CheckpointError(BnfoldError):
    """A folded checkpoint cannot be written for this model, or does not fit the model it is loaded into."""
