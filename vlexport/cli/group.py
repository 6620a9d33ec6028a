"""The `vlexport` click group: user errors as one line, Ctrl-C as exit 130, logging to stderr."""

from __future__ import annotations

import logging
import sys

import click

from vlexport import __version__
from vlexport.errors import VlexportError

log = logging.getLogger("vlexport")


class _Group(click.Group):
    """Turns user errors into one line and exit 1, Ctrl-C into exit 130; bugs keep their traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VlexportError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("vlexport")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vlexport")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Export vision-language models to ONNX bundles and run them on images and video.

    \b
    Examples:
      vlexport kdeov --fp16                       # export KDEOV (YOLOv8n + CLIP ViT-B-32 text)
      vlexport inspect bundles/kdeov-yolov8n-vitb32
      vlexport run bundles/kdeov-yolov8n-vitb32 --source video.mp4 --save out.mp4 --jsonl out.jsonl
    """
    _setup_logging(verbose, quiet)
