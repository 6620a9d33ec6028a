"""Tensor contracts shared by the exporter (which writes them) and the runtime (which checks feeds).

Kept free of torch so that the runtime can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np

Dim = Union[int, str]

_DTYPES = {"float32", "float16", "int64", "int32", "uint8", "bool"}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one graph input or output; string dims are named dynamic axes."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))

    def check(self, array: np.ndarray, bindings: dict[str, int] | None = None) -> str | None:
        """Return a message describing why ``array`` does not fit this spec, or None if it does.

        ``bindings`` carries named-axis sizes already seen in other tensors so that, e.g., two
        inputs sharing the axis "batch" must agree.
        """
        if str(array.dtype) != self.dtype:
            return f"{self.name}: got dtype {array.dtype}, expected {self.dtype}"
        if array.ndim != len(self.shape):
            return f"{self.name}: got shape {tuple(array.shape)}, expected {self.shape}"
        for axis, (got, want) in enumerate(zip(array.shape, self.shape)):
            if isinstance(want, int):
                if got != want:
                    return f"{self.name}: got shape {tuple(array.shape)}, expected {self.shape} (axis {axis})"
            elif bindings is not None:
                seen = bindings.setdefault(want, got)
                if seen != got:
                    return f"{self.name}: axis {want!r} is {got} here but {seen} in another tensor"
        return None


@dataclass(frozen=True)
class PartSignature:
    """The inputs and outputs of one exported part (its tensor contract)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartSignature":
        return cls(
            inputs=tuple(TensorSpec.from_dict(x) for x in d.get("inputs", [])),
            outputs=tuple(TensorSpec.from_dict(x) for x in d.get("outputs", [])),
        )


def check_feeds(specs: Sequence[TensorSpec], feeds: dict[str, np.ndarray]) -> list[str]:
    """Every problem with ``feeds`` against ``specs``, reported together (empty list when fine)."""
    problems: list[str] = []
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in feeds]
    extra = sorted(set(feeds) - names)
    if missing:
        problems.append(f"missing inputs {missing}")
    if extra:
        problems.append(f"unexpected inputs {extra} (expected {sorted(names)})")
    bindings: dict[str, int] = {}
    for spec in specs:
        if spec.name in feeds:
            msg = spec.check(np.asarray(feeds[spec.name]), bindings)
            if msg:
                problems.append(msg)
    return problems
