"""A ROS 2 node that runs a vlexport detect bundle on an image topic and publishes ``vision_msgs/Detection2DArray``.

    python -m vlexport.ros2.node --ros-args -p bundle:=/path/to/bundle -p image_topic:=/camera/image_raw

rclpy, sensor_msgs, vision_msgs (and cv_bridge, for encodings read without it) are imported
when the node is built, never when vlexport is imported. Parameters, topics and the message
layout are described in docs/ros2.md; the logic lives in :class:`~vlexport.ros2.core.DetectorCore`.
"""

from __future__ import annotations

import sys
from typing import Any

from vlexport.errors import DependencyError, UsageError, VlexportError
from vlexport.ros2.convert import ENCODINGS, compressed_to_bgr, image_msg_to_bgr

__all__ = ["DetectionNode", "main", "PARAMETERS"]

NODE_NAME = "vlexport_detector"

#: Parameter → (default, what it does). Strings left empty mean "not set".
PARAMETERS: dict[str, tuple[Any, str]] = {
    "bundle": ("", "path of the detect bundle (required)"),
    "image_topic": ("/image_raw", "sensor_msgs/Image topic to detect in ('' for none)"),
    "compressed_image_topic": ("", "sensor_msgs/CompressedImage topic to detect in ('' for none)"),
    "detections_topic": ("~/detections", "vision_msgs/Detection2DArray output topic"),
    "precision": ("", "fp32, fp16 or int8 ('' = the fastest the bundle has for this device)"),
    "backend": ("", "onnxruntime or tensorrt ('' = the best available)"),
    "threads": (0, "onnxruntime CPU threads (0 = onnxruntime's default)"),
    "score_threshold": (-1.0, "minimum score, 0..1 (-1 = the bundle's); changeable at run time"),
    "vocabulary": ("", "class names (string array or 'a,b,c'); '--vocab-mode input' bundles; changeable"),
    "vocabulary_file": ("", ".npz with 'classes' and 'embeddings' precomputed; changeable"),
    "templates": ("", "optional: the prompt templates file the bundle was exported with, checked only "
                      "(bundles carry their templates)"),
    "track": (False, "give detections stable track ids (Detection2D.id); changeable"),
    "track_frame_rate": (30.0, "frames per second arriving, for the tracker's lost-track buffer"),
    "class_id_format": ("name", "hypothesis class_id: the class 'name' or its 'index'"),
}
# Parameters that only take effect when the node starts.
_STARTUP_ONLY = ("bundle", "image_topic", "compressed_image_topic", "detections_topic", "precision", "backend",
                 "threads", "templates", "track_frame_rate", "class_id_format")


def _import_ros() -> dict[str, Any]:
    """The ROS 2 Python modules the node needs, or a DependencyError saying how to get them."""
    try:
        import rclpy
        from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
        from rclpy.node import Node
        try:
            from rclpy.executors import ExternalShutdownException
        except ImportError:  # rclpy before Humble
            ExternalShutdownException = KeyboardInterrupt  # noqa: N806
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image
        from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose
    except ImportError as e:
        raise DependencyError(
            f"the ROS 2 node needs rclpy, sensor_msgs and vision_msgs ({e.name} is missing): source your ROS 2 "
            "setup (source /opt/ros/humble/setup.bash) and install ros-$ROS_DISTRO-vision-msgs"
        ) from e
    return dict(rclpy=rclpy, Node=Node, ExternalShutdownException=ExternalShutdownException,
                ParameterDescriptor=ParameterDescriptor,
                SetParametersResult=SetParametersResult, QoSProfile=QoSProfile, HistoryPolicy=HistoryPolicy,
                ReliabilityPolicy=ReliabilityPolicy, DurabilityPolicy=DurabilityPolicy, Image=Image,
                CompressedImage=CompressedImage, Detection2D=Detection2D, Detection2DArray=Detection2DArray,
                ObjectHypothesisWithPose=ObjectHypothesisWithPose)


