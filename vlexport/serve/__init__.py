"""Serve bundles with NVIDIA Triton Inference Server: the model repository, the server and the client.

>>> from vlexport.serve import write_repository
>>> report = write_repository(["bundles/yolo-yolov8n"], "triton-repo")   # python layout
>>> print(report.summary())

:mod:`contract` is the request/response tensor contract (shared with the client),
:mod:`config` renders and schema-checks ``config.pbtxt``, :mod:`repository` writes repositories,
:mod:`python_model` and :mod:`stage_model` are the Python-backend models copied into them;
:mod:`env` builds the server's own environment (numpy<2), :mod:`server` runs ``tritonserver``
and :mod:`client` is the remote task `vlexport run --server` uses.
Torch-free; ``tritonclient`` (the ``serve`` extra) is needed only for the schema check.
"""

from __future__ import annotations

from typing import Any

__all__ = ["write_repository", "RepositoryReport"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vlexport.serve import repository

        return getattr(repository, name)
    raise AttributeError(name)
