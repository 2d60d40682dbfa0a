"""What `pip install llama-mlx` brings, and that the library and the CLI run without mlx-lm, transformers or torch.

The requirements are read from the metadata the build backend (setuptools, as pip would run it)
makes from this checkout's pyproject.toml, not from an installed copy, which may predate it.
"""

from __future__ import annotations

import email.parser
import importlib.metadata as md
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"mlx-lm", "transformers", "torch"}  # oracles and benchmark baselines, never runtime needs
PLATFORMS = {"linux": "Linux", "darwin": "Darwin"}


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """The METADATA setuptools builds from this checkout's pyproject.toml (a copy, so no egg-info lands here)."""
    src = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    (src / "out").mkdir()
    code = "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel('out'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_info = src / "out" / proc.stdout.strip().splitlines()[-1]
    return email.parser.Parser().parsestr((dist_info / "METADATA").read_text())


def _requirements(metadata, extra: str | None = None, sys_platform: str | None = None) -> dict[str, Requirement]:
    """Requirements that apply to `extra` (None: the runtime ones) on a platform (None: this one), by name."""
    env = dict(default_environment())
    if sys_platform:
        env.update(sys_platform=sys_platform, platform_system=PLATFORMS[sys_platform])
    out = {}
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None and extra is None or req.marker is not None and req.marker.evaluate(
                {**env, "extra": extra or ""}):
            out[canonicalize_name(req.name)] = req
    return out


def test_runtime_requirements_leave_out_mlx_lm_and_transformers(metadata):
    assert metadata["Name"] == "llama-mlx"
    for platform in PLATFORMS:
        runtime = _requirements(metadata, sys_platform=platform)
        assert {"mlx", "tokenizers", "tiktoken", "typer"} <= set(runtime), (platform, sorted(runtime))
        assert not FORBIDDEN & set(runtime), (platform, sorted(runtime))
    # Every requirement line without an extra marker is a runtime one, whatever its platform.
    lines = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    runtime_names = {canonicalize_name(r.name) for r in lines if "extra" not in str(r.marker or "")}
    assert not FORBIDDEN & runtime_names and "mlx" in runtime_names


def test_mlx_has_a_tested_upper_bound(metadata):
    installed = Version(md.version("mlx"))
    for platform in PLATFORMS:
        spec = _requirements(metadata, sys_platform=platform)["mlx"].specifier
        assert Version("0.29") in spec and Version("99.0") not in spec, (platform, str(spec))
        assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), (platform, str(spec))
        assert installed in spec, (platform, str(spec), str(installed))  # the bound admits what was tested
    here = _requirements(metadata)["mlx"]
    if sys.platform == "linux":
        assert "cpu" in here.extras  # MLX's CPU backend on Linux


def test_extras_bring_mlx_lm(metadata):
    test = _requirements(metadata, extra="test")
    bench = _requirements(metadata, extra="bench")
    assert {"mlx-lm", "transformers", "pytest", "matplotlib"} <= set(test), sorted(test)
    assert {"mlx-lm", "matplotlib"} <= set(bench), sorted(bench)
    for name in ("mlx-lm", "transformers"):
        assert Version(md.version(name)) in test[name].specifier, (name, str(test[name].specifier))


def _closure(reqs: list[Requirement]) -> set[str]:
    """Names of every installed distribution the requirements pull in, transitively (markers evaluated here)."""
    seen: set[str] = set()
    todo: list = [(r, None) for r in reqs]  # None: already chosen for this platform and extra
    while todo:
        req, extra = todo.pop()
        if extra is not None and req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in md.requires(name) or []:  # PackageNotFoundError: a runtime requirement is not installed
            sub = Requirement(line)
            for e in [""] + sorted(req.extras):
                todo.append((sub, e))
    return {k.split("[")[0] for k in seen}