def _fill_array(ros: dict[str, Any], fields: dict[str, Any], header: Any) -> Any:
    """A Detection2DArray from :func:`~vlexport.ros2.convert.detections_to_fields`' fields, with ``header``."""
    out = ros["Detection2DArray"]()
    out.header = header
    for d in fields["detections"]:
        det = ros["Detection2D"]()
        det.header = header
        det.id = d["id"]
        center, box = det.bbox.center, d["bbox"]
        # vision_msgs 4 (Humble and later) nests the centre in `position`; 3.x (Foxy) has x/y directly.
        point = center.position if hasattr(center, "position") else center
        point.x, point.y = box["center"]["position"]["x"], box["center"]["position"]["y"]
        center.theta = box["center"]["theta"]
        det.bbox.size_x, det.bbox.size_y = box["size_x"], box["size_y"]
        for r in d["results"]:
            hyp = ros["ObjectHypothesisWithPose"]()
            target = hyp.hypothesis if hasattr(hyp, "hypothesis") else hyp  # 3.x: id/score on the message
            if hasattr(target, "class_id"):
                target.class_id = r["hypothesis"]["class_id"]
            else:
                target.id = r["hypothesis"]["class_id"]
            target.score = r["hypothesis"]["score"]
            det.results.append(hyp)
        out.detections.append(det)
    return out


