"""Start and stop a real ``tritonserver`` (from the server environment) on a model repository.

    with TritonServer("repo/") as server:          # ready when the block starts
        server.endpoints                           # {"http": "127.0.0.1:40123", "grpc": "127.0.0.1:40124"}

Loopback by default. The process is stopped by its PID (SIGTERM, then SIGKILL after a grace
period), and the Python backend's shared-memory regions it leaves in ``/dev/shm`` are removed
(only the ones that appeared while this server ran, so another server's are not touched).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vlexport.errors import DependencyError, UsageError
from vlexport.serve.env import ServerEnv, ensure_server_env

__all__ = ["TritonServer", "ServerError", "free_port", "shm_regions"]

_SHM = Path("/dev/shm")
_SHM_PREFIX = "triton_python_backend_shm_region_"


class ServerError(DependencyError):
    """The Triton server did not start, or stopped, or a model did not load."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def shm_regions() -> set[Path]:
    """The Python backend's shared-memory files in /dev/shm now."""
    if not _SHM.is_dir():
        return set()
    return {p for p in _SHM.iterdir() if p.name.startswith(_SHM_PREFIX)}


def _why(path: Path | None) -> str:
    """What the server log says went wrong, in one line: its model-load failures, else its last error."""
    try:
        lines = path.read_text(errors="replace").splitlines() if path is not None else []
    except OSError:
        return "no server log"
    # Triton writes a failure as one line with escaped newlines: keep the first (the message).
    failures = [m.group(1).split("\\n")[0] for m in map(_FAILED.search, lines) if m]
    if failures:
        return "; ".join(dict.fromkeys(failures))
    errors = [ln for ln in lines if ln.startswith("E") and "Cuda" not in ln and "CUDA" not in ln]
    errors += [ln for ln in lines if ln.startswith("error:")]
    return (errors[-1] if errors else (lines[-1] if lines else "the log is empty")).strip()


_FAILED = re.compile(r"(failed to load '[^']*' version \S+: .*?)\"?$")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stop() by PID is the only guard
        pass


class TritonServer:
    """A ``tritonserver`` process serving ``repo`` (see the module doc).

    Args:
        repo: the model repository folder.
        host: the address HTTP and gRPC bind to (``127.0.0.1``: this machine only).
        http_port, grpc_port: 0 picks a free port.
        metrics_port: None turns metrics off; 0 picks a free port.
        log_path: the file for the server's stdout and stderr (default: a new temp file).
        env: the server environment (built or found by :func:`ensure_server_env` when None).
        exit_on_error: stop when a model fails to load (False: serve the others, e.g. an
            ``onnxruntime_onnx`` model on a machine without that backend).
        ready_timeout: seconds to wait for ``/v2/health/ready``.
    """

    def __init__(self, repo: str | os.PathLike, *, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int | None = None, log_path: str | os.PathLike | None = None,
                 env: ServerEnv | None = None, exit_on_error: bool = True, ready_timeout: float = 120.0,
                 extra_args: list[str] | None = None):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise UsageError(f"{repo}: no such model repository folder")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = free_port(host) if metrics_port == 0 else metrics_port
        self.env = env
        self.exit_on_error = exit_on_error
        self.ready_timeout = ready_timeout
        self.extra_args = list(extra_args or [])
        self.log_path = Path(log_path) if log_path is not None else None
        self.process: subprocess.Popen | None = None
        self._shm_before: set[Path] = set()
        self._log_file: Any = None
        self._pid: int | None = None

    # -- addresses ------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def endpoints(self) -> dict[str, str]:
        """``{"http": host:port, "grpc": host:port}`` (and ``"metrics"`` when on)."""
        out = {"http": f"{self.host}:{self.http_port}", "grpc": f"{self.host}:{self.grpc_port}"}
        if self.metrics_port is not None:
            out["metrics"] = f"{self.host}:{self.metrics_port}"
        return out

    @property
    def pid(self) -> int | None:
        """The PID of the server started last (kept after it stopped, to check it is gone)."""
        return self._pid

    # -- lifetime -------------------------------------------------------------------------
    def command(self) -> list[str]:
        env = self.env
        assert env is not None
        cmd = [str(env.tritonserver), "--model-repository", str(self.repo),
               "--backend-directory", str(env.backend_dir), "--cache-directory", str(env.cache_dir),
               "--http-address", self.host, "--http-port", str(self.http_port),
               "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
               f"--exit-on-error={'true' if self.exit_on_error else 'false'}",
               "--strict-readiness=true"]
        if self.metrics_port is None:
            cmd += ["--allow-metrics=false"]
        else:
            cmd += ["--allow-metrics=true", "--allow-gpu-metrics=false", "--metrics-address", self.host,
                    "--metrics-port", str(self.metrics_port)]
        return cmd + self.extra_args

    def start(self) -> TritonServer:
        """Start the server and wait until it is ready (a ServerError with the log's tail otherwise)."""
        if self.process is not None:
            raise UsageError("this server is already started")
        if self.env is None:
            self.env = ensure_server_env()
        if self.log_path is None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._shm_before = shm_regions()
        self._log_file = open(self.log_path, "w", encoding="utf-8")
        # A session of its own: Ctrl-C in a terminal reaches us, and we stop the server ourselves.
        self.process = subprocess.Popen(self.command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.env.environ(), start_new_session=True,
                                        preexec_fn=_die_with_parent)
        self._pid = self.process.pid
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            rc = self.process.poll()
            if rc is not None:
                raise ServerError(f"tritonserver exited with status {rc} before it was ready: "
                                  f"{_why(self.log_path)} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {self.ready_timeout:.0f} s: "
                          f"{_why(self.log_path)} (log: {self.log_path})")

    def models(self) -> list[dict[str, Any]]:
        """The repository index: ``[{"name", "version", "state", "reason"}]`` of every model."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return list(json.loads(r.read().decode()))

    def stop(self, grace_s: float = 15.0) -> int | None:
        """Stop the server by its PID (SIGTERM, SIGKILL after ``grace_s``), wait for it, and remove
        the shared-memory files it left. Returns its exit status (None when it was not running)."""
        proc, self.process = self.process, None
        rc = None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    # The stubs are the server's children, in its session: kill them with it.
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)
            rc = proc.returncode
            self._reap_group(proc.pid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        for p in shm_regions() - self._shm_before:
            try:
                p.unlink()
            except OSError:
                pass
        return rc

    @staticmethod
    def _reap_group(pgid: int) -> None:
        """Kill what is left of the server's process group (its Python-backend stubs), if anything."""
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 5.0
        try:
            os.killpg(pgid, signal.SIGTERM)
            while time.monotonic() < deadline:
                time.sleep(0.1)
                os.killpg(pgid, 0)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten server does not outlive its owner
        if getattr(self, "process", None) is not None:
            try:
                self.stop(grace_s=5.0)
            except Exception:
                pass
