"""ROS-free conversions between ROS 2 message fields and vlexport's arrays and results.

Everything here takes plain values (or any object with the message's attribute names), so it
runs and is tested without rclpy; :mod:`vlexport.ros2.node` only copies these values into
real messages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlexport.errors import SourceError, UsageError
from vlexport.runtime.results import Detections

__all__ = [
    "ENCODINGS",
    "CLASS_ID_FORMATS",
    "image_to_bgr",
    "image_msg_to_bgr",
    "compressed_to_bgr",
    "stamp_to_seconds",
    "detections_to_fields",
]

# sensor_msgs/Image encodings read here without cv_bridge: (channels, channel order).
# The OpenCV-style type names are the same layouts; 8UC3 is BGR by ROS convention.
ENCODINGS: dict[str, tuple[int, str]] = {
    "bgr8": (3, "bgr"),
    "rgb8": (3, "rgb"),
    "bgra8": (4, "bgra"),
    "rgba8": (4, "rgba"),
    "mono8": (1, "mono"),
    "8UC1": (1, "mono"),
    "8UC3": (3, "bgr"),
    "8UC4": (4, "bgra"),
}

#: What a hypothesis's ``class_id`` string holds: the class name or its index in the vocabulary.
CLASS_ID_FORMATS = ("name", "index")


def image_to_bgr(encoding: str, height: int, width: int, step: int, data: Any) -> np.ndarray:
    """A ``sensor_msgs/Image``'s fields → a new contiguous ``[height, width, 3]`` BGR uint8 array.

    ``step`` is the row length in bytes; it may exceed ``width * channels`` (padded rows, as some
    camera drivers send), the padding is dropped. ``data`` is anything with the buffer protocol
    (bytes, ``array.array``, a numpy array). Encodings: the keys of :data:`ENCODINGS`; any other
    raises :class:`~vlexport.errors.UsageError` (the node then falls back to cv_bridge).
    """
    if encoding not in ENCODINGS:
        raise UsageError(f"image encoding {encoding!r} is not read directly; supported: {', '.join(ENCODINGS)}")
    channels, order = ENCODINGS[encoding]
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise SourceError(f"image message of size {width}x{height}: nothing to detect in")
    row = width * channels
    if step < row:
        raise SourceError(f"{encoding} image message: step {step} is shorter than a row of {row} bytes")
    buf = np.frombuffer(data, dtype=np.uint8)
    # The last row needs no padding after it: some publishers trim it.
    need = step * (height - 1) + row
    if buf.size < need:
        raise SourceError(f"{encoding} image message {width}x{height} (step {step}): {buf.size} bytes, need {need}")
    rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row), strides=(step, 1), writeable=False)
    pixels = rows.reshape(height, width, channels)
    if order == "mono":
        return np.ascontiguousarray(np.repeat(pixels, 3, axis=2))
    if order == "bgr":
        return np.array(pixels, copy=True)
    if order == "rgb":
        return np.ascontiguousarray(pixels[:, :, ::-1])
    if order == "bgra":
        return np.ascontiguousarray(pixels[:, :, :3])
    return np.ascontiguousarray(pixels[:, :, 2::-1])  # rgba: R G B → B G R, alpha dropped


def image_msg_to_bgr(msg: Any) -> np.ndarray:
    """:func:`image_to_bgr` on an object with ``sensor_msgs/Image``'s attributes."""
    return image_to_bgr(msg.encoding, msg.height, msg.width, msg.step, msg.data)


def compressed_to_bgr(data: Any) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage``'s ``data`` (JPEG, PNG …) → BGR uint8 ``[H, W, 3]``."""
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise SourceError(f"compressed image message of {buf.size} bytes could not be decoded")
    return img


def stamp_to_seconds(sec: int, nanosec: int) -> float:
    """A ``builtin_interfaces/Time`` as float seconds."""
    return int(sec) + int(nanosec) * 1e-9


def detections_to_fields(
    detections: Detections,
    *,
    frame_id: str = "",
    stamp: tuple[int, int] = (0, 0),
    class_id_format: str = "name",
) -> dict[str, Any]:
    """The fields of a ``vision_msgs/Detection2DArray`` (vision_msgs 4, ROS 2 Humble and later).

    Returns ``{"header": {"stamp": {"sec", "nanosec"}, "frame_id"}, "detections": [...]}`` where
    each detection is ``{"header", "id", "bbox": {"center": {"position": {"x", "y"}, "theta"},
    "size_x", "size_y"}, "results": [{"hypothesis": {"class_id", "score"}}]}``: box centre and size
    in image pixels, ``id`` the track id as text ("" when untracked), one hypothesis with the
    class name (``class_id_format="name"``) or its index as text (``"index"``) and the score.
    """
    if class_id_format not in CLASS_ID_FORMATS:
        raise UsageError(f"unknown class id format {class_id_format!r}; choose one of {', '.join(CLASS_ID_FORMATS)}")
    header = {"stamp": {"sec": int(stamp[0]), "nanosec": int(stamp[1])}, "frame_id": str(frame_id)}
    boxes = detections.boxes.astype(np.float64)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    sizes = boxes[:, 2:] - boxes[:, :2]
    tracks = detections.track_ids
    out = []
    for i in range(len(detections)):
        cls = detections.labels[i] if class_id_format == "name" else str(int(detections.class_ids[i]))
        track = int(tracks[i]) if tracks is not None else -1
        out.append({
            "header": dict(header, stamp=dict(header["stamp"])),
            "id": str(track) if track >= 0 else "",
            "bbox": {
                "center": {"position": {"x": float(centers[i, 0]), "y": float(centers[i, 1])}, "theta": 0.0},
                "size_x": float(sizes[i, 0]),
                "size_y": float(sizes[i, 1]),
            },
            "results": [{"hypothesis": {"class_id": cls, "score": float(detections.scores[i])}}],
        })
    return {"header": header, "detections": out}
