"""The Triton server's own Python environment, apart from the project's.

PyTriton's wheel (``nvidia-pytriton``) carries a real ``tritonserver`` binary and its Python
backend, but pins ``numpy<2`` while the project runs on numpy 2. So the server gets a virtual
environment of its own, made once and cached::

    env = ensure_server_env()          # ~/.cache/vlexport/triton-env-<hash>  (or $VLEXPORT_CACHE/...)
    env.tritonserver, env.backend_dir, env.library_path, env.bin_dir

It is built with the system ``/usr/bin/python3.11``: the Python-backend stub from the wheel
links the system ``libpython3.11.so``, and a venv of another build of Python (pyenv) fails in the
stub (``'_thread.RLock' object has no attribute '_recursion_count'``). Into it go
``nvidia-pytriton``, ``numpy<2``, the runtime's own dependencies, and then vlexport itself with
``--no-deps`` (from the source tree this module is imported from) so that the served model's
``import vlexport.runtime`` works in the server. Pip's output goes to a log file whose path
every error names. The environment is complete only once its ``.ready`` marker is written: a
half-built one (interrupted, failed) is rebuilt from scratch next time.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlexport.errors import DependencyError

__all__ = ["ServerEnv", "ensure_server_env", "env_dir", "SERVER_REQUIREMENTS", "BASE_PYTHON"]

#: The Python the server's venv is built from (the stub links this build's libpython).
BASE_PYTHON = os.environ.get("VLEXPORT_TRITON_PYTHON", "/usr/bin/python3.11")
_PY_TAG = "3.11"

#: What the server's environment holds besides vlexport. onnxruntime: the CPU build; its wheels
#: since 1.19 are built against numpy 2's ABI, which also runs on numpy 1.x (>= 1.21.6).
SERVER_REQUIREMENTS = (
    "nvidia-pytriton==0.7.0",
    "numpy>=1.24,<2",
    "onnxruntime>=1.19",
    "opencv-python-headless>=4.8",
    "pillow>=10",
    "tokenizers>=0.15",
    "ftfy>=6.1",
    "tqdm>=4.60",
    "click>=8.1",
    "pyyaml>=6",
)

_READY = ".ready"


@dataclass(frozen=True)
class ServerEnv:
    """A built server environment: where its Python, its ``tritonserver`` and its backends are."""

    root: Path

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin_dir / "python"

    @property
    def site_packages(self) -> Path:
        return self.root / "lib" / f"python{_PY_TAG}" / "site-packages"

    @property
    def triton_dir(self) -> Path:
        """The wheel's ``pytriton/tritonserver`` folder."""
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.triton_dir / "bin" / "tritonserver"

    @property
    def backend_dir(self) -> Path:
        """``--backend-directory``: ``python/`` with the backend library, its utils and the 3.11 stub."""
        return self.root / "backends"

    @property
    def cache_dir(self) -> Path:
        return self.triton_dir / "caches"

    @property
    def library_path(self) -> list[Path]:
        """``LD_LIBRARY_PATH`` entries: the wheel's shared libraries, then the server's own."""
        return [self.site_packages / "nvidia_pytriton.libs", self.triton_dir / "external_libs",
                self.triton_dir / "lib"]

    @property
    def log_path(self) -> Path:
        return self.root / "install.log"

    def is_ready(self) -> bool:
        return (self.root / _READY).is_file() and self.tritonserver.is_file() and self.python.is_file()

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for ``tritonserver``: its libraries, and this venv's ``python`` first on PATH
        (the model's imports come from the first ``python`` there)."""
        env = dict(os.environ if base is None else base)
        libs = [str(p) for p in self.library_path if p.is_dir()]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "/usr/bin:/bin")])
        env["VIRTUAL_ENV"] = str(self.root)
        # The server's Python must import the venv's vlexport and numpy 1.x, not the caller's.
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        return env


def _source_root() -> Path:
    """The folder holding the ``vlexport`` package this process imported (a checkout or site-packages)."""
    return Path(__file__).resolve().parents[2]


def _project_root() -> Path | None:
    """The source checkout (with pyproject.toml) vlexport comes from, or None for an installed package."""
    root = _source_root()
    return root if (root / "pyproject.toml").is_file() else None


def _fingerprint(requirements: Sequence[str], find_links: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(BASE_PYTHON.encode())
    for r in requirements:
        h.update(b"\0" + r.encode())
    for f in find_links:
        h.update(b"\1" + f.encode())
    return h.hexdigest()[:12]


def env_dir(requirements: Sequence[str] = SERVER_REQUIREMENTS, find_links: Sequence[str] = ()) -> Path:
    """Where the environment for these requirements is cached: ``$VLEXPORT_TRITON_ENV`` when set,
    else ``triton-env-<hash>`` under ``$VLEXPORT_CACHE`` (or ``~/.cache/vlexport``)."""
    explicit = os.environ.get("VLEXPORT_TRITON_ENV")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("VLEXPORT_CACHE") or Path.home() / ".cache" / "vlexport")
    return cache / f"triton-env-{_fingerprint(requirements, find_links)}"


def _run_logged(cmd: list[str], log_path: Path, what: str) -> None:
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise DependencyError(f"the Triton server environment could not be built: {what} failed (exit {rc}); "
                              f"see {log_path}")


