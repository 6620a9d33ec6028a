"""How the CLI prints an export report and a metrics table."""

from __future__ import annotations

from typing import Any

import click


def print_export_report(report: Any) -> None:
    """The bundle path, parity figures, FP16 island search, refused precisions, metrics and gate rounds."""
    click.secho(f"bundle written: {report.path}  ({report.seconds:.1f} s)", fg="green")
    for key, outs in report.parity.items():
        figures = ", ".join(
            f"{name} " + " ".join(f"{k}={v:.3g}" for k, v in m.items() if k in ("max_abs", "cosine", "agreement"))
            for name, m in outs.items()
        )
        click.echo(f"  parity {key:<22} {figures}")
    for name, info in report.fp16.items():
        if len(info.get("rounds", [])) > 1:
            last = info["rounds"][-1]
            click.echo(f"  fp16 {name}: {len(info['rounds']) - 1} round(s) of FP32 island search, "
                       f"{last['fp32_nodes']} of {info['nodes']} node(s) in FP32, "
                       f"{'passed' if last['passed'] else 'failed'}")
    for key, reason in report.refused.items():
        click.secho(f"  refused {key:<21} {reason}", fg="yellow")
    if report.metrics:
        click.echo(metrics_table(report.metrics))
    for r in report.gate:
        label = _METRIC_LABELS.get(r.get("metric", "map50_95"), r.get("metric", ""))
        value = r.get("int8_metric", r.get("int8_map50_95"))
        latency = f", {r['latency_ratio']:.2f}x FP32 latency" if r.get("latency_ratio") else ""
        if r.get("paired_latency_ratio"):
            latency += f" ({r['paired_latency_ratio']:.3f}x side by side)"
        click.echo(f"  search round {r['round']}: {r.get('excluded_groups', '-')} layer(s), {r['excluded_nodes']} "
                   f"node(s) float, INT8 {label} {100 * value:.2f} (drop {r['drop_points']:.2f} points){latency}"
                   + ("  <- chosen" if r.get("chosen") else ""))


_METRIC_LABELS = {"map50_95": "mAP50-95", "miou": "mIoU", "iou": "IoU"}


def metrics_table(metrics: dict) -> str:
    """Detection (mAP50-95, mAP50) or segmentation (mIoU, pixel accuracy) per precision, vs FP32."""
    first = next(iter(metrics.values()), {})
    main, second, names = (("miou", "pixel_accuracy", ("mIoU", "pix acc")) if "miou" in first
                           else ("iou", "", ("IoU", "")) if "iou" in first
                           else ("map50_95", "map50", ("mAP50-95", "mAP50")))
    lines = [f"  {'precision':<10} {names[0]:>9} {names[1]:>8} {'images':>7}"]
    base = metrics.get("fp32", {}).get(main)
    for prec, m in metrics.items():
        drop = "" if base is None or prec == "fp32" or m.get(main) is None else f"  ({100 * (m[main] - base):+.2f})"
        a = "   n/a" if m.get(main) is None else f"{100 * m[main]:>9.2f}"
        b = "   n/a" if m.get(second) is None else f"{100 * m[second]:>8.2f}"
        lines.append(f"  {prec:<10} {a} {b} {m.get('images', 0):>7}{drop}")
    return "\n".join(lines)
