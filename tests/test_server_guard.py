"""The server answers only its own callers, not any web page (DNS rebinding, cross-site POSTs; the class of
ollama's CVE-2024-28224): `llama-mlx serve` as a real process on a free loopback port, the hostile requests
sent with `http.client` so that every header is exactly the one written, the friendly ones by the official
`openai` and `anthropic` clients."""

import http.client
import json
import socket
import subprocess

import anthropic
import openai
import pytest
from test_server import CLI, Server

from llama_mlx.server import RequestGuard

ALLOWED = "https://app.example"
NAME = "tiny"  # tiny_meta_checkpoint's folder: the guard, not a model's text, is tested
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_meta_checkpoint):
    s = Server(tmp_path_factory.mktemp("guard"), "--allowed-hosts", "mybox.lan, other.test",
               "--allowed-origins", ALLOWED, "--max-concurrency", "1", model=tiny_meta_checkpoint)
    yield s
    s.stop()


def send(server, method, path, headers, body: bytes = b""):
    """(status, headers, JSON body) of one request whose headers (Host included) are exactly `headers`."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body or method == "POST":
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        data, headers = r.read(), {k.lower(): v for k, v in r.getheaders()}
        return r.status, headers, json.loads(data) if headers.get("content-type") == "application/json" else data
    finally:
        conn.close()


def host(server, name="127.0.0.1"):
    return {"Host": f"{name}:{server.port}"}


def post_chat(server, headers, body=json.dumps(CHAT).encode(), path="/v1/chat/completions"):
    return send(server, "POST", path, headers, body)


JSON = {"Content-Type": "application/json"}


def test_a_foreign_host_is_refused(server):
    """A page of evil.example whose name now resolves to 127.0.0.1 sends its own name as Host."""
    for name in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "mybox.lan.evil.example"):
        for method, path in (("GET", "/health"), ("GET", "/v1/models")):
            status, _, body = send(server, method, path, host(server, name))
            assert status == 403 and body["error"]["code"] == "host_not_allowed", (name, path)
        status, _, body = post_chat(server, {**host(server, name), **JSON})
        assert status == 403 and name in body["error"]["message"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:  # HTTP/1.0 needs no Host
        raw.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert raw.makefile("rb").readline().split()[1] == b"403"
    assert send(server, "GET", "/health", {"Host": "evil.example"})[0] == 403  # no port either


def test_loopback_and_allowed_hosts_are_answered(server):
    for name in ("127.0.0.1", "localhost", "LOCALHOST", "[::1]", "mybox.lan", "other.test"):
        status, _, body = send(server, "GET", "/health", host(server, name))
        assert (status, body) == (200, {"status": "ok"}), name
    assert send(server, "GET", "/health", {"Host": "localhost"})[0] == 200  # any port, or none
    status, _, body = post_chat(server, {**host(server, "mybox.lan"), **JSON})
    assert status == 200 and body["usage"]["completion_tokens"] == 1


def test_a_foreign_origin_is_refused_on_get_and_post(server):
    for origin in ("http://evil.example", "null", "http://localhost.evil.example", "http://127.0.0.1@evil.example",
                   "https://app.example.evil"):
        status, headers, body = send(server, "GET", "/v1/models", {**host(server), "Origin": origin})
        assert status == 403 and body["error"]["code"] == "origin_not_allowed", origin
        assert "access-control-allow-origin" not in headers
        status, _, body = post_chat(server, {**host(server), **JSON, "Origin": origin})
        assert status == 403 and body["error"]["code"] == "origin_not_allowed", origin
        status, headers, _ = send(server, "OPTIONS", "/v1/chat/completions", {
            **host(server), "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert status == 403 and "access-control-allow-origin" not in headers  # preflight too


def test_loopback_and_allowed_origins_are_answered(server):
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "https://[::1]", ALLOWED):
        status, _, body = post_chat(server, {**host(server), **JSON, "Origin": origin})
        assert status == 200 and body["object"] == "chat.completion", origin
    status, headers, _ = send(server, "OPTIONS", "/v1/chat/completions", {
        **host(server), "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in headers["access-control-allow-methods"]


@pytest.mark.parametrize("content_type", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", None])
def test_posts_that_are_not_json_are_refused(server, content_type):
    """What a form or a no-preflight fetch can send; the body itself is valid JSON all the same."""
    headers = host(server) if content_type is None else {**host(server), "Content-Type": content_type}
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, _, body = post_chat(server, headers, path=path)
        assert status == 415 and body["error"]["code"] == "unsupported_media_type", (content_type, path)
    status, _, body = post_chat(server, headers, path="/v1/messages")
    assert status == 415 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


def test_json_with_a_charset_is_answered(server):
    status, _, body = post_chat(server, {**host(server), "Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200 and body["usage"]["completion_tokens"] == 1


def test_anthropic_shaped_refusal_on_messages(server):
    status, _, body = post_chat(server, {**host(server, "evil.example"), **JSON}, path="/v1/messages")
    assert status == 403 and body["type"] == "error" and body["error"]["type"] == "permission_error"


def test_the_official_clients_still_work(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = oai.chat.completions.create(model=NAME, messages=CHAT["messages"], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert oai.completions.create(model=NAME, prompt="Hello", max_tokens=2).usage.completion_tokens >= 1
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    m = client.messages.create(model=NAME, max_tokens=2, messages=CHAT["messages"])
    assert m.type == "message" and m.usage.output_tokens >= 1
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0,
                        default_headers={"Origin": "http://evil.example"})
    with pytest.raises(openai.PermissionDeniedError):
        bad.models.list()


def test_hosts_a_bind_admits():
    """Which Host headers a bind answers: a wildcard bind any IP address (no rebinding name is one), a named
    address its own name too; names only when loopback or allowed, '*' anything."""
    wildcard = RequestGuard(None, host="0.0.0.0")
    assert wildcard.host_allowed("192.168.1.5:8080") and wildcard.host_allowed("[fe80::1]:80")
    assert not wildcard.host_allowed("mybox.lan:8080") and not wildcard.host_allowed("evil.example")
    named = RequestGuard(None, host="mybox.lan", allowed_hosts=["alias.lan"])
    assert named.host_allowed("MyBox.lan:8080") and named.host_allowed("alias.lan") and named.host_allowed("localhost")
    assert not named.host_allowed("192.168.1.5") and not named.host_allowed("evil.example")
    assert RequestGuard(None, allowed_hosts=["*"]).host_allowed("anything.example:1")
    for malformed in ("", "evil.example:80:80", "[::1", "localhost:8x", "a b"):
        assert not RequestGuard(None).host_allowed(malformed), malformed


def test_a_malformed_allowed_host_is_one_line_on_stderr():
    proc = subprocess.run([str(CLI), "serve", "--allowed-hosts", "mybox.lan,http://evil.example/"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "'http://evil.example/' is not a host name" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
