"""Hostile request bodies get a 4xx in their endpoint's own error shape, never a 500, and the server lives
on; streams never carry a non-JSON number; big prompts are refused before any templating, which runs off
the event loop. `llama-mlx serve` as a real process on a free loopback port, requests sent with
`http.client` so that the bytes are exactly the ones written."""

import http.client
import json
import signal
import socket
import threading
import time

import pytest
from test_server import Server

CHAT = "/v1/chat/completions"
NAME = "tiny"  # tiny_meta_checkpoint's folder, served by the module's server
MESSAGES = "/v1/messages"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_meta_checkpoint):
    # The tiny Meta-tokenizer model: hostile bodies and connections, not SmolLM2's text, are tested.
    s = Server(tmp_path_factory.mktemp("hostile-input"), "--max-concurrency", "2", "--max-connections", "8",
               "--header-timeout", "2", model=tiny_meta_checkpoint)
    yield s
    s.stop()


def post(server, path: str, body: bytes | dict, timeout: float = 60):
    """(status, JSON body or raw bytes) of one POST of exactly `body`."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if r.getheader("content-type") == "application/json" else data
    finally:
        conn.close()


def health(server) -> float:
    """Seconds /health took to answer 200."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    return time.monotonic() - started


def chat(**fields) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


def anthropic(**fields) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


def openai_error(status, body, param=None):
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    assert body["error"]["type"] == "invalid_request_error", body
    if param is not None:
        assert body["error"]["param"] == param, body


def anthropic_error(status, body):
    assert 400 <= status < 500, (status, body)
    assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
    assert body["error"]["type"] in ("invalid_request_error", "request_too_large"), body


def _text(obj) -> bytes:
    return json.dumps(obj).encode()


OPENAI_CASES = {
    "deep": b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "5000 digits": b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}",
    "NaN literal": b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
    "Infinity literal": b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "top_p": -Infinity}',
    "overflowing temperature": _text(chat())[:-1] + b', "temperature": 1e999}',
    "overflowing top_p": _text(chat())[:-1] + b', "top_p": 1e999}',
    "overflowing penalty": _text(chat())[:-1] + b', "presence_penalty": -1e999}',
    "seed -1": _text(chat(seed=-1)),
    "seed 2^64": _text(chat(seed=2 ** 64)),
    "logit_bias superscript key": _text(chat(logit_bias={"\u00b2": 1})),
    "logit_bias word key": _text(chat(logit_bias={"one": 1})),
    "logit_bias huge key": _text(chat(logit_bias={"9" * 4000: 1})),
    "malformed tools, required": _text(chat(tools=[{"type": "function", "function": "f"}], tool_choice="required")),
    "nameless tool, required": _text(chat(tools=[{"type": "function", "function": {"parameters": {}}}],
                                          tool_choice="required")),
    "tool parameters not an object": _text(chat(tools=[{"type": "function", "function": {"name": "f",
                                                                                          "parameters": [1]}}])),
    "recursive $ref": _text(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}})),
    "150k stop strings": _text(chat(stop=["a"] * 150_000)),
    "long stop string": _text(chat(stop="a" * 5000)),
}


@pytest.mark.parametrize("case", OPENAI_CASES)
def test_a_hostile_chat_body_is_a_4xx_in_openai_shape(server, case):
    status, body = post(server, CHAT, OPENAI_CASES[case])
    openai_error(status, body)
    assert health(server) < 5


ANTHROPIC_CASES = {
    "deep": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "5000 digits": b'{"max_tokens": ' + b"9" * 5000 + b"}",
    "NaN temperature": _text(anthropic())[:-1] + b', "temperature": NaN}',
    "system text a number": _text(anthropic(system=[{"type": "text", "text": 5}])),
    "system a number": _text(anthropic(system=5)),
    "system block not text": _text(anthropic(system=[{"type": "image", "source": {}}])),
    "tool name a number": _text(anthropic(tools=[{"name": 5, "input_schema": {}}], tool_choice={"type": "any"})),
    "seed 2^64": _text(anthropic(seed=2 ** 64)),
    "stop sequences": _text(anthropic(stop_sequences=["ab"] * 10_000)),
}


@pytest.mark.parametrize("path", [MESSAGES, MESSAGES + "/count_tokens"])
@pytest.mark.parametrize("case", ANTHROPIC_CASES)
def test_a_hostile_messages_body_is_a_4xx_in_anthropic_shape(server, case, path):
    if path.endswith("count_tokens") and case in ("seed 2^64", "stop sequences", "NaN temperature"):
        path = MESSAGES  # (count_tokens reads no sampling fields)
    status, body = post(server, path, ANTHROPIC_CASES[case])
    anthropic_error(status, body)
    assert health(server) < 5


def test_ollama_errors_keep_ollama_shape(server):
    status, body = post(server, "/api/chat", b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert 400 <= status < 500 and set(body) == {"error"} and isinstance(body["error"], str), body
    recursive = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
    for path, req in (("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                                     "format": recursive}),
                      ("/api/generate", {"model": NAME, "prompt": "Hi", "stream": False, "format": recursive}),
                      ("/api/generate", {"model": NAME, "prompt": "x" * (3 << 20), "raw": True, "stream": False}),
                      ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "x" * (3 << 20)}]})):
        status, body = post(server, path, req)
        assert 400 <= status < 500 and set(body) == {"error"} and isinstance(body["error"], str), (path, body)
    assert health(server) < 5


def test_responses_errors_keep_openai_shape(server):
    status, body = post(server, "/v1/responses", {"model": NAME, "input": "x" * (3 << 20)})
    openai_error(status, body)
    status, body = post(server, "/v1/responses", {"model": NAME, "input": "Hi", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}}})
    openai_error(status, body)


