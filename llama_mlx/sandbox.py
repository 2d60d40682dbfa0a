"""Llama 3.1's code interpreter: run a model's `<|python_tag|>` code in a confined subprocess.

The code runs in a fresh `python -I` with a wall-clock and CPU time limit, an address-space
limit, a scratch folder as its working directory and home, a bare environment, and no network:
on Linux in a new network namespace (`unshare -n`, or `unshare -rn` without root), on macOS
under `sandbox-exec` with network access denied. Where neither works the code still runs, with
an audit hook that refuses sockets (a weaker, in-process guard), and `PythonResult.network_isolation`
says which one applied.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["PythonResult", "PythonSandbox", "network_isolation"]

# Runs before the model's code: sockets are refused even where the kernel cannot isolate.
_PRELUDE = """\
import sys as _s
def _no_network(event, args):
    if event.startswith("socket.") and event not in ("socket.gethostname", "socket.sethostname"):
        raise PermissionError("network access is disabled in this sandbox")
_s.addaudithook(_no_network)
del _s, _no_network
"""

_MAC_PROFILE = "(version 1)(allow default)(deny network*)"


@dataclass
class PythonResult:
    """How a run went: its combined stdout/stderr (cut to `limit` characters), exit status, whether it
    ran out of time, and the network isolation that applied."""

    output: str
    returncode: Optional[int]
    timed_out: bool
    network_isolation: str

    def as_tool_output(self) -> str:
        """The text fed back to the model as the `ipython` turn."""
        text = self.output
        if self.timed_out:
            text += "\n[timed out]"
        elif self.returncode:
            text += f"\n[exit status {self.returncode}]"
        return text.strip("\n") or "[no output]"


@functools.lru_cache(maxsize=None)
def network_isolation() -> tuple[str, tuple[str, ...]]:
    """(name, command prefix) of the strongest network isolation that works here."""
    unshare = shutil.which("unshare")
    if unshare and sys.platform.startswith("linux"):
        for args in ((unshare, "-n"), (unshare, "-rn")):
            try:
                ok = subprocess.run([*args, "true"], capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return "network namespace (" + " ".join(["unshare", args[1]]) + ")", args
    sandbox = shutil.which("sandbox-exec")
    if sandbox and sys.platform == "darwin":
        args = (sandbox, "-p", _MAC_PROFILE)
        try:
            if subprocess.run([*args, "true"], capture_output=True, timeout=10).returncode == 0:
                return "sandbox-exec (network denied)", args
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "audit hook (sockets refused in Python only)", ()


class PythonSandbox:
    """Runs code with limits; the scratch folder lives as long as the sandbox (`close` removes it)."""

    def __init__(self, *, timeout: float = 10.0, memory_mb: int = 1024, output_limit: int = 4000,
                 python: Optional[str] = None):
        self.timeout, self.memory_mb, self.output_limit = timeout, memory_mb, output_limit
        self.python = python or sys.executable
        self.scratch = Path(tempfile.mkdtemp(prefix="llama-mlx-python-"))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "PythonSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _limits(self) -> None:  # in the child, before exec
        import resource

        memory = self.memory_mb << 20
        for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory),
                             (resource.RLIMIT_CPU, int(self.timeout) + 1), (resource.RLIMIT_CORE, 0)):
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass  # not enforceable here (macOS ignores RLIMIT_AS): the time limit still holds

    def run(self, code: str) -> PythonResult:
        """Run `code`; never raises for what the code does."""
        name, prefix = network_isolation()
        env = {"PATH": os.defpath, "HOME": str(self.scratch), "TMPDIR": str(self.scratch),
               "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [*prefix, self.python, "-I", "-c", _PRELUDE + "\nexec(compile(%r, '<tool>', 'exec'))" % code]
        proc = subprocess.Popen(cmd, cwd=self.scratch, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=self._limits)
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        except BaseException:  # Ctrl-C while it runs: it must not outlive us
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        text = out.decode("utf-8", "replace")
        if len(text) > self.output_limit:
            text = text[: self.output_limit] + f"\n[output cut at {self.output_limit} characters]"
        return PythonResult(text, None if timed_out else proc.returncode, timed_out, name)

