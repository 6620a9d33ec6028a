"""The runtime must import and run on a device without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import write_bundle


def test_runtime_never_imports_torch(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", size=(64, 64), encoder=True)
    import cv2
    import numpy as np

    (tmp_path / "img").mkdir()
    for i in range(2):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), np.full((48, 80, 3), 40 * i, np.uint8))
    try:  # CLIP's BPE merges ship with open_clip; the runtime's tokenizer reads files written from them
        import open_clip

        bpe = open_clip.tokenizer.default_bpe()
    except ImportError:
        bpe = None
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import vlexport.runtime as vr
        assert "torch" not in sys.modules, "import vlexport.runtime pulled in torch"
        assert "cv2" not in sys.modules and "onnxruntime" not in sys.modules, "heavy imports should be lazy"
        from vlexport.runtime import draw, sinks, preprocess, postprocess, results
        from vlexport.runtime.backends import create_backend, describe_backends
        from vlexport.runtime.tasks.detect import DetectTask
        from vlexport.runtime.tasks.embed import EmbedTask
        describe_backends()
        frame = np.zeros((48, 80, 3), np.uint8)
        det = vr.load({str(root)!r})
        draw.draw_detections(frame, det.detect(frame))
        vr.load({str(root)!r}, task="embed").embed(frame)
        from vlexport.runtime import decoding, pipeline, schedule, sources, tokenizer  # noqa: F401
        from vlexport.runtime import clip_tokenizer, text_cache, text_encoder  # noqa: F401
        if {bpe!r} is not None:
            files = clip_tokenizer.write_tokenizer_files({str(tmp_path / "clip_tok")!r}, {bpe!r})
            ids = clip_tokenizer.CLIPTokenizer.from_files(*files)(["a photo of a café crème."])
            assert ids.shape == (1, 77) and ids[0, 0] == 49406
        from vlexport.runtime.tasks import binary_segment, caption, detr  # noqa: F401
        stats = pipeline.Pipeline({str(tmp_path / "img")!r}, detect=det).run()
        assert stats.processed == 2
        bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        assert not bad, bad
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
