"""The backend interface: a context manager that runs one graph on validated feeds.

In the spirit of Polygraphy's runners: ``inputs``/``outputs`` come from the model itself and
``infer`` checks names, dtypes and shapes of every feed before running, reporting every problem
in one error.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from vlexport.errors import UsageError
from vlexport.runtime.spec import TensorSpec, check_feeds

__all__ = ["Backend"]


class Backend(abc.ABC):
    """One loaded model on one device. Use as a context manager or call :meth:`close`."""

    #: Registry name of the backend kind ("onnxruntime", ...).
    name: str = "backend"
    #: Set by each implementation from the loaded model.
    _inputs: list[TensorSpec]
    _outputs: list[TensorSpec]

    # -- description -------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorSpec]:
        """Input specs as the loaded model declares them."""
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        """Output specs as the loaded model declares them."""
        return list(self._outputs)

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where it runs, in words (e.g. ``"CPUExecutionProvider"``)."""

    # -- running -----------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``feeds`` against :attr:`inputs` (all problems in one UsageError), then run."""
        if not isinstance(feeds, dict):
            raise UsageError(f"{self.name}: feeds must be a dict of name -> numpy array, got {type(feeds).__name__}")
        problems = check_feeds(self.inputs, feeds)
        if problems:
            raise UsageError(f"{self.name}: invalid inputs: " + "; ".join(problems))
        return self._run(feeds)

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run validated feeds; returns every output by name."""

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Release the model (idempotent)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r})"
