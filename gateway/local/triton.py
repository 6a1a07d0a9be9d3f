"""Launch real Triton servers from the nvidia-pytriton wheel's bundled binary, on loopback ports.

The wheel ships a complete tritonserver with its Python backend; this module runs it directly with
a model repository of our own, without PyTriton's Python API. What it takes — a backend folder
holding the Python backend and the stub for the running Python (`_prepare_backend_dir`), this
Python's libpython first on the library path (`_environment`) — is in the code below. Each
`LocalTriton` is one server process:

    with LocalTriton(default_model_repository(), name="cpu-0") as triton:
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_address)

Servers die with the process that launched them (PR_SET_PDEATHSIG), and every server still
running at interpreter exit is killed, so tests cannot leak them.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import http.client
import importlib.util
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MODEL_CONTROL_MODES",
    "LocalTriton",
    "TritonLaunchError",
    "default_model_repository",
    "find_free_port",
    "find_free_ports",
    "triton_binary",
]

_LOOPBACK = "127.0.0.1"
#: Triton's --model-control-mode: none (load all at start), poll (follow the repository), explicit
#: (load and unload only when asked: --load-model at start, then the repository API).
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
#: Starts of a server that a signal killed before it was ready, in all (see LocalTriton.start).
START_ATTEMPTS = 3
_POLL_INTERVAL_S = 0.05
_LOG_TAIL_LINES = 40
# Grace given to the Python-backend stubs to notice their server died (they poll the parent's
# pid about once a second and remove their shared-memory region on the way out).
_STUB_EXIT_GRACE_S = 3.0


_log = logging.getLogger(__name__)


class TritonLaunchError(RuntimeError):
    """tritonserver could not be found, started, or made ready; the message carries the log tail."""


class _AbortedAtStart(TritonLaunchError):
    """tritonserver was killed by a signal before it was ready (not a refusal of its own: those exit)."""


# --------------------------------------------------------------------------- locating the wheel


def _pytriton_dir() -> Path:
    # find_spec locates the package without importing it (pytriton's import pulls in a lot).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonLaunchError(
            "nvidia-pytriton is not installed, and it carries the tritonserver binary that "
            "LocalTriton runs: install tensorgate's `local` extra (pip install 'tensorgate[local]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def triton_binary() -> Path:
    """The tritonserver executable inside the installed nvidia-pytriton wheel."""
    binary = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not os.access(binary, os.X_OK):
        raise TritonLaunchError(
            f"nvidia-pytriton is installed but {binary} is missing or not executable"
        )
    return binary


def _server_libs_dir() -> Path:
    # auditwheel puts the server's shared libraries beside the package, not inside it.
    return _pytriton_dir().parent / "nvidia_pytriton.libs"


def _python_backend_files() -> list[Path]:
    """libtriton_python.so, its utils module, and the stub built for the running Python."""
    root = _pytriton_dir() / "tritonserver"
    backend = root / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        available = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise TritonLaunchError(
            f"nvidia-pytriton has no Python-backend stub for Python {version} "
            f"(it has {', '.join(available)})"
        )
    files = [backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", stub]
    for path in files:
        if not path.exists():
            raise TritonLaunchError(f"nvidia-pytriton is incomplete: {path} is missing")
    return files


def default_model_repository() -> Path:
    """The example models: $TENSORGATE_MODEL_REPOSITORY, else the checkout's examples/models.

    Raises FileNotFoundError when neither exists (e.g. tensorgate installed from a wheel).
    """
    override = os.environ.get("TENSORGATE_MODEL_REPOSITORY")
    path = (
        Path(override) if override else Path(__file__).resolve().parents[2] / "examples" / "models"
    )
    if not path.is_dir():
        raise FileNotFoundError(
            f"model repository {path} does not exist; set TENSORGATE_MODEL_REPOSITORY to one"
        )
    return path


# --------------------------------------------------------------------------------------- ports

# Ports handed out by this process and not yet known to be bound by their server: the kernel
# may offer a just-released port again, and two LocalTritons built back to back must not share.
_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def find_free_ports(count: int) -> list[int]:
    """`count` consecutive loopback TCP ports, free now and not already handed out by this process."""
    for _ in range(200):
        first = find_free_port()
        ports = [first + offset for offset in range(count)]
        if ports[-1] > 65535:
            continue
        with _ports_lock:
            if any(port in _handed_out for port in ports[1:]):
                continue
            probes: list[socket.socket] = []
            try:
                for port in ports[1:]:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    probes.append(sock)
                    sock.bind((_LOOPBACK, port))
            except OSError:
                continue
            finally:
                for sock in probes:
                    sock.close()
            _handed_out.update(ports)
            return ports
    raise OSError(f"found no {count} consecutive free loopback ports")


def find_free_port() -> int:
    """A loopback TCP port that is free now and not already handed out by this process."""
    with _ports_lock:
        held: list[socket.socket] = []
        try:
            # Keep each probe socket open until done so the kernel cannot return it twice.
            while True:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((_LOOPBACK, 0))
                port = sock.getsockname()[1]
                if port not in _handed_out:
                    _handed_out.add(port)
                    return port
        finally:
            for sock in held:
                sock.close()


# ------------------------------------------------------------------ dying with the parent process

# The kernel's PR_SET_PDEATHSIG is set by util-linux `setpriv --pdeathsig KILL`, which then execs
# tritonserver (the setting survives exec). It is not set from a preexec_fn: running Python in a
# forked child of a process whose gRPC threads are busy crashes the child (seen here: SIGSEGV in
# threading._after_fork), while Popen without preexec_fn forks and execs without running Python.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _die_with_parent(args: list[str]) -> list[str]:
    """`args` wrapped so the server is SIGKILLed when the thread that spawned it ends."""
    if _SETPRIV is None:
        return args  # the atexit handler below still stops servers on a normal exit
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *args]


class _Spawner:
    """Runs Popen on one daemon thread that lives exactly as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not its process: a
    server started from a short-lived thread (asyncio.to_thread, an executor worker) would be
    killed when that thread finished. A daemon thread ends only with the process.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            # is_alive() is also False in a forked child, where the thread does not exist.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="tensorgate-triton-spawner", daemon=True
                )
                self._thread.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, args, kwargs))
        return future.result()

    def _run(self) -> None:
        while True:
            future, args, kwargs = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(subprocess.Popen(args, **kwargs))
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)