def test_runtime_closure_installs_neither(metadata):
    names = _closure(list(_requirements(metadata).values()))
    assert {"mlx", "tokenizers", "numpy", "typer", "rich", "jinja2"} <= names, sorted(names)
    assert not FORBIDDEN & names, sorted(FORBIDDEN & names)
    # The same walk does find them through the test extra: the check above can fail.
    assert {"mlx-lm", "transformers", "torch"} <= _closure(list(_requirements(metadata, extra="test").values()))


CHILD = r"""
import importlib, importlib.abc, importlib.util, json, pkgutil, sys
sys.path[:0] = [ROOT]  # this checkout: its library, and benchmarks/ for a random model
BLOCKED = ("mlx_lm", "transformers", "torch")
for name in BLOCKED:
    assert importlib.util.find_spec(name) is not None, f"{name} is not installed: blocking it would prove nothing"
    assert name not in sys.modules, name

class Block(importlib.abc.MetaPathFinder):
    hits = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            self.hits.append(fullname)
            raise ModuleNotFoundError(f"blocked: {fullname}", name=fullname)
        return None

sys.meta_path.insert(0, Block())
for name in BLOCKED:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise AssertionError(f"{name} imported despite the block")
assert Block.hits == list(BLOCKED), Block.hits

import llama_mlx, llama_mlx_cli
assert all(p.startswith(ROOT) for p in llama_mlx.__path__ + llama_mlx_cli.__path__)
modules, failures = [], []
for pkg in (llama_mlx, llama_mlx_cli):
    modules.append(pkg.__name__)
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=failures.append):
        try:
            importlib.import_module(info.name)
            modules.append(info.name)
        except Exception as e:
            failures.append(f"{info.name}: {type(e).__name__}: {e}")
assert not failures, failures

import typer
from typer.testing import CliRunner
from llama_mlx_cli.main import app
from benchmarks.random_model import write_random_model

runner = CliRunner()
commands = sorted(typer.main.get_command(app).commands)
helps = {}
for args in [["--help"]] + [[c, "--help"] for c in commands]:
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "Usage" in r.output, (args, r.exit_code, r.output[-2000:], r.exception)
    helps[" ".join(args)] = len(r.output)
folder = write_random_model(TMP + "/tiny", "tiny", dtype="float32")
r = runner.invoke(app, ["bench", "--model", str(folder), "--prompt-tokens", "8", "-g", "3", "-n", "1", "--json"])
assert r.exit_code == 0, (r.output[-3000:], r.exception)
bench = json.loads(r.stdout.strip().splitlines()[-1])
print(json.dumps({"modules": modules, "commands": commands, "helps": helps, "bench": bench,
                  "hits": Block.hits, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_library_and_cli_run_without_mlx_lm_transformers_torch(tmp_path):
    code = f"ROOT = {str(ROOT)!r}\nTMP = {str(tmp_path)!r}\n" + CHILD
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    modules = out["modules"]
    assert len(modules) > 20 and len(set(modules)) == len(modules), modules
    for name in ("llama_mlx.benchmark", "llama_mlx.loading", "llama_mlx.generate", "llama_mlx_cli.main",
                 "llama_mlx_cli.bench", "llama_mlx.checkpoints.gguf", "llama_mlx.tokenizer.hf"):
        assert name in modules, name
    assert {"bench", "chat", "convert", "generate", "info"} <= set(out["commands"]), out["commands"]
    assert "--help" in out["helps"] and "bench --help" in out["helps"]
    assert out["loaded"] == [], out["loaded"]  # nothing of the blocked packages got in
    assert out["hits"] == ["mlx_lm", "transformers", "torch"], out["hits"]  # nor did anything try, after the probe
    bench = out["bench"]
    assert bench["runtime"] == "llama-mlx" and bench["prompt_tokens"] == 8 and bench["generation_tokens"] == 3
    assert bench["generation_tps"] > 0 and "mlx_lm" not in bench["device"]
