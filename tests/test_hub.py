"""Hugging Face hub ids, `pull` / `list` / `rm`, against a real huggingface_hub cache laid out in a temporary HF_HOME.

No hub is reachable here: the cache is built the way huggingface_hub builds it (blobs named by
hash, snapshot links, refs/main), endpoints are loopback ports where nothing listens or a tiny
local server that answers what the hub answers. Every resolution runs in a fresh process, since
huggingface_hub reads HF_HOME / HF_ENDPOINT / HF_HUB_OFFLINE when imported.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_checkpoints_support import TINY_PARAMS, meta_state_dict, write_gguf

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLI = str(Path(sys.executable).with_name("llama-mlx"))
MLX_REPO, GGUF_REPO, PARTIAL_REPO = "test-org/tiny-mlx", "test-org/tiny-GGUF", "test-org/partial"
QUANT_TYPES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# --------------------------------------------------------------------------------------------
# A real huggingface_hub cache


def lay_out_repo(hf_home: Path, repo_id: str, files: dict[str, Path], commit: str | None = None) -> Path:
    """Store `files` (name in repo -> source file) as huggingface_hub does; returns the snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def blob_bytes(hf_home: Path, repo_id: str) -> int:
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    return sum(f.stat().st_size for f in (repo / "blobs").iterdir())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The model files the fake repos hold: a random tiny MLX folder and two GGUF quantizations of one model."""
    from benchmarks.random_model import write_random_model

    root = tmp_path_factory.mktemp("sources")
    write_random_model(root / "tiny-mlx", "tiny", dtype="float32", max_shard_bytes=200_000)
    # The GGUFs carry SmolLM2's tokenizer, so their vocabulary is its size (a smaller one is refused at load).
    params = {**TINY_PARAMS, "vocab_size": 49152}
    sd = meta_state_dict(params, seed=3)
    write_gguf(root / "tiny-Q8_0.gguf", sd, params, {t: "Q8_0" for t in QUANT_TYPES})
    write_gguf(root / "tiny-F16.gguf", sd, params, {t: "F16" for t in QUANT_TYPES})
    return root


@pytest.fixture
def home(tmp_path, sources):
    """HF_HOME with the three repos (one MLX, one GGUF with two files, one missing a shard) and an empty weights folder."""
    hf_home, weights = tmp_path / "hf", tmp_path / "weights"
    weights.mkdir()
    mlx = sources / "tiny-mlx"
    lay_out_repo(hf_home, MLX_REPO, {f.name: f for f in sorted(mlx.iterdir()) if f.is_file()})
    lay_out_repo(hf_home, GGUF_REPO, {n: sources / n for n in ("tiny-Q8_0.gguf", "tiny-F16.gguf")})
    index = json.loads((mlx / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    partial = {f.name: f for f in sorted(mlx.iterdir()) if f.is_file() and f.name != shards[-1]}
    if len(shards) == 1:  # one shard: point the index at a second one that is not there
        fake = tmp_path / "index.json"
        index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
        fake.write_text(json.dumps(index))
        partial = {**{f.name: f for f in sorted(mlx.iterdir()) if f.is_file()}, "model.safetensors.index.json": fake}
    lay_out_repo(hf_home, PARTIAL_REPO, partial)
    return {"hf": hf_home, "weights": weights, "tmp": tmp_path, "sources": sources}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def env_for(home, *, offline: bool, endpoint: str | None = None, token: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "FORCE_COLOR", "NO_COLOR")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(home["hf"]), LLAMA_MLX_HOME=str(home["weights"]), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               HF_ENDPOINT=endpoint or f"http://127.0.0.1:{closed_port()}")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if token:
        env["HF_TOKEN"] = token
    return env


def py(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=Path(env["LLAMA_MLX_HOME"]).parent)


def cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=Path(env["LLAMA_MLX_HOME"]).parent)


def one_error_line(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


RESOLVE = "from llama_mlx.loading import resolve_model; import sys; print(resolve_model(sys.argv[1] if len(sys.argv) > 1 else {!r}))"


def resolve(model: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return py(RESOLVE.format(model), env, **kw)


def resolve_all(models: list[str], env: dict, **kw) -> list[Path]:
    """Resolve several ids in one fresh process (huggingface_hub reads its environment once, at import)."""
    r = py(f"from llama_mlx.loading import resolve_model\nfor m in {models!r}: print(resolve_model(m))", env, **kw)
    assert r.returncode == 0, r.stderr
    return [Path(line) for line in r.stdout.splitlines()]


def snapshot_of(home, repo_id: str) -> Path:
    repo = home["hf"] / "hub" / ("models--" + repo_id.replace("/", "--"))
    return repo / "snapshots" / (repo / "refs" / "main").read_text()


# --------------------------------------------------------------------------------------------
# A loopback server answering as the hub does


class FakeHub:
    """Answers every request with one status and headers; records method, path and Authorization."""

    def __init__(self, status: int, headers: dict[str, str]):
        self.seen: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                hub.seen.append((self.command, self.path, self.headers.get("Authorization")))
                body = json.dumps({"error": headers.get("X-Error-Message", "no")}).encode()
                self.send_response(status)
                for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub():
    hubs = []

    def make(status, headers):
        hubs.append(FakeHub(status, headers))
        return hubs[-1]

    yield make
    for h in hubs:
        h.close()


# --------------------------------------------------------------------------------------------
# Resolution


def test_offline_resolves_the_cached_snapshot_and_loads_it(home):
    env = env_for(home, offline=True)
    # The model loaded through the hub id computes what mlx-lm computes from the original folder.
    code = f"""
