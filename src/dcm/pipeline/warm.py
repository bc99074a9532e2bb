"""Warm start for local stages: one interpreter imports the libraries once and forks every stage.

A stage process spends 5-9 s importing before it does any work: torch, MLflow with its SQL store and,
for every stage that loads a model, diffusers (which imports each transformer model it ships, peft
and transformers with it).  `dvc repro` starts one process per stage, 125 in `make paper`.  With
``DCM_WARM_START=1`` a local ``dcm launch`` asks a server for the stage instead: the server has made those imports once, forks a child per request, and the child
runs ``dcm run <stage>`` in the launcher's working directory, with its environment, umask and standard
streams (passed over the socket), while the launcher waits and returns the child's exit status.  A
signal to the launcher (SIGINT, SIGTERM, SIGHUP) is passed on to the child, and a child whose
launcher has gone is stopped.  The first launch starts the server; it exits after
``DCM_WARM_START_IDLE`` seconds (default 300) without a stage.

What the child computes is what a fresh process computes: the stage seeds every generator itself
(``Stage.run``), and the server only imports before it forks, so each child starts its own thread
pools and devices, as a fresh process does.  The server is keyed by the interpreter, the files of the ``dcm`` package (path, size, mtime), the
site-packages folders and the environment (less the variables that differ between stages of one run,
``VOLATILE``), so an edit to the code, an installed package or a changed variable starts a new
server instead of reusing stale imports.  Where no server can start, the stage runs in-process, as
without ``DCM_WARM_START``, after a warning that says why.  Multi-process ranks and SLURM jobs never
start warm.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ENV = "DCM_WARM_START"
IDLE_ENV = "DCM_WARM_START_IDLE"
IDLE_S = 300.0
START_TIMEOUT_S = 180.0
# set per stage by DVC, or by the shell; never read at import time
VOLATILE = frozenset({"DVC_STAGE", "_", "PWD", "OLDPWD", "SHLVL"})
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # from the launcher to its stage
# what the server imports before it serves: every stage's libraries
PRELOAD = ("torch", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "diffusers", "peft",
           "dcm.pipeline.table", "dcm.tracking", "dcm.backbones", "dcm.methods", "dcm.distill.loop",
           "dcm.evaluation.metrics")


def enabled() -> bool:
    """``DCM_WARM_START`` is set (1/true/yes) and this is not one rank of a multi-process job."""
    on = os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return on and os.environ.get("WORLD_SIZE", "1").strip() in ("", "1") and "SLURM_JOB_ID" not in os.environ


def key(environ: dict[str, str] | None = None) -> str:
    """What the server's imports depend on (see the module docstring), as a short hash."""
    import site

    environ = dict(os.environ if environ is None else environ)
    h = hashlib.sha256(sys.executable.encode())
    package = Path(__file__).resolve().parents[1]
    for p in sorted(package.rglob("*.py")):
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for folder in site.getsitepackages():
        with contextlib.suppress(OSError):
            h.update(f"{folder}:{os.stat(folder).st_mtime_ns}\n".encode())
    h.update(json.dumps(sorted((k, v) for k, v in environ.items() if k not in VOLATILE)).encode())
    return h.hexdigest()[:16]


def _folder(tmpdir: str | Path | None = None) -> Path:
    """``$TMPDIR/dcm-warm-<uid>``: where this user's servers keep their sockets, logs and locks."""
    return Path(tmpdir or tempfile.gettempdir()) / f"dcm-warm-{os.getuid()}"


def socket_path(k: str) -> Path:
    """``$TMPDIR/dcm-warm-<uid>/<key>.sock``: the folder is this user's alone (0700, checked)."""
    folder = _folder()
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{folder} is not private to uid {os.getuid()}")
    path = folder / f"{k}.sock"
    if len(os.fsencode(path)) > 96:  # sun_path holds 107 bytes, and the server binds <path>.<pid> first
        raise OSError(f"{path} is too long for a Unix socket (set TMPDIR to a shorter folder)")
    return path


def stop(tmpdir: str | Path | None = None) -> list[int]:
    """SIGTERM this user's warm servers under ``tmpdir`` (default: this process's TMPDIR); their pids.
    A pid is signalled only while its command line is still that log's server."""
    stopped = []
    for log in _folder(tmpdir).glob("*.log"):
        for pid in map(int, re.findall(r"pid (\d+) ready", log.read_text())):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"warm-server" in cmdline and str(log.with_suffix(".sock")).encode() in cmdline:
                    os.kill(pid, signal.SIGTERM)
                    stopped.append(pid)
            except (OSError, ProcessLookupError):
                pass
    return stopped


# -- messages: a 4-byte length and a JSON object ---------------------------------------------------

def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    header = struct.pack("!I", len(data))
    if fds:  # the descriptors ride on the 4-byte header (never sent in part); the body follows
        socket.send_fds(sock, [header], fds)
    else:
        sock.sendall(header)
    sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _recv(sock: socket.socket) -> dict:
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    return json.loads(_recv_exact(sock, n))


def _recv_request(sock: socket.socket) -> tuple[dict, list[int]]:
    msg, fds, _, _ = socket.recv_fds(sock, 4, 3)
    if not msg:
        raise ConnectionError("closed")
    (n,) = struct.unpack("!I", msg + _recv_exact(sock, 4 - len(msg)))
    return json.loads(_recv_exact(sock, n)), list(fds)


