"""A minimal Triton Python-backend model that runs one vlexport bundle (tests only).

Stands in for the repository writer's model (vlexport.serve.python_model) while it is not
there: the same tensor names (vlexport.serve.contract). Runs in the server's own environment
(numpy<2), imported by the Python-backend stub; ``triton_python_backend_utils`` exists only there.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils  # noqa: F401  (provided by the server)


def _strings(values):
    return np.array([str(v).encode("utf-8") for v in values], dtype=np.object_)


def _pad(rows, dtype, fill):
    shape = tuple(max(r.shape[i] for r in rows) for i in range(rows[0].ndim))
    out = np.full((len(rows),) + shape, fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[(i,) + tuple(slice(0, n) for n in r.shape)] = r
    return out


class TritonPythonModel:
    def initialize(self, args):
        import cv2

        from vlexport.runtime import load

        self.cv2 = cv2
        config = json.loads(args["model_config"])
        self.task_name = config["parameters"]["vlexport_task"]["string_value"]
        root = os.path.join(args["model_repository"], args["model_version"], "bundle")
        self.task = load(root, threads=int(os.environ.get("VLEXPORT_SERVE_THREADS", "0")) or None)

    def _images(self, request):
        enc = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        raw = pb_utils.get_input_tensor_by_name(request, "IMAGE_BGR")
        if enc is None and raw is None:
            raise ValueError("the request has no IMAGE (encoded bytes) nor IMAGE_BGR (uint8 HxWx3) input")
        if enc is not None and raw is not None:
            raise ValueError("give IMAGE or IMAGE_BGR, not both")
        if raw is not None:
            from vlexport.runtime.preprocess import check_image

            out = [np.ascontiguousarray(a) for a in raw.as_numpy()]
            for i, img in enumerate(out):
                check_image(img, what=f"IMAGE_BGR {i}")
            return out
        out = []
        for i, blob in enumerate(enc.as_numpy().reshape(-1)):
            data = np.frombuffer(bytes(blob), np.uint8)
            if not data.size:
                raise ValueError(f"IMAGE {i}: the image bytes are empty")
            img = self.cv2.imdecode(data, self.cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"IMAGE {i}: {data.size} bytes that OpenCV cannot decode as an image "
                                 "(corrupt or not a JPEG/PNG)")
            out.append(img)
        return out

    def _outputs(self, results):
        if self.task_name == "detect":
            arrays = {
                "BOXES": _pad([r.boxes.reshape(-1, 4) for r in results], np.float32, 0),
                "SCORES": _pad([r.scores for r in results], np.float32, 0),
                "LABELS": _pad([r.class_ids.astype(np.int32) for r in results], np.int32, -1),
                "CLASS_NAMES": _pad([_strings(r.labels) for r in results], np.object_, b""),
            }
        elif self.task_name == "segment":
            arrays = {"LABEL_MAP": _pad([r.label_map.astype(np.int32) for r in results], np.int32, -1)}
        else:
            arrays = {"CAPTION": _strings([r.text for r in results]).reshape(-1, 1)}
        return [pb_utils.Tensor(k, v) for k, v in arrays.items()]

    def execute(self, requests):
        # Decode every request first; the good ones' images run as one batch (one graph run when
        # the model takes batches), then each request gets its own rows back.
        errors, images, spans = {}, [], {}
        for i, request in enumerate(requests):
            try:
                imgs = self._images(request)
                spans[i] = (len(images), len(images) + len(imgs))
                images += imgs
            except Exception as e:  # one bad request gets an error; the model keeps serving
                errors[i] = f"{type(e).__name__}: {e}"
        results = []
        if images:
            batch = getattr(self.task, self.task_name + "_batch", None)
            run = getattr(self.task, self.task_name)
            results = batch(images) if batch is not None else [run(img) for img in images]
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[i])))
            else:
                a, b = spans[i]
                responses.append(pb_utils.InferenceResponse(output_tensors=self._outputs(results[a:b])))
        return responses

    def finalize(self):
        self.task.close()