import json, mlx.core as mx, numpy as np, llama_mlx
from llama_mlx.loading import resolve_model
from mlx_lm import load as mlx_lm_load
print(resolve_model({MLX_REPO!r}))
model, tok = llama_mlx.load({MLX_REPO!r}, dtype="float32")
ref, _ = mlx_lm_load({str(home['sources'] / 'tiny-mlx')!r})
ids = mx.array([[1, 5, 9, 77, 200, 3]])
a = np.array(model(ids).astype(mx.float32)); b = np.array(ref(ids).astype(mx.float32))
print(json.dumps({{"diff": float(np.abs(a - b).max()), "scale": float(np.abs(b).max()), "vocab": tok.vocab_size}}))
"""
    r = py(code, env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.splitlines()[0]) == snapshot_of(home, MLX_REPO)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["scale"] > 0 and out["diff"] <= 1e-4 * out["scale"], out


def test_a_complete_snapshot_resolves_without_any_network_call(home, fake_hub):
    # Not offline, hub "reachable": a recording server that would fail every request. None arrives.
    hub = fake_hub(500, {})
    env = env_for(home, offline=False, endpoint=hub.url)
    assert resolve_all([MLX_REPO, GGUF_REPO + ":Q8_0"], env) == [snapshot_of(home, MLX_REPO),
                                                                 snapshot_of(home, GGUF_REPO) / "tiny-Q8_0.gguf"]
    assert hub.seen == []
    # And with the endpoint on a closed loopback port (an mlx-lm user on a plane).
    r = resolve(MLX_REPO, env_for(home, offline=False))
    assert r.returncode == 0 and Path(r.stdout.strip()) == snapshot_of(home, MLX_REPO), r.stderr


def test_a_local_name_wins_over_a_hub_id_spelled_alike(home, fake_hub):
    hub = fake_hub(500, {})
    local = home["weights"] / "test-org" / "tiny-mlx"
    local.mkdir(parents=True)
    r = resolve(MLX_REPO, env_for(home, offline=False, endpoint=hub.url))
    assert r.returncode == 0 and Path(r.stdout.strip()) == local, r.stderr
    assert hub.seen == []


def test_missing_id_offline_is_one_named_line(home):
    env = env_for(home, offline=True)
    r = py("from llama_mlx.loading import resolve_model\ntry:\n resolve_model('test-org/absent')\n"
           "except Exception as e:\n print(type(e).__name__, [c.__name__ for c in type(e).__mro__], str(e))", env)
    assert "HubError" in r.stdout and "ModelNotFoundError" in r.stdout and "test-org/absent" in r.stdout, r
    for cmd in (["info"], ["generate", "hi"]):
        one_error_line(cli(*cmd, "--model", "test-org/absent", env=env), "test-org/absent", "HF_HUB_OFFLINE",
                       "not in the Hugging Face cache")


def test_unreachable_hub_is_one_named_line_within_seconds(home):
    env = env_for(home, offline=False)  # a closed loopback port
    for model in ("test-org/absent", PARTIAL_REPO):  # the partial snapshot is not used as if complete
        start = time.perf_counter()
        r = cli("info", "--model", model, env=env)
        elapsed = time.perf_counter() - start
        one_error_line(r, model, "cannot reach the Hugging Face hub", env["HF_ENDPOINT"])
        assert elapsed < 10, elapsed


def test_gated_repo_is_explained_in_one_line(home, fake_hub):
    hub = fake_hub(401, {"X-Error-Code": "GatedRepo",
                         "X-Error-Message": "Access to model test-org/gated is restricted. You must have access "
                                            "to it and be authenticated to access it. Please log in."})
    line = one_error_line(cli("info", "--model", "test-org/gated", env=env_for(home, offline=False, endpoint=hub.url)),
                          "test-org/gated", "gated", "accept its licence", f"{hub.url}/test-org/gated",
                          "set HF_TOKEN")
    assert "settings/tokens" in line
    # HF_TOKEN reaches the hub, and the line then says the account lacks access.
    one_error_line(cli("info", "--model", "test-org/gated",
                       env=env_for(home, offline=False, endpoint=hub.url, token="hf_testtoken123")),
                   "test-org/gated", "accept its licence", "HF_TOKEN")
    assert ("Bearer hf_testtoken123") in {auth for _, _, auth in hub.seen}
    assert all(path.startswith("/api/models/test-org/gated") for _, path, _ in hub.seen), hub.seen


def test_missing_repo_on_the_hub_is_one_line(home, fake_hub):
    hub = fake_hub(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
    one_error_line(cli("info", "--model", "test-org/nothing", env=env_for(home, offline=False, endpoint=hub.url)),
                   "test-org/nothing", "no such model on the Hugging Face hub")


def test_gguf_quant_tags_select_one_file_and_list_the_choices(home):
    env = env_for(home, offline=True)
    snap = snapshot_of(home, GGUF_REPO)
    # One process: the three tags, the gguf_file argument, and the chosen file loading (the GGUF the test wrote).
    r = py(f"""import llama_mlx