# -- the launcher's side ---------------------------------------------------------------------------

def run(argv: list[str]) -> int | None:
    """Run ``dcm <argv>`` (a ``run`` command) in a child of the warm server; its exit status, or
    None when no server could start (the caller then runs the stage itself)."""
    try:
        path = socket_path(key())
        sock = _connect(path) or _start(path)
    except OSError as e:
        print(f"dcm launch: warm start unavailable ({e}); running in this process", file=sys.stderr)
        return None
    if sock is None:
        return None
    # the signals this launcher ignores (nohup, a background job), the stage ignores too
    ignored = [int(s) for s in FORWARDED if signal.getsignal(s) == signal.SIG_IGN]
    with sock:
        try:
            _send(sock, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(),
                         "ignored": ignored}, [0, 1, 2])
            pid = _recv(sock)["pid"]
        except (OSError, ConnectionError) as e:  # nothing started yet
            print(f"dcm launch: the warm server did not take the stage ({e}); running in this process",
                  file=sys.stderr)
            return None
        forwarded = {s: signal.signal(s, lambda sig, _f: _forward(pid, sig)) for s in FORWARDED}
        try:
            return int(_recv(sock)["status"])
        except ConnectionError:
            print("dcm launch: the warm server closed before the stage reported its status", file=sys.stderr)
            return 1
        finally:
            for s, handler in forwarded.items():
                signal.signal(s, handler)


def _forward(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _start(path: Path) -> socket.socket | None:
    """Start the server (one at a time: a lock beside the socket) and connect once it listens."""
    import fcntl
    import subprocess

    log = path.with_suffix(".log")
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another launcher may be starting the same server
        sock = _connect(path)
        if sock is not None:
            return sock
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a server that died without removing its socket
        with open(log, "ab") as out:
            server = subprocess.Popen([sys.executable, "-P", "-m", "dcm.cli", "warm-server", str(path)],
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            if server.poll() is not None:
                break
            time.sleep(0.05)
        print(f"dcm launch: the warm server did not start (log: {log}); running in this process",
              file=sys.stderr)
        return None


# -- the server's side -----------------------------------------------------------------------------

def serve(path: Path, main: Callable[[list[str]], int]) -> None:
    """Import ``PRELOAD``, listen on ``path``, fork a supervisor per request; exit when idle.  A
    request's child runs ``main(argv)`` (``dcm.cli.main``) and exits with what it returns."""
    import importlib

    idle_s = float(os.environ.get(IDLE_ENV, IDLE_S))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill`: remove the socket on the way out
    t0 = time.monotonic()
    for name in PRELOAD:
        importlib.import_module(name)
    _log(f"pid {os.getpid()} ready in {time.monotonic() - t0:.1f} s; idle exit after {idle_s:.0f} s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    listener.bind(str(tmp))
    listener.listen(16)
    os.replace(tmp, path)  # clients see the socket only once it listens
    inode = path.stat().st_ino
    listener.settimeout(1.0)
    children: set[int] = set()
    last = time.monotonic()
    try:
        while True:
            for pid in list(children):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)
                    last = time.monotonic()
            if not children and time.monotonic() - last > idle_s:
                break
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            last = time.monotonic()
            try:
                request, fds = _recv_request(conn)
            except (ConnectionError, ValueError, OSError) as e:
                _log(f"bad request: {e}")
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                _supervise(conn, request, fds, main)  # never returns
            children.add(pid)
            conn.close()
            for fd in fds:
                os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:
                path.unlink()
        _log(f"pid {os.getpid()} exits (idle {idle_s:.0f} s)")


def _supervise(conn: socket.socket, request: dict, fds: list[int], main: Callable[[list[str]], int]) -> None:
    """Fork the stage, tell the launcher its pid, wait for it (stopping it if the launcher goes away),
    then send its exit status."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _stage(request, fds, main)  # never returns
    for fd in fds:
        os.close(fd)
    _log(f"stage pid {pid}: dcm {' '.join(request['argv'])} in {request['cwd']}")
    status = None
    try:
        _send(conn, {"pid": pid})
        conn.settimeout(0.2)
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
                continue
            try:
                if conn.recv(1) == b"":  # the launcher is gone: stop its stage
                    _log(f"stage pid {pid}: launcher gone, sending SIGTERM")
                    _forward(pid, signal.SIGTERM)
                    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            except TimeoutError:
                pass
        status = 128 - status if status < 0 else status  # killed by a signal: the shell's convention
        _log(f"stage pid {pid}: exit status {status}")
        _send(conn, {"status": status})
    except OSError as e:
        _log(f"stage pid {pid}: {e}")
    finally:
        os._exit(0)


def _stage(request: dict, fds: list[int], main: Callable[[list[str]], int]) -> None:
    """The child: become the launcher's process (streams, directory, environment) and run the stage."""
    import atexit
    import random

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for s in FORWARDED:  # the launcher's dispositions, not those the server was started with
        default = signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL
        signal.signal(s, signal.SIG_IGN if int(s) in request.get("ignored", ()) else default)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams, open until it exits
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = ["dcm", *request["argv"]]
    random.seed()  # as a fresh interpreter would (stages seed what they draw from themselves)
    status = 1
    try:
        status = main(request["argv"])
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - a stage's crash is reported as a fresh process would
        import traceback

        traceback.print_exc()
        status = 128 + signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(status)


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)