def _build_node_class() -> type:
    ros = _import_ros()
    Node = ros["Node"]

    class DetectionNode(Node):  # type: ignore[misc, valid-type]
        """Subscribes to images, publishes detections stamped with each image's header."""

        def __init__(self, node_name: str = NODE_NAME, **kwargs: Any):
            super().__init__(node_name, **kwargs)
            from vlexport.ros2.core import DetectorCore

            self._ros = ros
            self._bridge: Any = None
            self._warned: set[str] = set()
            for name, (default, doc) in PARAMETERS.items():
                # dynamic typing: `vocabulary` may be set as a string ('a,b') or a string array.
                desc = ros["ParameterDescriptor"](description=doc, dynamic_typing=name == "vocabulary")
                self.declare_parameter(name, default, desc)
            p = {name: self.get_parameter(name).value for name in PARAMETERS}
            if not p["bundle"]:
                raise UsageError("the 'bundle' parameter is required: --ros-args -p bundle:=/path/to/bundle")
            if not p["image_topic"] and not p["compressed_image_topic"]:
                raise UsageError("no input: set 'image_topic' or 'compressed_image_topic'")
            self.core = DetectorCore(
                p["bundle"],
                precision=p["precision"] or None,
                backend=p["backend"] or None,
                threads=p["threads"] or None,
                score_threshold=None if p["score_threshold"] < 0 else p["score_threshold"],
                vocabulary=p["vocabulary"] or None,
                vocabulary_file=p["vocabulary_file"] or None,
                templates=p["templates"] or None,
                track=p["track"],
                track_frame_rate=p["track_frame_rate"],
                class_id_format=p["class_id_format"],
            )
            self._track_rate = p["track_frame_rate"]
            # Only the newest frame matters: a slow model never works through a backlog.
            qos = ros["QoSProfile"](depth=1, history=ros["HistoryPolicy"].KEEP_LAST,
                                    reliability=ros["ReliabilityPolicy"].BEST_EFFORT,
                                    durability=ros["DurabilityPolicy"].VOLATILE)
            self.publisher = self.create_publisher(ros["Detection2DArray"], p["detections_topic"], 10)
            self._subs = []
            if p["image_topic"]:
                self._subs.append(self.create_subscription(ros["Image"], p["image_topic"], self._on_image, qos))
            if p["compressed_image_topic"]:
                self._subs.append(self.create_subscription(
                    ros["CompressedImage"], p["compressed_image_topic"], self._on_compressed, qos))
            # Registered after the declarations, so that declaring does not run it.
            self.add_on_set_parameters_callback(self._on_set_parameters)
            self.get_logger().info(
                f"bundle {p['bundle']} ({self.core.task.precision}, vocabulary {self.core.vocab_mode}, "
                f"{len(self.core.classes)} classes); listening on "
                f"{', '.join(s.topic_name for s in self._subs)}, publishing {self.publisher.topic_name}"
            )

        # -- images ------------------------------------------------------------------------
        def _on_image(self, msg: Any) -> None:
            self._detect_and_publish(
                lambda: image_msg_to_bgr(msg) if msg.encoding in ENCODINGS else self._bridge_to_bgr(msg), msg.header
            )

        def _on_compressed(self, msg: Any) -> None:
            self._detect_and_publish(lambda: compressed_to_bgr(msg.data), msg.header)

        def _bridge_to_bgr(self, msg: Any) -> Any:
            if self._bridge is None:
                try:
                    from cv_bridge import CvBridge
                except ImportError as e:
                    raise DependencyError(
                        f"image encoding {msg.encoding!r} needs cv_bridge (ros-$ROS_DISTRO-cv-bridge); "
                        f"encodings read without it: {', '.join(ENCODINGS)}"
                    ) from e
                self._bridge = CvBridge()
            return self._bridge.imgmsg_to_cv2(msg, desired_encoding="bgr8")

        def _detect_and_publish(self, to_bgr: Any, header: Any) -> None:
            try:
                bgr = to_bgr()
                fields = self.core.process(bgr, header.frame_id, (header.stamp.sec, header.stamp.nanosec))
            except VlexportError as e:
                # An unreadable frame is logged once per distinct problem, not once per frame.
                self._warn_once(str(e), f"frame skipped: {e}")
                return
            self.publisher.publish(_fill_array(self._ros, fields, header))

        def _warn_once(self, key: str, text: str) -> None:
            if key not in self._warned:
                self._warned.add(key)
                self.get_logger().error(text)

        # -- parameters --------------------------------------------------------------------
        def _on_set_parameters(self, params: list) -> Any:
            result = self._ros["SetParametersResult"]
            new = {p.name: p.value for p in params}
            try:
                fixed = sorted(set(new) & set(_STARTUP_ONLY))
                if fixed:
                    raise UsageError(f"{fixed} only take effect at start: restart the node to change them")
                threshold = new.get("score_threshold")
                if threshold is not None and threshold > 1:  # checked first: nothing changes if one value is bad
                    raise UsageError(f"score_threshold must be between 0 and 1 (or -1: the bundle's), got {threshold}")
                if "vocabulary" in new or "vocabulary_file" in new:
                    names = new.get("vocabulary", self.get_parameter("vocabulary").value)
                    file = new.get("vocabulary_file", self.get_parameter("vocabulary_file").value) or None
                    if not names:  # '' or []: the bundle's own classes
                        names = self.core.default_classes
                    classes = self.core.set_vocabulary(names, vocabulary_file=file)
                    self.get_logger().info(f"vocabulary set to {classes}")
                if threshold is not None:
                    self.core.set_score_threshold(None if threshold < 0 else threshold)
                if "track" in new:
                    self.core.set_tracking(bool(new["track"]), self._track_rate)
            except VlexportError as e:
                self.get_logger().error(f"parameter change refused: {e}")
                return result(successful=False, reason=str(e))
            return result(successful=True)

        def destroy_node(self) -> None:
            core = getattr(self, "core", None)
            if core is not None:
                core.close()
            super().destroy_node()

    return DetectionNode


_NODE_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    # `DetectionNode` subclasses rclpy's Node, so it is built (importing rclpy) on first access.
    global _NODE_CLASS
    if name == "DetectionNode":
        if _NODE_CLASS is None:
            _NODE_CLASS = _build_node_class()
        return _NODE_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(args: list[str] | None = None) -> int:
    """Entry point: ``python -m vlexport.ros2.node --ros-args -p bundle:=PATH``; returns the exit status."""
    try:
        ros = _import_ros()
    except DependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    rclpy = ros["rclpy"]
    rclpy.init(args=args)
    node = None
    try:
        node = __getattr__("DetectionNode")()
        rclpy.spin(node)
    except (KeyboardInterrupt, ros["ExternalShutdownException"]):
        pass  # Ctrl-C or `ros2 lifecycle`/launch shutting the context down
    except VlexportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
