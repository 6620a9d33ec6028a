"""The old import path of the engine cache, kept only for ``vlexport build`` in cli.py.

The cache now lives in :mod:`vlexport.runtime.engine_cache` and the TensorRT builder in
:mod:`vlexport.runtime.backends.tensorrt_build`; delete this module once cli.py imports
``engine_precisions`` from the former and ``ensure_engine`` from the latter.
"""

from vlexport.runtime.backends.tensorrt_build import ensure_engine
from vlexport.runtime.engine_cache import engine_precisions

__all__ = ["engine_precisions", "ensure_engine"]
