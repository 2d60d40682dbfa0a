"""Llama 3.1's code interpreter: run a model's `<|python_tag|>` code in a confined subprocess.

The code runs in a fresh `python -I` with a scratch folder as its working directory and home, a bare
environment, and these limits:

- Linux (`_sandbox_linux.py` sets it up): new user, network, PID, IPC and UTS namespaces (no network,
  no other processes in view); Landlock lets it read and execute only the Python installation and
  system paths (/usr, /lib, ...) and write only the scratch folder; a seccomp filter refuses Unix
  sockets, io_uring and kernel keyrings; at most `max_processes` processes (RLIMIT_NPROC, counted
  per user namespace); each process's address space and CPU time limited.
- macOS: `sandbox-exec` with a profile that denies by default and allows reading the Python
  installation and system paths, writing the scratch folder, and no network, Unix sockets or new
  processes (the code is one process). macOS ignores RLIMIT_AS: memory is held by the monitor below.

Both: a monitor sums the memory of every process of the run (not per process) and stops the run past
`memory_mb`; at the deadline the whole tree is killed (on Linux, killing the PID namespace's init
takes every process in it, detached ones included) without waiting for the output pipe to close;
output is read up to a bound, then the run is stopped; `close` removes the scratch folder whatever
the code did to its permissions. Where none of this is available, `confinement` and `PythonSandbox`
raise `SandboxUnavailableError` instead of running unconfined.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import SandboxUnavailableError

__all__ = ["PythonResult", "PythonSandbox", "SandboxUnavailableError", "confinement"]

_LAUNCHER = Path(__file__).with_name("_sandbox_linux.py")
_SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/localtime",
                "/sys/devices/system/cpu")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_MAC_SYSTEM_READ = ("/usr/lib", "/usr/share", "/System", "/Library/Apple", "/private/var/db/dyld",
                    "/private/var/db/timezone", "/private/etc/localtime")
_POLL = 0.05  # seconds between memory samples (and the longest wait for output)
# The code comes on stdin (no command-line length limit), which is then at its end, as /dev/null would be.
_RUN_STDIN = "import sys; exec(compile(sys.stdin.buffer.read(), '<tool>', 'exec'))"


@dataclass
class PythonResult:
    """How a run went: its combined stdout/stderr (cut to `limit` characters), exit status, whether it
    ran out of time, what stopped it early (`"memory"` or `"output"`, noted in the output) and the
    confinement that applied."""

    output: str
    returncode: Optional[int]
    timed_out: bool
    confinement: str
    stopped: Optional[str] = None

    def as_tool_output(self) -> str:
        """The text fed back to the model as the `ipython` turn."""
        text = self.output
        if self.timed_out:
            text += "\n[timed out]"
        elif self.returncode:
            text += f"\n[exit status {self.returncode}]"
        return text.strip("\n") or "[no output]"


@functools.lru_cache(maxsize=None)
def _prefixes(python: str) -> tuple[str, ...]:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix
    try:
        out = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix, sys.base_prefix, "
                              "sys.exec_prefix, sys.base_exec_prefix, sep='\\n')"],
                             capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailableError(f"cannot run the Python tool's interpreter {python}: {e}") from e
    return tuple(p for p in out.stdout.split("\n")[:4] if p)


def _python_paths(python: str) -> list[str]:
    """What an interpreter reads at startup: its prefixes (a venv's and its base's) and itself."""
    paths = sorted({os.path.realpath(p) for p in _prefixes(python)}
                   | {os.path.abspath(python), os.path.realpath(python)})
    home = os.path.realpath(os.path.expanduser("~"))
    for p in paths:
        if os.path.isdir(p) and os.path.commonpath([p, home]) == p:
            raise SandboxUnavailableError(f"the Python tool's interpreter lives in {p}, which holds the home "
                                          "folder: the tool could read the home folder, so it does not run")
    return paths


def _mac_profile(read: list[str], scratch: str) -> str:
    """sandbox-exec's profile: deny by default; read the interpreter and system paths, write the scratch folder."""

    def q(path: str) -> str:
        return '"' + os.path.realpath(path).replace("\\", "\\\\").replace('"', '\\"') + '"'

    reads = " ".join(f"(subpath {q(p)})" for p in [*read, *_MAC_SYSTEM_READ])
    devices = " ".join(f"(literal {q(p)})" for p in _DEVICES)
    return "\n".join([
        "(version 1)",
        "(deny default)",  # network, Unix sockets, process-fork, IPC: all denied
        "(allow process-exec)",  # sandbox-exec's own exec of the interpreter (no fork: the run is one process)
        "(allow file-read-metadata)",  # stat() on any path (Python's startup walks up its paths); no contents
        f"(allow file-read* {reads})",
        f"(allow file-read* file-write-data {devices})",
        f"(allow file-read* file-write* (subpath {q(scratch)}))",
        "(allow sysctl-read)",
        "(allow signal (target self))",
    ])


