"""User-facing errors: one line that says what is wrong and what to do.

Anything raised as a `QuantcheckError` is printed by the CLI as a single line with exit code 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QuantcheckError(Exception):
    """A problem with the user's input or environment that they can fix."""

    exit_code = 2


class ModelNotFoundError(QuantcheckError):
    """The model folder or hub id cannot be resolved."""


class DatasetError(QuantcheckError):
    """A data set cannot be read or does not match the documented schema."""


class QuantMethodError(QuantcheckError):
    """A quantization method is unknown, unsupported on the device, or not installed."""


class ResultsFolderError(QuantcheckError):
    """The --out folder cannot be written or belongs to a different run."""