def _find_links_args(find_links: Sequence[str]) -> list[str]:
    out: list[str] = []
    for f in find_links:
        out += ["--find-links", str(f)]
    return out


def _copy_vlexport(env: ServerEnv) -> None:
    """Put this process's vlexport into the venv: ``pip install --no-deps`` of the checkout, or a copy
    of the installed package folder when there is no checkout."""
    project = _project_root()
    if project is not None:
        # A plain (non-editable) install: the server sees the tree as it was when the env was built;
        # refresh_vlexport() re-copies it when the sources changed.
        _run_logged([str(env.python), "-m", "pip", "install", "--no-deps",
                     "--disable-pip-version-check", "--quiet", str(project)], env.log_path, "installing vlexport")
        return
    dst = env.site_packages / "vlexport"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(_source_root() / "vlexport", dst, ignore=shutil.ignore_patterns("__pycache__"))


def _sources_digest() -> str:
    """A digest of the vlexport sources (names, sizes, mtimes): rebuilds the venv's copy when they change."""
    h = hashlib.sha256()
    pkg = _source_root() / "vlexport"
    for p in sorted(pkg.rglob("*.py")):
        st = p.stat()
        h.update(f"{p.relative_to(pkg)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def refresh_vlexport(env: ServerEnv) -> None:
    """Re-copy vlexport into the venv when this process's sources differ from the copy there.

    Copies the package folder straight into site-packages (seconds), so that an edited checkout
    is what the server runs.
    """
    marker = env.root / ".vlexport-sources"
    digest = _sources_digest()
    if marker.is_file() and marker.read_text().strip() == digest:
        return
    dst = env.site_packages / "vlexport"
    tmp = env.site_packages / ".vlexport.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(_source_root() / "vlexport", tmp, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    marker.write_text(digest + "\n")


def _prepare_backends(env: ServerEnv) -> None:
    """``backends/python/``: the Python backend library and utils, and the stub for this Python."""
    src = env.triton_dir
    stub = src / "python_backend_stubs" / _PY_TAG / "triton_python_backend_stub"
    files = [src / "backends" / "python" / "libtriton_python.so",
             src / "backends" / "python" / "triton_python_backend_utils.py", stub]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DependencyError(f"the nvidia-pytriton wheel lacks {missing[0]}; see {env.log_path}")
    dst = env.backend_dir / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    (dst / stub.name).chmod(0o755)


def ensure_server_env(*, find_links: Sequence[str] = (), progress: Callable[[str], None] | None = None,
                      rebuild: bool = False) -> ServerEnv:
    """The server environment, built the first time (minutes) and cached (see the module doc).

    ``find_links``: extra folders of wheels for pip (``$VLEXPORT_TRITON_FIND_LINKS``, colon-separated,
    is added); the packages still come from the registry when not found there. ``progress`` gets
    one line per step. A DependencyError naming the install log says what failed.
    """
    links = list(find_links) + [p for p in os.environ.get("VLEXPORT_TRITON_FIND_LINKS", "").split(os.pathsep) if p]
    # find-links change where wheels come from, not what is installed: one cache key for both.
    env = ServerEnv(env_dir(SERVER_REQUIREMENTS))
    say = progress or (lambda _msg: None)
    env.root.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel test workers, two `vlexport serve`): the others wait, then reuse it.
    with open(env.root.parent / f".{env.root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if env.is_ready() and not rebuild:
            refresh_vlexport(env)
            return env
        return _build(env, links, say)


def _build(env: ServerEnv, links: Sequence[str], say: Callable[[str], None]) -> ServerEnv:
    if not sys.platform.startswith("linux"):
        raise DependencyError("the Triton server from nvidia-pytriton runs on Linux x86-64 only")
    if not Path(BASE_PYTHON).is_file():
        raise DependencyError(f"the Triton server environment needs {BASE_PYTHON} (the Python its backend stub "
                              "links); install python3.11 or set VLEXPORT_TRITON_PYTHON")
    t0 = time.monotonic()
    shutil.rmtree(env.root, ignore_errors=True)
    env.root.mkdir()
    say(f"building the Triton server environment in {env.root} (once; log: {env.log_path})")
    _run_logged([BASE_PYTHON, "-m", "venv", str(env.root)], env.log_path, "creating the virtual environment")
    pip = [str(env.python), "-m", "pip", "--disable-pip-version-check"]
    say("installing nvidia-pytriton, numpy<2 and the runtime's dependencies")
    _run_logged(pip + ["install", "--quiet", *_find_links_args(links), *SERVER_REQUIREMENTS], env.log_path,
                "pip install " + " ".join(SERVER_REQUIREMENTS))
    say("installing vlexport into it")
    _copy_vlexport(env)
    refresh_vlexport(env)
    if not env.tritonserver.is_file():
        raise DependencyError(f"no tritonserver binary at {env.tritonserver} after installing nvidia-pytriton; "
                              f"see {env.log_path}")
    _prepare_backends(env)
    _run_logged([str(env.python), "-c", "import numpy, onnxruntime, cv2, vlexport.runtime; "
                 "assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__"],
                env.log_path, "checking the environment's imports")
    (env.root / _READY).write_text(f"built in {time.monotonic() - t0:.0f} s\n")
    say(f"Triton server environment ready ({time.monotonic() - t0:.0f} s)")
    return env
