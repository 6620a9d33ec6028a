"""Open-vocabulary (or fixed-class) detection from a bundle's ``detector`` part."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.manifest import Section
from vlexport.runtime.postprocess import select_detections
from vlexport.runtime.preprocess import LetterboxInfo, scale_boxes_to_source
from vlexport.runtime.results import Detections, FrameStamp
from vlexport.runtime.tasks.base import PartTask, Prepared

__all__ = ["DetectTask"]

TEXT_INPUT = "text_embeddings"
_OUTPUTS = ("boxes", "scores", "class_ids")
_DEFAULTS: dict[str, Any] = {
    "score_threshold": 0.25,
    "iou_threshold": 0.5,
    "max_detections": 300,
    "class_agnostic": False,
}


class DetectTask(PartTask):
    """Frames in (BGR uint8), :class:`Detections` out, all settings from the bundle's manifest.

    ``overrides`` replace the manifest's post-processing settings: ``score_threshold``,
    ``iou_threshold``, ``max_detections``, ``class_agnostic`` (a value of None keeps the manifest's).
    After each call :attr:`timings` holds the milliseconds spent per stage.
    """

    part_name = "detector"

    #: ``detect(..., prepared=)`` takes a frame pre-processed ahead by :meth:`prepare`.
    accepts_prepared = True

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        precision: str | None = None,
        backend: str | None = None,
        threads: int | None = None,
        **overrides: Any,
    ):
        bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        # Validate the cheap things before hashing and loading the model.
        post = _postprocess_settings(bundle.section("postprocess"), overrides)
        self._threads = threads
        self._text_encoder: Any = None  # TextEncoder, loaded by the first set_vocabulary(names)
        super().__init__(bundle, precision=precision, backend=backend, threads=threads)
        self.settings: dict[str, Any] = post
        vocab = self.bundle.meta.vocabulary or {}
        self.vocab_mode: str = vocab.get("mode", "baked")
        self.classes: list[str] = self.bundle.classes
        self._extra: dict[str, np.ndarray] = {}
        has_text_input = any(s.name == TEXT_INPUT for s in self.backend.inputs)
        try:
            if self.vocab_mode == "input":
                if not has_text_input:
                    raise BundleError(
                        f"{self.bundle.root}: vocabulary mode is 'input' but the detector has no {TEXT_INPUT!r} input"
                    )
                arrays = self.bundle.load_vocab()
                if "embeddings" not in arrays:
                    raise BundleError(f"{self.bundle.root}: the vocabulary file has no 'embeddings' array")
                classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else self.classes
                self._set_vocab(classes, arrays["embeddings"], error=BundleError)
            elif has_text_input:
                raise BundleError(
                    f"{self.bundle.root}: the detector takes {TEXT_INPUT!r} "
                    f"but the vocabulary mode is {self.vocab_mode!r}"
                )
            outs = {s.name for s in self.backend.outputs}
            if not set(_OUTPUTS) <= outs:
                raise BundleError(f"{self.bundle.root}: the detector outputs {sorted(outs)}, expected {list(_OUTPUTS)}")
        except BaseException:
            self.close()
            raise

    # -- vocabulary --------------------------------------------------------------------
    def set_vocabulary(self, classes: Sequence[str], embeddings: np.ndarray | None = None) -> None:
        """Swap the class vocabulary (bundles exported with ``--vocab-mode input`` only).

        ``embeddings`` is ``[len(classes), D]`` text embeddings from the same text encoder as the
        bundle's ``vocab.npz`` (L2-normalised, prompt templates averaged). Without it the names
        are embedded here, without torch, by the bundle's ``text_encoder`` part (exported with
        ``--with-text-encoder``) over the bundle's prompt templates, exactly as the export bakes
        them, and cached on disk (see :class:`vlexport.runtime.text_encoder.TextEncoder`).
        """
        if self.vocab_mode != "input":
            raise UsageError(
                f"{self.bundle.root}: this bundle has its vocabulary baked into the graph; "
                "re-export it with --vocab-mode input to change classes at run time"
            )
        if embeddings is None:
            from vlexport.runtime.text_encoder import TextEncoder, check_class_names

            names = check_class_names(classes)
            if self._text_encoder is None:
                self._text_encoder = TextEncoder(self.bundle, threads=self._threads)
            embeddings = self._text_encoder.encode(names)
            classes = names
        self._set_vocab(list(classes), embeddings, error=UsageError)

    @property
    def text_embeddings(self) -> np.ndarray | None:
        """The ``float32 [len(classes), D]`` embeddings fed to the detector (None when they are baked in)."""
        emb = self._extra.get(TEXT_INPUT)
        return None if emb is None else emb.copy()

    @property
    def text_encoder(self) -> Any:
        """The :class:`~vlexport.runtime.text_encoder.TextEncoder` of the last ``set_vocabulary(names)``, or None."""
        return self._text_encoder

    def close(self) -> None:
        if self._text_encoder is not None:
            self._text_encoder.close()
            self._text_encoder = None
        super().close()

    def _set_vocab(self, classes: list[str], embeddings: Any, error: type[Exception]) -> None:
        emb = np.asarray(embeddings)
        if len(classes) == 0:
            raise error("the vocabulary is empty: give at least one class")
        if emb.dtype.kind != "f" or emb.ndim != 2:
            raise error(
                f"text embeddings: got shape {tuple(emb.shape)} dtype {emb.dtype}, expected float [num_classes, D]"
            )
        if emb.shape[0] != len(classes):
            raise error(f"text embeddings: got {emb.shape[0]} rows for {len(classes)} classes")
        spec = next(s for s in self.backend.inputs if s.name == TEXT_INPUT)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        problem = spec.check(emb)
        if problem:
            raise error(f"text embeddings do not fit the detector: {problem}")
        self.classes = [str(c) for c in classes]
        self._extra = {TEXT_INPUT: emb}

    # -- running -----------------------------------------------------------------------
    def detect(self, bgr: np.ndarray, stamp: FrameStamp | None = None, *, prepared: Prepared | None = None) -> Detections:
        """Detect objects in one BGR uint8 frame; boxes are xyxy in the frame's pixels.

        ``prepared`` is this frame already pre-processed by :meth:`prepare` (e.g. on a decode thread).
        """
        return self.detect_batch([bgr], None if stamp is None else [stamp], prepared=prepared)[0]

    def detect_batch(
        self, images: Sequence[np.ndarray], stamps: Sequence[FrameStamp | None] | None = None, *,
        prepared: Prepared | None = None,
    ) -> list[Detections]:
        """Detect in several frames (one graph run per batch the model accepts)."""

        def finish(out: dict[str, np.ndarray], infos: list, batch_stamps: list) -> list[Detections]:
            return [
                self._select(out["boxes"][j], out["scores"][j], out["class_ids"][j], info, stamp)
                for j, (info, stamp) in enumerate(zip(infos, batch_stamps))
            ]

        return self._run_batches(images, stamps, "detect_batch", self._extra, finish, prepared)

    def _select(
        self,
        boxes: np.ndarray,
        scores: np.ndarray,
        class_ids: np.ndarray,
        info: LetterboxInfo,
        stamp: FrameStamp | None,
    ) -> Detections:
        s = self.settings
        b, sc, c = select_detections(
            boxes, scores, class_ids, s["score_threshold"], s["iou_threshold"], s["max_detections"], s["class_agnostic"]
        )
        b = scale_boxes_to_source(b, info)
        n = len(self.classes)
        labels = [self.classes[i] if 0 <= i < n else f"class{i}" for i in c.tolist()]
        return Detections(b, sc, c, labels, stamp)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(self.settings, vocab_mode=self.vocab_mode, classes=len(self.classes))
        return d


def _postprocess_settings(post: Section, overrides: dict[str, Any]) -> dict[str, Any]:
    """The manifest's post-processing settings with ``overrides`` (None keeps the manifest's), checked."""
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown detect option(s) {unknown}; choose from {sorted(_DEFAULTS)}")
    return {
        "score_threshold": post.number("score_threshold", _DEFAULTS["score_threshold"], min=0, max=1,
                                       override=overrides.get("score_threshold")),
        "iou_threshold": post.number("iou_threshold", _DEFAULTS["iou_threshold"], min=0, max=1,
                                     override=overrides.get("iou_threshold")),
        "max_detections": post.number("max_detections", _DEFAULTS["max_detections"], integer=True, min=1,
                                      override=overrides.get("max_detections")),
        "class_agnostic": post.flag("class_agnostic", _DEFAULTS["class_agnostic"],
                                    override=overrides.get("class_agnostic")),
    }
