"""Human-readable description of a bundle (for `vlexport inspect`)."""

from __future__ import annotations

from typing import Any

from vlexport.runtime.bundle import Bundle
from vlexport.runtime.manifest import ValidationRecord
from vlexport.runtime.spec import TensorSpec


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _tensor(spec: TensorSpec) -> str:
    return f"{spec.name} {spec.dtype}[" + ", ".join(str(d) for d in spec.shape) + "]"


def _weights_state(record: dict) -> str:
    """Where weights came from; bundles before weights_source only said trained / student_trained."""
    source = record.get("weights_source")
    if source is None:  # an older bundle
        trained = record.get("trained", record.get("student_trained"))
        return "pretrained" if trained else "UNTRAINED (random weights)"
    if str(source).startswith("random"):
        return f"UNTRAINED ({source})"
    sha = record.get("checkpoint_sha256")
    return str(source) + (f" sha256 {sha[:12]}…" if sha else "")


def describe_bundle(bundle: Bundle, *, verified: bool = False) -> str:
    """A few screens of text: identity, provenance, pre/post-processing, parts, parity, backend."""
    m = bundle.meta
    other = m.extra  # the sections the runtime does not type: provenance, fp16, warnings, ...
    lines = [f"bundle     {bundle.root}",
             f"family     {m.family}   task {m.task}   preset {m.preset if m.preset is not None else '?'}",
             f"created    {other.get('created', '?')} by vlexport {other.get('vlexport', '?')}   schema {m.schema}"]
    prov = other.get("provenance", {})
    if prov:
        lines.append(f"exported   torch {prov.get('torch')}  onnx {prov.get('onnx')}  opset {prov.get('opset')}")
        te = prov.get("text_encoder")
        if te:
            act = f", {te['activation']} ({te.get('activation_source', '?')})" if te.get("activation") else ""
            lines.append(f"text tower {te.get('model')} / {te.get('pretrained')}: {_weights_state(te)}{act}, "
                         f"sha256 {str(te.get('weights_sha256'))[:12]}…")
        if "weights_source" in prov or "student_trained" in prov:
            lines.append(f"weights    {_weights_state(prov)}")
    pre = m.preprocess
    lines.append(f"preprocess {_resize_rule(pre)}, {pre.get('color')}, "
                 f"scale {pre.get('scale'):.6g}, mean {pre.get('mean')}, std {pre.get('std')}")
    post = m.postprocess or {}
    if post:
        lines.append("postprocess " + ", ".join(f"{k} {v}" for k, v in post.items()))
    vocab = m.vocabulary or {}
    if vocab:
        classes = vocab.get("classes", [])
        head = ", ".join(classes[:8]) + (f", … ({len(classes)} in all)" if len(classes) > 8 else "")
        lines.append(f"vocabulary {len(classes)} classes, templates {vocab.get('templates')}, mode {vocab.get('mode')}: {head}")
    lines.append("parts")
    for name, part in m.parts.items():
        ins = ", ".join(_tensor(s) for s in part.io.inputs)
        outs = ", ".join(_tensor(s) for s in part.io.outputs)
        lines.append(f"  {name}: {ins} → {outs}")
        calibration = m.calibration
        pixels = ((calibration.extra.get("pixel_inputs") or {}).get(name, {}) if calibration is not None else {})
        for prec, rel in part.files.items():
            path = bundle.path_of(rel)
            size = _fmt_size(path.stat().st_size) if path.is_file() else "MISSING"
            takes = (f", takes {', '.join(pixels)} as uint8 pixels (scale {next(iter(pixels.values()))['scale']:.6g})"
                     if prec == "int8" and pixels else "")
            lines.append(f"    {prec:<5} {rel} ({size}{takes})")
        for key, eng in part.engines.items():
            lines.append(f"    engine {key}: {eng.to_dict()}")
    validation = m.validation or ValidationRecord()
    parity = validation.parity
    if parity:
        lines.append("parity vs PyTorch")
        for key, outs in parity.items():
            figs = "; ".join(f"{o}: " + " ".join(f"{k} {v:.3g}" for k, v in vals.items() if k in ("max_abs", "cosine", "agreement"))
                             for o, vals in outs.items())
            lines.append(f"  {key:<24} {figs}")
    for key, why in validation.refused.items():
        lines.append(f"refused    {key}: {why}")
    for name, info in (other.get("fp16") or {}).items():
        if isinstance(info, dict) and "nodes" in info and "refused" not in info:
            rounds = max(0, len(info.get("rounds") or []) - 1)
            lines.append(f"fp16       {name}: {info.get('fp32_nodes')} of {info['nodes']} node(s) kept in FP32"
                         + (f" ({rounds} round(s) of island search)" if rounds else ""))
    for w in other.get("warnings") or []:
        lines.append(f"warning    {w}")
    lines.append(f"files      {len(m.files)} listed" + (", all sha256 verified" if verified else " (not verified)"))
    from vlexport.runtime.backends import describe_backends, preferred_backend

    backends = describe_backends()
    usable = [b["name"] for b in backends if b.get("available")]
    lines.append(f"backend    would use {preferred_backend()} (available: {', '.join(usable) or 'none'})")
    for b in backends:
        if not b.get("available") and b.get("reason"):
            lines.append(f"           {b['name']}: unavailable ({b['reason']})")
    return "\n".join(lines)


def _resize_rule(pre: dict[str, Any]) -> str:
    """How a family resizes its frames, in words (each family records different keys)."""
    kind = pre.get("resize")
    if kind == "detr":
        return f"detr: short side {pre.get('short_side')}, long side at most {pre.get('max_size')}, no padding"
    if kind == "short_side":
        cap = pre.get("max_long_side")
        return f"short side {pre.get('short_side')}" + (f", long side at most {cap}" if cap is not None else "")
    if kind == "clip":
        return f"clip: short side {pre.get('size')} ({pre.get('interpolation')}), centre crop {pre.get('size')}"
    return f"{kind} to {pre.get('size')} pad {pre.get('pad_value')}"