def test_json_object_logprobs_stream_only_json_numbers(server):
    """Constrained decoding masks tokens to -inf: their log-probabilities come back as -9999.0, in a
    stream and in a whole answer, never as -Infinity."""
    req = chat(response_format={"type": "json_object"}, logprobs=True, top_logprobs=5, max_tokens=4, temperature=0)
    status, body = post(server, CHAT, req)
    assert status == 200, body
    assert any(t["logprob"] == -9999.0 for c in body["choices"][0]["logprobs"]["content"] for t in c["top_logprobs"])
    status, raw = post(server, CHAT, {**req, "stream": True})
    assert status == 200
    frames = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert frames and b"Infinity" not in raw and b"NaN" not in raw
    for frame in frames:
        json.loads(frame, parse_constant=lambda name: pytest.fail(f"{name} in a stream"))
    status, body = post(server, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 3, "logprobs": 5,
                                                    "response_format": {"type": "json_object"}, "temperature": 0})
    assert status == 200 and "Infinity" not in json.dumps(body), body


def test_a_big_prompt_is_refused_fast_and_templating_leaves_health_alone(server):
    big = chat(messages=[{"role": "user", "content": "x " * (3 << 20)}])  # 6 MB: over the 2 MB cap
    started = time.monotonic()
    status, body = post(server, CHAT, big)
    openai_error(status, body, param="messages")
    assert time.monotonic() - started < 3
    status, body = post(server, CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "description": "d" * (300 << 10)}}]))
    openai_error(status, body, param="tools")
    status, body = post(server, "/v1/completions", {"model": NAME, "prompt": "x" * (3 << 20)})
    openai_error(status, body, param="prompt")

    # Just under the cap: templated and tokenized (then over the context: 400) in a worker thread.
    allowed = chat(messages=[{"role": "user", "content": "hello world " * 160_000}])  # ~1.9 MB
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("r", post(server, CHAT, allowed)))
    worker.start()
    time.sleep(0.1)  # the upload under way (Meta's tokenizer templates it in well under a second here)
    waits = []
    while worker.is_alive():
        waits.append(health(server))
        time.sleep(0.05)
    worker.join()
    openai_error(*done["r"])
    print(f"/health during templating: {len(waits)} answers, slowest {max(waits):.3f} s")
    assert waits and max(waits) < 1.0, waits


def test_idle_connections_over_the_cap_neither_lock_out_nor_last(server):
    """20 clients that connect and send nothing, against --max-connections 8: a request is answered at once
    (503 while they hold the connections), and they are dropped after --header-timeout (2 s)."""
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    try:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 503 and json.loads(r.read())["error"]["code"] == "server_busy"
        conn.close()
        status, body = post(server, "/api/chat", {"model": NAME})  # in ollama's shape there
        assert status == 503 and set(body) == {"error"}, body
        assert time.monotonic() - started < 3
        time.sleep(2.5)
        for s in idle:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the server
        assert health(server) < 1
    finally:
        for s in idle:
            s.close()


# The tiny model's end tokens (<|end_of_text|>, <|eom_id|>, <|eot_id|>) barred: its answers run to max_tokens.
NO_END = {"128001": -100, "128008": -100, "128009": -100}


def _stream_request(port: int, max_tokens: int = 4000) -> socket.socket:
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": max_tokens, "stream": True, "logit_bias": NO_END})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    return sock


def test_sigterm_drains_for_shutdown_timeout_then_cuts_streams(tmp_path, tiny_meta_checkpoint):
    """A client that stops reading does not keep the server alive past --shutdown-timeout; one that reads
    gets a last error event (JSON) when its stream is cut."""
    s = Server(tmp_path, "--shutdown-timeout", "2", model=tiny_meta_checkpoint)
    try:
        stalled, reader = _stream_request(s.port), _stream_request(s.port)
        whole = {}
        long_chat = chat(max_tokens=4000, logit_bias=NO_END)
        waiting = threading.Thread(target=lambda: whole.setdefault("r", post(s, CHAT, long_chat)))
        waiting.start()
        received = bytearray()
        while received.count(b"data: ") < 3:
            received += reader.recv(65536)
        time.sleep(1)  # the stalled client's buffers fill
        started = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        reader.settimeout(10)
        while chunk := reader.recv(65536):
            received += chunk
        s.proc.wait(15)
        waiting.join(5)
        status, body = whole["r"]  # a whole answer cut: a 503 in OpenAI's shape
        assert status == 503 and body["error"]["code"] == "server_shutting_down", (status, body)
        elapsed = time.monotonic() - started
        assert elapsed < 2 + 4, elapsed
        assert s.proc.returncode == 0, s.log_path.read_text()
        frames = [line[6:] for line in received.decode().splitlines() if line.startswith("data: ")]
        print(f"exited {elapsed:.2f} s after SIGTERM; the reader's last frame: {frames[-1][:100]}")
        assert frames[-1] == "[DONE]" or json.loads(frames[-1])["error"]["code"] == "server_shutting_down", frames[-3:]
        assert "Traceback" not in s.log_path.read_text()
        stalled.close()
        reader.close()
    finally:
        s.stop()


def test_a_second_sigint_exits_at_once_in_one_line(tmp_path, tiny_meta_checkpoint):
    s = Server(tmp_path, "--shutdown-timeout", "60", model=tiny_meta_checkpoint)
    try:
        stalled = _stream_request(s.port)
        time.sleep(1)
        s.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert s.proc.poll() is None  # draining (up to 60 s)
        started = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        s.proc.wait(10)
        assert time.monotonic() - started < 5
        assert s.proc.returncode in (0, 130)
        log = s.log_path.read_text()
        assert "Traceback" not in log and "stopped at a second signal" in log, log
        stalled.close()
    finally:
        s.stop()