from llama_mlx.loading import resolve_model
for m in {[GGUF_REPO + ":Q8_0", GGUF_REPO + ":f16", GGUF_REPO + ":tiny-F16.gguf"]!r}: print(resolve_model(m))
print(resolve_model({GGUF_REPO!r}, gguf_file='tiny-Q8_0.gguf'))
m, t = llama_mlx.load({GGUF_REPO + ':Q8_0'!r}); print(m.args.hidden_size)""", env)
    assert r.returncode == 0, r.stderr
    *paths, hidden = r.stdout.splitlines()
    assert [Path(p) for p in paths] == [snap / "tiny-Q8_0.gguf", snap / "tiny-F16.gguf", snap / "tiny-F16.gguf",
                                        snap / "tiny-Q8_0.gguf"]
    assert hidden == str(TINY_PARAMS["dim"])
    one_error_line(cli("info", "--model", GGUF_REPO, env=env), GGUF_REPO, "2 .gguf files match",
                   "F16 (tiny-F16.gguf)", "Q8_0 (tiny-Q8_0.gguf)", f"{GGUF_REPO}:TAG")
    one_error_line(cli("info", "--model", GGUF_REPO + ":Q4_K_M", env=env), "no .gguf file matches 'Q4_K_M'",
                   "F16 (tiny-F16.gguf)", "Q8_0 (tiny-Q8_0.gguf)")


def test_file_selection_on_published_repo_listings():
    from llama_mlx.hub import parse_hub_id, select_files

    bartowski = ["README.md", ".gitattributes"] + [f"Llama-3.2-1B-Instruct-{q}.gguf" for q in
                                                   ("Q4_K_M", "Q4_K_S", "Q4_K_L", "Q8_0", "f16", "IQ4_XS")]
    assert select_files("b/x", bartowski, "Q4_K_M") == ("gguf", ["Llama-3.2-1B-Instruct-Q4_K_M.gguf"])
    assert select_files("b/x", bartowski, "iq4_xs") == ("gguf", ["Llama-3.2-1B-Instruct-IQ4_XS.gguf"])
    with pytest.raises(Exception, match=r"no \.gguf file matches 'Q4_K'.*Q4_K_L.*Q4_K_M.*Q4_K_S"):
        select_files("b/x", bartowski, "Q4_K")
    # An mlx-community repo: weights, index, configs and tokenizer files; nothing else.
    mlx_repo = ["README.md", ".gitattributes", "config.json", "model.safetensors", "model.safetensors.index.json",
                "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    assert select_files("m/x", mlx_repo) == ("safetensors", sorted(set(mlx_repo) - {"README.md", ".gitattributes"}))
    # meta-llama's: Meta's original/ checkpoint is not fetched.
    meta_repo = ["config.json", "generation_config.json", "model.safetensors", "original/consolidated.00.pth",
                 "original/params.json", "original/tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "LICENSE.txt", "USE_POLICY.md"]
    assert select_files("meta/x", meta_repo)[1] == ["config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json", "tokenizer_config.json"]
    assert parse_hub_id("org/name:Q4_K_M").quant == "Q4_K_M"
    for not_an_id in ("./org/name", "/abs/path", "org/name/extra", "model.gguf", "dir/model.gguf", "../x", "org/.."):
        assert parse_hub_id(not_an_id) is None, not_an_id


# --------------------------------------------------------------------------------------------
# pull / list / rm


def test_pull_list_rm(home):
    env = env_for(home, offline=True)
    r = cli("pull", MLX_REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert str(snapshot_of(home, MLX_REPO)) in r.stdout and f"--model {MLX_REPO}" in r.stdout
    assert r.stderr == ""  # not a terminal: no progress bars, no notes
    r = cli("pull", GGUF_REPO, "--gguf-file", "tiny-F16.gguf", "--convert", env=env)
    assert r.returncode == 0, r.stderr
    converted = home["weights"] / "tiny-F16"
    assert (converted / "config.json").is_file() and "--model tiny-F16" in r.stdout

    r = cli("list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    assert entries["tiny-F16"]["place"] == "weights" and entries["tiny-F16"]["layout"] == "mlx"
    assert entries["tiny-F16"]["size_bytes"] == sum(f.stat().st_size for f in converted.iterdir())
    assert entries[MLX_REPO]["place"] == "hf-cache" and entries[MLX_REPO]["layout"] == "mlx"
    assert entries[MLX_REPO]["quantization"] == "4-bit g64"
    assert entries[GGUF_REPO]["layout"] == "gguf" and entries[GGUF_REPO]["quantization"] == "F16, Q8_0"
    for repo in (MLX_REPO, GGUF_REPO, PARTIAL_REPO):
        assert entries[repo]["size_bytes"] == blob_bytes(home["hf"], repo), repo
    r = cli("list", env=env)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
    assert "weights" in rows["tiny-F16"] and "HF cache" in rows[GGUF_REPO] and "KiB" in rows[MLX_REPO]

    # rm: refuses without --yes off a terminal; deletes only the named repo with it.
    gguf_repo = home["hf"] / "hub" / "models--test-org--tiny-GGUF"
    one_error_line(cli("rm", GGUF_REPO, env=env), GGUF_REPO, "--yes")
    assert gguf_repo.is_dir()
    r = cli("rm", GGUF_REPO, "--yes", env=env)
    assert r.returncode == 0, r.stderr
    assert not gguf_repo.exists() and snapshot_of(home, MLX_REPO).is_dir() and converted.is_dir()
    r = cli("rm", "tiny-F16", "--yes", env=env)
    assert r.returncode == 0 and not converted.exists(), r.stderr
    names = {e["name"] for e in json.loads(cli("list", "--json", env=env).stdout)}
    assert names == {MLX_REPO, PARTIAL_REPO}


def test_rm_refuses_anything_outside_the_two_places(home, sources):
    env = env_for(home, offline=True)
    outside = home["tmp"] / "outside-model"
    outside.mkdir()
    (outside / "tiny.gguf").write_bytes((sources / "tiny-Q8_0.gguf").read_bytes())
    (home["weights"] / "linked").symlink_to(outside, target_is_directory=True)
    inner = home["weights"] / "real"
    inner.mkdir()
    (inner / "tiny.gguf").write_bytes((sources / "tiny-F16.gguf").read_bytes())
    refusals = ((str(outside), ["outside the weights folder"]), ("../outside-model", ["'..'"]),
                ("linked", ["link to", "outside the weights folder"]),
                (str(home["weights"]), ["the weights folder itself"]),
                (str(outside / "tiny.gguf"), ["outside the weights folder"]),
                ("no-such-model", ["no-such-model", "no such model"]))
    # The CLI's refusal is one error line; the library refuses the rest alike (one process for all of them).
    one_error_line(cli("rm", refusals[0][0], "--yes", env=env), *refusals[0][1])
    r = py(f"""import json
