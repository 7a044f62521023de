"""One exception hierarchy for virchow-rt.

Every message says what failed, the offending value, and how to fix it. The CLI prints
``str(error)`` as a single line on stderr and exits non-zero (``--debug`` shows the traceback).
"""

from __future__ import annotations

import warnings


class VirchowError(Exception):
    """Base class of every error virchow-rt raises on purpose."""

    exit_code = 1


class MissingDependency(VirchowError):
    """An optional package is needed for what was asked and is not importable."""

    exit_code = 3


class InputError(VirchowError):
    """Tiles, images, arrays or arguments that cannot be used as given."""

    exit_code = 2


class OutputError(VirchowError):
    """An output location that cannot be written: not writable, not a folder, or out of space."""

    exit_code = 2


class WeightsError(VirchowError):
    """Weights that cannot be found, read, or that do not fit the variant."""

    exit_code = 2


class ModelFileError(VirchowError):
    """An exported model, engine or manifest that is missing, truncated or inconsistent."""

    exit_code = 2


class ParityError(VirchowError):
    """An artifact's embeddings disagree with the PyTorch reference beyond the variant's tolerance."""

    exit_code = 4


class BackendError(VirchowError):
    """A backend (ONNX Runtime, TensorRT, CUDA) failed while building, loading or running."""

    exit_code = 5


class RandomWeightsWarning(UserWarning):
    """A model with random weights is in use: its embeddings mean nothing (tests and demos only)."""


def warn_random_weights(what: str) -> None:
    """The one RANDOM WEIGHTS notice, in one format: ``RANDOM WEIGHTS: <what>: ...``.

    The CLI prints the first of a command only (``virchow_rt.cli.main``); every output is labelled too.
    """
    warnings.warn(
        f"RANDOM WEIGHTS: {what}: its embeddings are meaningless (tests and demos only; "
        "--weights for real ones)",
        RandomWeightsWarning,
        stacklevel=3,
    )
