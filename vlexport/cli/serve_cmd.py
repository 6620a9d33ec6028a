"""The `serve` command: a Triton Inference Server on a model repository (`vlexport triton` writes one)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import click

from vlexport.cli.group import cli


@cli.command("serve")
@click.argument("repo", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0 to expose it).")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="HTTP/REST port (0: any free one).")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port (0: any free one).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="Serve Prometheus metrics on this port (default: off).")
@click.option("--log", "log_path", type=click.Path(path_type=Path), help="The server's log file (default: a temp file).")
@click.option("--ready-timeout", default=300.0, show_default=True, type=click.FloatRange(1),
              help="Seconds to wait for every model to load.")
@click.option("--exit-on-error/--no-exit-on-error", default=True, show_default=True,
              help="Refuse to start when a model fails to load (--no-exit-on-error serves the others).")
def serve_cmd(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int | None,
              log_path: Path | None, ready_timeout: float, exit_on_error: bool) -> None:
    """Serve a model repository with NVIDIA Triton Inference Server until Ctrl-C.

    The server runs in an environment of its own (built the first time, a minute or two, and
    cached). Ctrl-C (or SIGTERM) stops it and removes its shared-memory files.

    \b
    Examples:
      vlexport triton bundles/yolo-yolov8n --out repo/
      vlexport serve repo/
      vlexport run --server 127.0.0.1:8000 --model yolo-yolov8n --source traffic.mp4 --jsonl out.jsonl
    """
    from vlexport.serve.env import ensure_server_env
    from vlexport.serve.server import ServerError, TritonServer

    env = ensure_server_env(progress=lambda msg: click.echo(msg, err=True))
    server = TritonServer(repo, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          log_path=log_path, env=env, exit_on_error=exit_on_error, ready_timeout=ready_timeout)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        click.echo(f"starting Triton on {repo}", err=True)
        server.start()
        for name, address in server.endpoints.items():
            click.echo(f"{name:<8} {address}")
        for m in server.models():
            state = m.get("state", "?") + (f" ({m['reason']})" if m.get("reason") else "")
            click.echo(f"model    {m['name']} v{m.get('version', '?')}: {state}")
        click.echo(f"ready (log: {server.log_path}); Ctrl-C stops", err=True)
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        rc = server.process.returncode if server.process is not None else None
        raise ServerError(f"tritonserver stopped by itself (status {rc}); see {server.log_path}")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def _sigterm(signum: int, frame: Any) -> None:
    # A container's stop: the same clean stop as Ctrl-C.
    raise KeyboardInterrupt