_spawner = _Spawner()
_live: weakref.WeakSet[LocalTriton] = weakref.WeakSet()
# A forked child must not kill its parent's servers when it exits.
os.register_at_fork(after_in_child=_live.clear)


@atexit.register
def _kill_leftovers() -> None:
    # A server whose owner forgot stop(): kill it now rather than leave it to PDEATHSIG, so its
    # temporary files are removed too.
    for server in list(_live):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            server.kill()


def _group_emptied(pgid: int, seconds: float) -> bool:
    """Wait up to `seconds` until process group `pgid` has no live member; whether it has none."""
    deadline = time.monotonic() + seconds
    while _group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)
    return True


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`, read from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after "(comm)": state ppid pgrp ...; comm may itself contain spaces or ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


# ------------------------------------------------------------------------------------ LocalTriton


class LocalTriton:
    """One tritonserver process from the nvidia-pytriton wheel, on free loopback ports.

    Ports are chosen when the object is built (so addresses can be handed out before start) and
    kept for its whole life: restart() comes back on the same ports, as a restarted node would.
    The log, `log_dir/<name>.log`, is appended to by every start and kept after stop.
    """

    def __init__(
        self,
        model_repository: os.PathLike | str,
        *,
        name: str = "triton",
        log_dir: os.PathLike | str | None = None,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        extra_args: Sequence[str] = (),
        log_verbose: int = 0,
        model_control: str = "none",
        load_models: Sequence[str] = (),
        env: dict[str, str] | None = None,
        host: str = _LOOPBACK,
        http_unix_socket: os.PathLike | str | None = None,
    ) -> None:
        """`host`: the loopback address every endpoint binds (127.0.0.1; another 127.x address lets
        several servers share port numbers, as pods of one Service do, e.g. for DNS discovery).
        `http_unix_socket`: serve HTTP/REST on this Unix socket instead of a TCP port (as a Triton
        beside the gateway on its node may: `--http-address=unix:PATH`); `http_address` is then
        `unix:PATH`, what the gateway's `http_backends` take."""
        self.host = host
        self.http_unix_socket = None if http_unix_socket is None else Path(http_unix_socket).resolve()
        self.model_repository = Path(model_repository).resolve()
        self.name = name
        # The HTTP port sits just below the gRPC port, as in Triton's defaults (HTTP 8000, gRPC
        # 8001), so the gateway's derived HTTP address (gRPC port + upstream.http_port_offset,
        # -1 by default) finds this server's.
        if not grpc_port and not http_port:
            http_port, grpc_port = find_free_ports(2)
        elif grpc_port and not http_port:
            http_port = grpc_port - 1
        self.grpc_port = grpc_port or find_free_port()
        self.http_port = http_port or find_free_port()
        self.metrics_port = metrics_port or find_free_port()
        if model_control not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control {model_control!r}: expected one of {', '.join(MODEL_CONTROL_MODES)}")
        self.model_control = model_control
        self.load_models = tuple(load_models)
        self.extra_args = tuple(extra_args)
        self.log_verbose = log_verbose
        self.env = dict(env or {})  # added to the server's environment (models read it, e.g. slow_on_demand)
        self._log_dir = (
            Path(log_dir)
            if log_dir is not None
            else Path(tempfile.mkdtemp(prefix="tensorgate-triton-"))
        )
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen | None = None
        self._backend_dir: Path | None = None
        # A prefix of our own for the Python backend's /dev/shm regions, so that what a killed
        # server leaves behind can be found and removed.
        self._shm_prefix = f"tensorgate_{uuid.uuid4().hex[:12]}_"
        self._lock = threading.RLock()
        self.startup_seconds: float | None = None

    # ---------------------------------------------------------------------------- properties

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        if self.http_unix_socket is not None:
            return f"unix:{self.http_unix_socket}"
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.host}:{self.metrics_port}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        return self._proc.pid if self.is_running else None

    @property
    def log_path(self) -> Path:
        return self._log_dir / f"{self.name}.log"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        if self._proc is None:
            state = "never started"
        elif self._proc.poll() is None:
            state = "running"
        else:
            state = f"exited({self._proc.returncode})"
        return (
            f"LocalTriton(name={self.name!r}, grpc={self.grpc_port}, http={self.http_port}, "
            f"metrics={self.metrics_port}, pid={self.pid}, state={state})"
        )

    # ------------------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 90.0) -> LocalTriton:
        """Spawn the server and wait until it is ready over HTTP and its gRPC port accepts.

        Raises TritonLaunchError, with the tail of this launch's log, if the server exits or is
        not ready within `timeout` seconds (it is killed then). A server killed by a signal before
        it was ready is started again, up to START_ATTEMPTS times in all: the wheel's Triton (2.51)
        aborts at start-up now and then (boost::interprocess::lock_exception in its Python backend,
        on a loaded machine twice in a row at times), which says nothing about the repository or
        the ports; an exit of its own (a model that does not load, a port taken) is not retried.
        """
        with self._lock:
            for attempt in range(2, START_ATTEMPTS + 1):
                try:
                    return self._start_once(timeout)
                except _AbortedAtStart as error:
                    _log.warning("%s; starting it again (attempt %d of %d)", str(error).splitlines()[0],
                                 attempt, START_ATTEMPTS)
            return self._start_once(timeout)

    def _start_once(self, timeout: float) -> LocalTriton:
        with self._lock:
            if self.is_running:
                raise TritonLaunchError(f"{self!r} is already running")
            if not self.model_repository.is_dir():
                raise TritonLaunchError(
                    f"model repository {self.model_repository} is not a directory"
                )
            binary = triton_binary()
            if self.http_unix_socket is not None:
                # Triton will not bind a socket path that exists: what a killed server left goes.
                self.http_unix_socket.unlink(missing_ok=True)
            backend_dir = self._prepare_backend_dir()
            args = self._command(binary, backend_dir)
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== tensorgate LocalTriton {self.name}: {' '.join(args)}\n".encode())
                log.flush()
                log_offset = log.tell()
                began = time.monotonic()
                self._proc = _spawner.popen(
                    _die_with_parent(args),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment(),
                    # Own process group: kill() and stop() reach the backend stubs too.
                    start_new_session=True,
                )
            _live.add(self)
            try:
                self._wait_ready(began + timeout, log_offset, timeout)
            except BaseException:
                self.kill()
                raise
            self.startup_seconds = time.monotonic() - began
            return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; waits for the stubs too. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    proc.wait()
            self._after_exit()

    def kill(self) -> None:
        """SIGKILL the server, as a crashed node, and wait until it and its stubs are gone."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                # Only the server: its stubs notice and exit on their own, removing their
                # shared memory, which a SIGKILL to them would leave behind.
                proc.kill()
                proc.wait()
            self._after_exit()

    def restart(self, timeout: float = 90.0) -> LocalTriton:
        """Stop if running, then start again on the same ports."""
        with self._lock:
            self.stop()
            return self.start(timeout)

    def __enter__(self) -> LocalTriton:
        if not self.is_running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------- internals

    def _command(self, binary: Path, backend_dir: Path) -> list[str]:
        return [
            str(binary),
            f"--id={self.name}",
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--model-control-mode={self.model_control}",
            *(f"--load-model={name}" for name in self.load_models),
            # Ready means every model loaded; a model failing to load at start stops the server.
            "--strict-readiness=true",
            "--exit-on-error=true",
            # Our configs are complete; auto-completion would start an extra stub per model.
            "--disable-auto-complete-config",
            "--allow-grpc=true",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-http=true",
            f"--http-address={self.host if self.http_unix_socket is None else self.http_address}",
            f"--http-port={self.http_port}",
            "--allow-metrics=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython3.X.so: the running Python's own must win over a system copy of
        # another patch level. The server's libraries sit beside the pytriton package.
        libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(_server_libs_dir())]
        if env.get("LD_LIBRARY_PATH"):
            libdirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libdirs if d)
        # The stub's embedded interpreter finds its prefix by looking up `python3` on PATH: with
        # the running interpreter's directory first, a virtual environment's pyvenv.cfg is found
        # and models import exactly the packages the launching Python sees.
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH", "")) if p)
        if not os.access(os.path.join(bindir, "python3"), os.X_OK):
            # No `python3` to be found there: name the site-packages directly instead.
            import site

            extra = [*site.getsitepackages(), site.getusersitepackages()]
            if env.get("PYTHONPATH"):
                extra.append(env["PYTHONPATH"])
            env["PYTHONPATH"] = os.pathsep.join(extra)
        # Models' print() output reaches the log as it happens.
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env

    def _prepare_backend_dir(self) -> Path:
        # The Python backend looks for the stub and utils beside libtriton_python.so, so the
        # three files from different places in the wheel are gathered in <tmp>/python/. Beside it,
        # tensorgate's Python-based backends (tensorgate_onnx, …: one model.py each), which serve
        # packaged ONNX and TorchScript folders on this Triton that has no framework backend.
        if self._backend_dir is None or not self._backend_dir.exists():
            from gateway.packaging.backends import install_backends

            root = Path(tempfile.mkdtemp(prefix="tensorgate-backends-"))
            (root / "python").mkdir()
            for path in _python_backend_files():
                shutil.copy2(path, root / "python" / path.name)
            install_backends(root)
            self._backend_dir = root
        return self._backend_dir

    def _wait_ready(self, deadline: float, log_offset: int, timeout: float) -> None:
        assert self._proc is not None
        while True:
            returncode = self._proc.poll()
            if returncode is not None:
                raise (_AbortedAtStart if returncode < 0 else TritonLaunchError)(
                    f"{self.name}: tritonserver exited with code {returncode} before it was ready; "
                    f"log {self.log_path}, last lines:\n{self.log_tail(log_offset)}"
                )
            if (
                self._http_ready()
                and _accepts(self.host, self.grpc_port)
                and _accepts(self.host, self.metrics_port)
            ):
                return
            if time.monotonic() > deadline:
                raise TritonLaunchError(
                    f"{self.name}: tritonserver was not ready after {timeout:.0f} s; "
                    f"log {self.log_path}, last lines:\n{self.log_tail(log_offset)}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _http_ready(self) -> bool:
        """Triton's HTTP endpoint answers 200 to /v2/health/ready (over TCP or its Unix socket)."""
        if self.http_unix_socket is None:
            connection = http.client.HTTPConnection(self.host, self.http_port, timeout=2.0)
        else:
            connection = _UnixHTTPConnection(str(self.http_unix_socket), timeout=2.0)
        try:
            connection.request("GET", "/v2/health/ready")
            return connection.getresponse().status == 200
        except (http.client.HTTPException, OSError):
            # Not listening yet, or 400 while models load (strict readiness).
            return False
        finally:
            connection.close()

    def log_tail(self, offset: int = 0) -> str:
        """The log's last lines (of what was written from byte `offset` on)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.rstrip("\n").splitlines()[-_LOG_TAIL_LINES:])

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _after_exit(self) -> None:
        """Once the server has exited: make sure no stub outlives it, remove temporary files."""
        if self._proc is not None:
            pgid = self._proc.pid
            if not _group_emptied(pgid, _STUB_EXIT_GRACE_S):
                self._signal_group(signal.SIGKILL)
                # A SIGKILL is delivered when the process next runs: wait until it has (a caller,
                # or a restart on the same ports, must find the stubs gone when this returns).
                _group_emptied(pgid, _STUB_EXIT_GRACE_S)
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)
        if self._backend_dir is not None:
            shutil.rmtree(self._backend_dir, ignore_errors=True)
            self._backend_dir = None
        _live.discard(self)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection over a Unix socket (the standard library speaks only TCP)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
