"""A package index on 127.0.0.1 for the default model's fetch: PyPI's JSON API and its files, served
by http.server from a thread (no tests here; test_default_fetch and test_convert use it).

Each route is a path -> Route; unknown paths answer 404, as PyPI does. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from llama_mlx import resolve

WHEEL_PATH = "/packages/" + resolve.DEFAULT_WHEEL["filename"]


@dataclass
class Route:
    body: bytes
    status: int = 200
    content_type: str = "application/octet-stream"
    length: int | None = -1  # Content-Length: -1 the body's, None none (the end is the connection's close)
    send: int | None = None  # bytes actually sent (fewer: the connection closes early)


class LocalIndex:
    """`with LocalIndex() as index:` serves index.routes at index.url until the block ends."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                index.requests.append(self.path)
                route = index.routes.get(self.path) or Route(b"", status=404)
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                if route.length is not None:
                    self.send_header("Content-Length", str(len(route.body) if route.length < 0 else route.length))
                self.end_headers()
                body = route.body if route.send is None else route.body[: route.send]
                try:
                    for i in range(0, len(body), 1 << 20):
                        self.wfile.write(body[i:i + (1 << 20)])
                except (BrokenPipeError, ConnectionResetError):  # the client refused it: fine
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "LocalIndex":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def publish(self, wheel: bytes, *, listed_sha256: str | None = None, project_page: bool = False,
                wheel_route: Route | None = None) -> None:
        """The pinned release's JSON (the release's own page, or only the project's when
        project_page, as some mirrors serve) listing `wheel`, and the wheel itself."""
        entry = {"filename": resolve.DEFAULT_WHEEL["filename"], "packagetype": "bdist_wheel",
                 "url": self.url + WHEEL_PATH, "size": len(wheel),
                 "digests": {"sha256": listed_sha256 or hashlib.sha256(wheel).hexdigest()}}
        name, version = resolve.DEFAULT_WHEEL["name"], resolve.DEFAULT_WHEEL["version"]
        sdist = {**entry, "filename": f"{name}-{version}.tar.gz", "packagetype": "sdist"}
        if project_page:
            page = {"info": {"name": name}, "releases": {"0.1": [], version: [sdist, entry]}}
            self.routes[f"/pypi/{name}/json"] = Route(json.dumps(page).encode(), content_type="application/json")
        else:
            page = {"info": {"name": name, "version": version}, "urls": [sdist, entry]}
            self.routes[f"/pypi/{name}/{version}/json"] = Route(json.dumps(page).encode(),
                                                                content_type="application/json")
        self.routes[WHEEL_PATH] = wheel_route or Route(wheel)


def make_wheel(gguf: Path) -> bytes:
    """A wheel holding `gguf` where the pinned wheel holds its GGUF."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(gguf, resolve.DEFAULT_WHEEL["member"])
    return buf.getvalue()


def pin(monkeypatch, wheel: bytes, gguf: Path | None = None) -> None:
    """Pin `wheel` (and the GGUF inside it) in place of the real ones, for this test."""
    monkeypatch.setitem(resolve.DEFAULT_WHEEL, "sha256", hashlib.sha256(wheel).hexdigest())
    monkeypatch.setitem(resolve.DEFAULT_WHEEL, "size", len(wheel))
    if gguf is not None:
        monkeypatch.setitem(resolve.DEFAULT_WHEEL, "member_sha256", hashlib.sha256(gguf.read_bytes()).hexdigest())
