"""ROS 2 integration: a detection node (:mod:`vlexport.ros2.node`) and the ROS-free logic it uses.

Importing this package imports neither rclpy nor any ROS message package: the node module
imports them when it runs. What is here works (and is tested) without ROS:

* :func:`image_to_bgr` / :func:`image_msg_to_bgr` / :func:`compressed_to_bgr`: image messages → BGR arrays;
* :func:`detections_to_fields`: :class:`~vlexport.runtime.results.Detections` → the fields of a
  ``vision_msgs/Detection2DArray``;
* :class:`VocabularyEncoder`: class names → text embeddings for a ``--vocab-mode input`` bundle;
* :class:`DetectorCore`: the node's logic (bundle, tracker, vocabulary changes) on plain arrays.

Run the node with ``python -m vlexport.ros2.node --ros-args -p bundle:=/path/to/bundle``
(see docs/ros2.md).
"""

from __future__ import annotations

from vlexport.ros2.convert import (
    CLASS_ID_FORMATS,
    ENCODINGS,
    compressed_to_bgr,
    detections_to_fields,
    image_msg_to_bgr,
    image_to_bgr,
    stamp_to_seconds,
)
from vlexport.ros2.core import DetectorCore
from vlexport.ros2.vocabulary import VocabularyEncoder, load_embeddings_file, parse_class_names

__all__ = [
    "CLASS_ID_FORMATS",
    "ENCODINGS",
    "DetectorCore",
    "VocabularyEncoder",
    "compressed_to_bgr",
    "detections_to_fields",
    "image_msg_to_bgr",
    "image_to_bgr",
    "load_embeddings_file",
    "parse_class_names",
    "stamp_to_seconds",
]
