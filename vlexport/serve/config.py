"""Triton ``config.pbtxt`` text, generated from plain data and checked against Triton's own schema.

:func:`render` turns nested dicts/lists into protobuf text format (an :class:`Enum` value is
written bare: ``data_type: TYPE_FP32``); :func:`check_config` parses the text into
``tritonclient.grpc.model_config_pb2.ModelConfig``, the protobuf the server loads, so an unknown
field, a bad enum or a wrong type fails here, naming the model, before a repository is written.
The ``build_*`` functions make the configs of each kind of model: python, part, ensemble.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlexport.errors import DependencyError, ExportError

__all__ = ["Enum", "render", "check_config", "load_model_config_schema", "tensor_entries", "python_config",
           "part_config", "ensemble_config", "batching_blocks"]


class Enum(str):
    """A protobuf enum value (``TYPE_FP32``, ``KIND_GPU``): rendered without quotes."""


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) in a model config")


def render(config: Mapping[str, Any], indent: int = 0) -> str:
    """Protobuf text format of ``config``: dicts are messages, lists of dicts repeated messages,
    lists of scalars repeated scalars; None values are left out."""
    pad = "  " * indent
    lines: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            lines.append(f"{pad}{key} {{\n{render(value, indent + 1)}{pad}}}\n")
        elif isinstance(value, (list, tuple)):
            if value and all(isinstance(v, Mapping) for v in value):
                blocks = ",\n".join(f"{pad}  {{\n{render(v, indent + 2)}{pad}  }}" for v in value)
                lines.append(f"{pad}{key} [\n{blocks}\n{pad}]\n")
            elif value:
                lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]\n")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}\n")
    return "".join(lines)


def load_model_config_schema() -> Any:
    """The ``ModelConfig`` protobuf class of ``tritonclient`` (the ``serve`` extra)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise DependencyError(
            f"checking Triton model configs needs tritonclient[grpc] ({e}); pip install 'vlexport[serve]'"
        ) from None
    return model_config_pb2.ModelConfig


def check_config(name: str, text: str) -> Any:
    """Parse ``text`` as a Triton ModelConfig; a failure is an ExportError naming model ``name``.

    Returns the parsed protobuf message. Also checks that its ``name`` field is ``name``.
    """
    schema = load_model_config_schema()
    from google.protobuf import text_format

    try:
        message = text_format.Parse(text, schema())
    except text_format.ParseError as e:
        raise ExportError(f"model {name!r}: its config.pbtxt does not fit Triton's ModelConfig schema: {e}") from None
    if message.name != name:
        raise ExportError(f"model {name!r}: its config.pbtxt names the model {message.name!r}")
    return message


# -- pieces of a config ----------------------------------------------------------------------------
def tensor_entries(defs: Sequence[Any]) -> list[dict[str, Any]]:
    """``input``/``output`` entries from :class:`~vlexport.serve.contract.TensorDef` s."""
    out = []
    for d in defs:
        entry: dict[str, Any] = {"name": d.name, "data_type": Enum(d.data_type), "dims": list(d.dims)}
        if getattr(d, "optional", False):
            entry["optional"] = True
        out.append(entry)
    return out


def batching_blocks(max_batch_size: int, max_queue_delay_us: int,
                    preferred_batch_sizes: Sequence[int] | None) -> dict[str, Any]:
    """``max_batch_size`` and, when it is above 0, ``dynamic_batching``."""
    out: dict[str, Any] = {"max_batch_size": int(max_batch_size)}
    if max_batch_size > 0:
        block: dict[str, Any] = {}
        if preferred_batch_sizes:
            block["preferred_batch_size"] = [int(b) for b in preferred_batch_sizes]
        block["max_queue_delay_microseconds"] = int(max_queue_delay_us)
        out["dynamic_batching"] = block
    return out


def _parameters(params: Mapping[str, str]) -> list[dict[str, Any]] | None:
    if not params:
        return None
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in params.items()]


def _instances(count: int, kind: str) -> list[dict[str, Any]]:
    return [{"count": int(count), "kind": Enum(kind)}]


def python_config(name: str, inputs: Sequence[Any], outputs: Sequence[Any], *, max_batch_size: int,
                  max_queue_delay_us: int, preferred_batch_sizes: Sequence[int] | None, instances: int,
                  instance_kind: str, parameters: Mapping[str, str]) -> dict[str, Any]:
    """A Python-backend model (``backend: "python"``) with dynamic batching and instance groups."""
    return {
        "name": name,
        "backend": "python",
        **batching_blocks(max_batch_size, max_queue_delay_us, preferred_batch_sizes),
        "input": tensor_entries(inputs),
        "output": tensor_entries(outputs),
        "instance_group": _instances(instances, instance_kind),
        "parameters": _parameters(parameters),
    }


def part_config(name: str, platform: str, inputs: Sequence[Any], outputs: Sequence[Any], *, max_batch_size: int,
                max_queue_delay_us: int, preferred_batch_sizes: Sequence[int] | None, instances: int,
                instance_kind: str, model_filename: str) -> dict[str, Any]:
    """One bundle part served by Triton's ``onnxruntime_onnx`` or ``tensorrt_plan`` platform."""
    return {
        "name": name,
        "platform": platform,
        **batching_blocks(max_batch_size, max_queue_delay_us, preferred_batch_sizes),
        "default_model_filename": model_filename,
        "input": tensor_entries(inputs),
        "output": tensor_entries(outputs),
        "instance_group": _instances(instances, instance_kind),
    }


def ensemble_config(name: str, inputs: Sequence[Any], outputs: Sequence[Any], *, max_batch_size: int,
                    steps: Sequence[tuple[str, Mapping[str, str], Mapping[str, str]]],
                    parameters: Mapping[str, str]) -> dict[str, Any]:
    """``platform: "ensemble"``: ``steps`` are (model, input_map, output_map), each map from the
    step model's tensor name to the ensemble's tensor name."""
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": int(max_batch_size),
        "input": tensor_entries(inputs),
        "output": tensor_entries(outputs),
        "ensemble_scheduling": {
            "step": [
                {"model_name": model, "model_version": -1,
                 "input_map": [{"key": k, "value": v} for k, v in imap.items()],
                 "output_map": [{"key": k, "value": v} for k, v in omap.items()]}
                for model, imap, omap in steps
            ]
        },
        "parameters": _parameters(parameters),
    }