from llama_mlx.errors import LlamaMLXError
from llama_mlx.store import remove_model
out = []
for name in {[name for name, _ in refusals]!r}:
    try:
        remove_model(name)
        out.append(None)
    except LlamaMLXError as e:
        out.append(str(e))
print(json.dumps(out))""", env)
    assert r.returncode == 0, r.stderr
    for (name, words), message in zip(refusals, json.loads(r.stdout)):
        assert message is not None and all(w in message for w in words), (name, message)
    assert (outside / "tiny.gguf").is_file() and (home["weights"] / "linked").is_symlink() and inner.is_dir()
    r = cli("rm", str(inner), "--yes", env=env)  # a path inside the weights folder is fine
    assert r.returncode == 0 and not inner.exists(), r.stderr


def test_every_command_takes_a_hub_id(home):
    env = env_for(home, offline=True)
    r = cli("convert", GGUF_REPO + ":Q8_0", env=env)
    assert r.returncode == 0, r.stderr
    out = home["weights"] / "tiny-GGUF-Q8_0"
    assert (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["converted_from"]["path"] == \
        str((snapshot_of(home, GGUF_REPO) / "tiny-Q8_0.gguf").resolve())  # the file the snapshot link names
    r = cli("info", "--model", MLX_REPO, env=env)
    assert r.returncode == 0 and "128" in r.stdout, r.stderr  # the random model's hidden size
    r = cli("generate", "--model", GGUF_REPO + ":F16", "--max-tokens", "3", "hello", env=env)
    assert r.returncode == 0, r.stderr


class FakeRepoHub:
    """The hub endpoints huggingface_hub uses to download (model info, tree, resolve), serving given repos."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.seen: list[tuple[str, str]] = []
        commits = {r: hashlib.sha1(r.encode() + b"remote").hexdigest() for r in repos}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def send(self, status, body=b"", headers=None):
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def answer(self):
                path = self.path.split("?")[0]
                hub.seen.append((self.command, path))
                for repo, files in repos.items():
                    commit = commits[repo]
                    if path in (f"/api/models/{repo}", f"/api/models/{repo}/revision/main"):
                        info = {"id": repo, "modelId": repo, "sha": commit,
                                "siblings": [{"rfilename": n} for n in files]}
                        return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                    if path.startswith(f"/api/models/{repo}/tree/"):
                        tree = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                for n, b in files.items()]
                        return self.send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                    for rev in ("main", commit):
                        prefix = f"/{repo}/resolve/{rev}/"
                        if path.startswith(prefix) and path[len(prefix):] in files:
                            data = files[path[len(prefix):]]
                            return self.send(200, data, {"X-Repo-Commit": commit,
                                                         "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                                         "Content-Type": "application/octet-stream"})
                self.send(404, b"{}", {"X-Error-Code": "RepoNotFound"})

            do_GET = do_HEAD = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def downloaded(self, repo: str) -> set[str]:
        return {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in self.seen
                if m == "GET" and p.startswith(f"/{repo}/resolve/")}


def test_pull_downloads_only_what_the_layout_needs(tmp_path, sources):
    mlx = sources / "tiny-mlx"
    needed = {f.name: f.read_bytes() for f in mlx.iterdir() if f.is_file()}
    extra = {"README.md": b"# tiny\n", ".gitattributes": b"*.safetensors filter=lfs\n",
             "original/consolidated.00.pth": b"not fetched", "pytorch_model.bin": b"not fetched either"}
    gguf = {"tiny-Q8_0.gguf": (sources / "tiny-Q8_0.gguf").read_bytes(),
            "tiny-F16.gguf": (sources / "tiny-F16.gguf").read_bytes(), "README.md": b"# gguf\n"}
    hub = FakeRepoHub({"remote/tiny": {**needed, **extra}, "remote/tiny-GGUF": gguf})
    try:
        home = {"hf": tmp_path / "hf", "weights": tmp_path / "weights", "tmp": tmp_path}
        home["weights"].mkdir()
        env = env_for(home, offline=False, endpoint=hub.url)
        r = cli("pull", "remote/tiny", env=env)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""  # a pipe: no progress bars
        assert hub.downloaded("remote/tiny") == set(needed)
        snap = snapshot_of(home, "remote/tiny")
        assert {p.name for p in snap.iterdir()} == set(needed)
        assert all((snap / n).read_bytes() == b for n, b in needed.items())
        r = cli("pull", "remote/tiny-GGUF:Q8_0", env=env)
        assert r.returncode == 0, r.stderr
        assert hub.downloaded("remote/tiny-GGUF") == {"tiny-Q8_0.gguf"}
        one_error_line(cli("pull", "remote/tiny-GGUF", env=env), "2 .gguf files match", "F16 (tiny-F16.gguf)")
        # Now cached: resolved with the hub gone, and not asked again when it is there.
        env_gone = env_for(home, offline=False)
        assert resolve_all(["remote/tiny", "remote/tiny-GGUF:Q8_0"], env_gone) == [
            snap, snapshot_of(home, "remote/tiny-GGUF") / "tiny-Q8_0.gguf"]
        before = len(hub.seen)
        r = cli("info", "--model", "remote/tiny", env=env)
        assert r.returncode == 0 and len(hub.seen) == before, (r.stderr, hub.seen[before:])
    finally:
        hub.server.shutdown()
        hub.server.server_close()


def test_progress_bars_are_off_unless_the_caller_turns_them_on():
    from huggingface_hub.utils import are_progress_bars_disabled

    from llama_mlx import hub

    assert not are_progress_bars_disabled()
    hub.show_progress(False)
    with hub._progress_bars():
        assert are_progress_bars_disabled()
    assert not are_progress_bars_disabled()
    hub.show_progress(True)
    try:
        with hub._progress_bars():
            assert not are_progress_bars_disabled()
    finally:
        hub.show_progress(False)
