"""Weight-only quantisation for decoder-style graphs: MatMul weights stored as 8- or 4-bit blocks (MatMulNBits).

Token-by-token decoding multiplies one row by every weight matrix: the step is bound by how many
weight bytes it reads, not by arithmetic, so activation calibration buys nothing and 8-bit
weights (a quarter of the bytes; 4-bit: an eighth) make each step several times faster on a
CPU. The weights are quantised symmetrically in blocks along the input axis (128 values per
scale at 8 bits, 32 at 4 bits, where the coarser grid needs finer scales); ``accuracy_level=4``
lets onnxruntime multiply in int8 with int32 accumulation. ``MatMulNBits`` is an onnxruntime operator
(``com.microsoft``): graphs made here run on onnxruntime (CPU or CUDA), not on TensorRT.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from vlexport.errors import DependencyError, ExportError

log = logging.getLogger("vlexport")

WEIGHT_BITS = (8, 4)
_BLOCK = {8: 128, 4: 32}


def quantize_weights(src: str | Path, dst: str | Path, *, bits: int = 8, block_size: int | None = None) -> dict[str, Any]:
    """Write ``dst``: ``src`` with every MatMul by a constant weight turned into ``bits``-bit ``MatMulNBits``.

    Returns what was done: method, bits, block size, and how many MatMuls were converted.
    """
    if bits not in WEIGHT_BITS:
        raise ExportError(f"weight-only quantisation takes {' or '.join(map(str, WEIGHT_BITS))} bits, got {bits}")
    block_size = block_size or _BLOCK[bits]
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # onnxruntime's quantiser needs the onnx_ir package
        raise DependencyError(f"weight-only INT8 needs {e.name or 'onnx_ir'}: pip install 'vlexport[export]'") from e
    # The quantiser logs every node at INFO: keep our own single line instead.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    out = quantizer.model.model
    ops = Counter(n.op_type for n in out.graph.node)
    if ops.get("MatMulNBits", 0) == 0:
        raise ExportError(f"{Path(src).name}: no MatMul with constant weights to quantise")
    onnx.save(out, str(dst))
    log.info("weight-only %d-bit: %d MatMul(s) -> MatMulNBits (block %d)", bits, ops["MatMulNBits"], block_size)
    return {"method": f"weight-only-{bits}bit-matmulnbits", "bits": bits, "block_size": block_size,
            "quantized_nodes": int(ops["MatMulNBits"]),
            "remaining_float_matmuls": int(ops.get("MatMul", 0))}