def _linux_config(python: str, scratch: str, argv: list[str], env: dict, memory_mb: int, cpu_seconds: int,
                  max_processes: int, status_fd: int) -> dict:
    return {"argv": argv, "env": env, "cwd": scratch, "status_fd": status_fd,
            "read_paths": [*_python_paths(python), *_SYSTEM_READ], "write_paths": [scratch],
            "device_paths": list(_DEVICES), "memory_bytes": memory_mb << 20, "cpu_seconds": cpu_seconds,
            "max_processes": max_processes}


def _input_file(*parts: bytes) -> int:
    """A read-only descriptor of an already removed file holding `parts`: the launcher's stdin."""
    fd, name = tempfile.mkstemp(prefix="llama-mlx-tool-")
    try:
        with open(fd, "wb") as f:
            f.write(b"".join(parts))
        return os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.unlink(name)


def _linux_input(cfg: dict, code: str = "") -> int:
    config = json.dumps(cfg).encode()
    return _input_file(b"%15d\n" % len(config), config, code.encode("utf-8", "replace"))


def _read_status(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


@functools.lru_cache(maxsize=None)
def _probe(python: str) -> str:
    if sys.platform.startswith("linux"):
        with tempfile.TemporaryDirectory(prefix="llama-mlx-probe-") as scratch:
            r, w = os.pipe()
            try:
                stdin = _linux_input(_linux_config(python, scratch, [python], {}, 256, 5, 16, w))
                proc = subprocess.run([sys.executable, "-I", "-S", str(_LAUNCHER), "--probe"], stdin=stdin,
                                      capture_output=True, pass_fds=(w,), timeout=30)
                os.close(stdin)
            except (OSError, subprocess.TimeoutExpired) as e:
                proc = subprocess.CompletedProcess([], 1, b"", str(e).encode())
            finally:
                os.close(w)
                status = _read_status(r)
        if proc.returncode != 0 or not status.startswith("ok landlock "):
            why = (status.strip().removeprefix("error: ")
                   or (proc.stderr.decode(errors="replace").strip().splitlines() or ["no reason given"])[-1])
            raise SandboxUnavailableError(f"the Python tool cannot be confined here ({why}), so it does not run")
        return (f"Linux namespaces (user, network, PID), Landlock ABI {status.split()[2]} (files: scratch folder, "
                "read-only system and Python paths), seccomp (no Unix sockets)")
    if sys.platform == "darwin" and shutil.which("sandbox-exec"):
        with tempfile.TemporaryDirectory(prefix="llama-mlx-probe-") as scratch:
            profile = _mac_profile(_python_paths(python), scratch)
            try:
                proc = subprocess.run(["sandbox-exec", "-p", profile, python, "-I", "-c", "pass"], cwd=scratch,
                                      stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as e:
                proc = subprocess.CompletedProcess([], 1, b"", str(e).encode())
        if proc.returncode != 0:
            why = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no reason given"]
            raise SandboxUnavailableError(f"the Python tool cannot be confined here (sandbox-exec: {why[0]}), "
                                          "so it does not run")
        return "sandbox-exec (files: scratch folder, read-only system and Python paths; no network, no subprocesses)"
    raise SandboxUnavailableError(f"the Python tool cannot be confined on {sys.platform} (it needs Linux's "
                                  "namespaces and Landlock, or macOS's sandbox-exec), so it does not run")


def confinement(python: Optional[str] = None) -> str:
    """What confines the Python tool on this machine, in words; raises `SandboxUnavailableError` (saying
    why) where it cannot be confined. Checked once per interpreter, by running the setup for real."""
    python = python or sys.executable
    _python_paths(python)  # (where the home folder is may change between calls)
    return _probe(python)


def _tree_memory(root: int) -> int:
    """Bytes of private memory (anonymous and shared-memory pages) of `root`'s descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(name))
    total, todo = 0, list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"RssAnon:", b"RssShmem:")):
                    total += int(line.split()[1]) << 10
    return total


def _process_memory(pid: int) -> int:
    """Resident bytes of one process, from `ps` (macOS has no /proc)."""
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return int(out) << 10 if out.isdigit() else 0


def _remove_tree(path: Path) -> None:
    """Remove a folder the code may have made unreadable or read-only (`chmod 000`); never raises."""

    root = os.path.abspath(path)

    def unlock(func, failed, exc_info):
        if isinstance(exc_info[1], FileNotFoundError):
            return  # gone already
        for folder in (os.path.dirname(failed), failed):
            if os.path.commonpath([root, os.path.abspath(folder)]) != root:
                continue  # (the scratch folder's parent is not ours to change)
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(folder).st_mode):  # not through a link: only the scratch folder's own
                    os.chmod(folder, 0o700)
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(failed).st_mode):
                shutil.rmtree(failed, onerror=unlock)
            else:
                os.unlink(failed)

    if not os.path.lexists(path):
        return
    with contextlib.suppress(OSError, RecursionError):
        shutil.rmtree(path, onerror=unlock)
    if os.path.lexists(path):  # deeper than Python's recursion: the system's tools walk any depth
        with contextlib.suppress(OSError):
            subprocess.run(["chmod", "-R", "u+rwx", str(path)], capture_output=True)
            subprocess.run(["rm", "-rf", str(path)], capture_output=True)


class PythonSandbox:
    """Runs code confined (see the module's docstring); the scratch folder lives as long as the sandbox
    (`close` removes it). Raises `SandboxUnavailableError` where the code cannot be confined."""

    def __init__(self, *, timeout: float = 10.0, memory_mb: int = 1024, output_limit: int = 4000,
                 python: Optional[str] = None, max_processes: int = 64):
        self.timeout, self.memory_mb, self.output_limit = timeout, memory_mb, output_limit
        self.max_processes = max_processes
        self.python = python or sys.executable
        self.confinement = confinement(self.python)  # refuse before making anything
        self.scratch = Path(tempfile.mkdtemp(prefix="llama-mlx-python-"))

    def close(self) -> None:
        _remove_tree(self.scratch)

    def __enter__(self) -> "PythonSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, code: str) -> tuple[subprocess.Popen, Optional[int]]:
        scratch = str(self.scratch)
        with contextlib.suppress(OSError):
            os.chmod(scratch, 0o700)  # an earlier run may have locked its own folder
        env = {"PATH": os.defpath, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [self.python, "-I", "-u", "-c", _RUN_STDIN]  # -u: an error shows after what was printed before it
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=scratch, start_new_session=True)
        if sys.platform == "darwin":
            profile = _mac_profile(_python_paths(self.python), scratch)
            cpu = int(self.timeout) + 1  # (set in the interpreter: no preexec_fn in a threaded process)
            argv[-1] = (f"import resource as r; r.setrlimit(r.RLIMIT_CPU, ({cpu}, {cpu})); "
                        f"r.setrlimit(r.RLIMIT_CORE, (0, 0)); del r; {_RUN_STDIN}")
            stdin = _input_file(code.encode("utf-8", "replace"))
            try:
                return subprocess.Popen(["sandbox-exec", "-p", profile, *argv], stdin=stdin, env=env,
                                        **pipes), None
            finally:
                os.close(stdin)
        r, w = os.pipe()
        stdin = None
        try:
            stdin = _linux_input(_linux_config(self.python, scratch, argv, env, self.memory_mb,
                                               int(self.timeout) + 1, self.max_processes, w), code)
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(_LAUNCHER)], stdin=stdin, pass_fds=(w,),
                                    env={"PATH": os.defpath}, **pipes)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
            if stdin is not None:
                os.close(stdin)
        return proc, r

    def _stop(self, proc: subprocess.Popen) -> None:
        """Kill the whole tree: on Linux the launcher kills the PID namespace's init, which takes the rest."""
        with contextlib.suppress(OSError):
            if sys.platform == "darwin":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # (a launcher stuck in its setup)
            proc.kill()
            proc.wait()

    def run(self, code: str) -> PythonResult:
        """Run `code`; never raises for what the code does (`SandboxUnavailableError` if the setup fails)."""
        proc, status = self._start(code)
        start, out, byte_limit = time.monotonic(), bytearray(), 4 * self.output_limit + 4
        timed_out, stopped, eof = False, None, False
        fd = proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        # (`ps` on macOS costs more than reading /proc: sampled less often)
        memory, every = (_process_memory, 0.2) if sys.platform == "darwin" else (_tree_memory, _POLL)
        sampled = start
        try:
            while True:
                left = start + self.timeout - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                if eof:  # the code closed its output: wait for its end
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=min(left, _POLL))
                elif poller.poll(min(left, _POLL) * 1000):
                    chunk = os.read(fd, 65536)
                    eof = not chunk
                    out += chunk[: byte_limit + 1 - len(out)]  # never more than the bound in memory
                    if len(out) > byte_limit:
                        stopped = "output"
                        break
                if eof and proc.poll() is not None:
                    break
                if time.monotonic() - sampled >= every:  # (not on every chunk of a flood of output)
                    sampled = time.monotonic()
                    if memory(proc.pid) > self.memory_mb << 20:
                        stopped = "memory"
                        break
        finally:  # Ctrl-C while it runs included: it must not outlive us
            if proc.poll() is None:
                self._stop(proc)
            proc.stdout.close()  # without waiting for EOF: nothing left holds it open anyway
            setup = _read_status(status) if status is not None else ""
        if setup.startswith("error: "):
            raise SandboxUnavailableError(f"the Python tool's confinement failed: {setup[7:].strip()}")
        text = out.decode("utf-8", "replace")
        if len(text) > self.output_limit or stopped == "output":
            text = text[: self.output_limit] + f"\n[output cut at {self.output_limit} characters" + (
                "; the run was stopped]" if stopped else "]")
        if stopped == "memory":
            text += f"\n[stopped: the run's processes used more than {self.memory_mb} MB together]"
        finished = not (timed_out or stopped)
        return PythonResult(text, proc.returncode if finished else None, timed_out, self.confinement, stopped)
