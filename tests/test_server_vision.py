"""Images through `llama-mlx serve` (Llama 3.2 Vision): OpenAI `image_url` data URLs (chat completions and
the Responses API's `input_image`), Anthropic image blocks and ollama's `images`, on one real server process
serving a tiny random mllama folder (tests/mllama_oracle.py) and a tiny text-only model, driven by the
official `openai`, `anthropic` and `ollama` clients. Oracle: `llama_mlx.generate(model, processor,
messages, images=[...])` in-process on the same folder, greedy (itself held to transformers in
test_vision_generate.py)."""

import base64
import io

import httpx2 as httpx
import numpy as np
import ollama
import pytest
from PIL import Image

import llama_mlx
from llama_mlx.api_images import MAX_IMAGE_PIXELS

from mllama_oracle import write_tiny_folder
from test_server import KEY, Server

N = 10
QUESTION = "What is in the picture?"
AUTH = {"Authorization": f"Bearer {KEY}"}


COLOURS = {1: (0, 0, 0), 2: (255, 255, 255), 3: (255, 0, 0), 4: (0, 0, 255), 5: (0, 200, 0)}


def png(seed: int) -> bytes:
    """An image the tiny model answers differently for: 1 and 2 are alike in size (the same prompt tokens)
    but black and white (random noise images all normalise alike, and so get one answer)."""
    size = {3: (120, 20), 4: (20, 120)}.get(seed, (40, 40))
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(COLOURS[seed], dtype=np.uint8)
    pixels[::7, ::5] = 128
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("mllama") / "tiny-vision"
    write_tiny_folder(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "a.png").write_bytes(png(1))
    return folder


@pytest.fixture(scope="module")
def srv(tmp_path_factory, vision_folder, tiny_meta_checkpoint, image_dir):
    s = Server(tmp_path_factory.mktemp("serve-vision"), "--api-key", KEY, "--model", str(tiny_meta_checkpoint),
               "--allow-image-files", str(image_dir), model=vision_folder)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(vision_folder):
    return llama_mlx.load(str(vision_folder))


def expected(local, data: bytes, text: str = QUESTION) -> str:
    model, processor = local
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return llama_mlx.generate(model, processor, messages, N, images=[Image.open(io.BytesIO(data))])


def chat(srv, content, model="tiny-vision", **extra) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", headers=AUTH, timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": N, "temperature": 0,
        **extra})


def test_openai_data_url_and_two_images_in_turn(srv, local):
    oai = srv.openai()
    answers = {}
    for seed in (1, 2, 1, 2):  # the same text, two images: the prefix cache must tell them apart
        data = png(seed)
        r = oai.chat.completions.create(model="tiny-vision", max_tokens=N, temperature=0, messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}},
                                        {"type": "text", "text": QUESTION}]}])
        answers.setdefault(seed, expected(local, data))
        assert r.choices[0].message.content == answers[seed], seed
    assert answers[1] != answers[2]
    # Streamed: the same text.
    stream = oai.chat.completions.create(model="tiny-vision", max_tokens=N, temperature=0, stream=True, messages=[{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(2))}},
                                    {"type": "text", "text": QUESTION}]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answers[2]


def test_responses_input_image(srv, local):
    oai = srv.openai()
    data = png(3)
    r = oai.responses.create(model="tiny-vision", max_output_tokens=N, temperature=0, input=[{
        "role": "user", "content": [{"type": "input_image", "image_url": data_url(data)},
                                    {"type": "input_text", "text": QUESTION}]}])
    assert r.output_text == expected(local, data)


def test_anthropic_image_block(srv, local):
    client = srv.anthropic(timeout=300)
    data = png(4)
    r = client.messages.create(model="tiny-vision", max_tokens=N, extra_body={"temperature": 0}, messages=[{
        "role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(data).decode()}},
            {"type": "text", "text": QUESTION}]}])
    assert r.content[0].text == expected(local, data)


def test_ollama_images(srv, local):
    client = ollama.Client(host=srv.url, headers=AUTH, timeout=300)
    data = png(5)
    options = {"temperature": 0, "num_predict": N}
    r = client.chat(model="tiny-vision", options=options,
                    messages=[{"role": "user", "content": QUESTION, "images": [data]}])
    assert r.message.content == expected(local, data)
    g = client.generate(model="tiny-vision", prompt=QUESTION, images=[data], options=options)
    assert g.response == expected(local, data)


def test_image_files_only_under_the_allowed_folder(srv, local, image_dir, tmp_path):
    r = chat(srv, [{"type": "image_url", "image_url": {"url": str(image_dir / "a.png")}},
                   {"type": "text", "text": QUESTION}])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected(local, png(1))
    outside = tmp_path / "b.png"
    outside.write_bytes(png(1))
    (image_dir / "link.png").symlink_to(outside)
    for url in (str(outside), "file://" + str(outside), "../" + outside.name, "link.png"):
        r = chat(srv, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}])
        assert r.status_code == 400 and "outside the folder" in r.json()["error"]["message"], (url, r.text)


def test_refusals(srv):
    def refused(content, model="tiny-vision") -> str:
        r = chat(srv, content, model=model)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages"
        return err["message"]

    image = {"type": "image_url", "image_url": {"url": data_url(png(1))}}
    text = {"type": "text", "text": QUESTION}
    assert "--allow-image-urls" in refused([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}},
                                            text])
    assert "takes no images" in refused([image, text], model="tiny")
    assert "one image per message" in refused([image, image, text])
    assert "not an image" in refused([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()}}, text])
    assert "not valid base64" in refused([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                                          text])
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 8  # a decompression bomb: a small PNG of too many pixels
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG")
    assert "pixel limit" in refused([{"type": "image_url", "image_url": {"url": data_url(out.getvalue())}}, text])
    # The others' shapes: Anthropic's error on /v1/messages, ollama's on /api/chat.
    r = httpx.post(srv.url + "/v1/messages", headers=AUTH, timeout=60, json={
        "model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(png(1)).decode()}}]}]})
    assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/api/chat", headers=AUTH, timeout=60, json={
        "model": "tiny-vision", "stream": False,
        "messages": [{"role": "user", "content": "x", "images": ["bm90IGFuIGltYWdl"]}]})
    assert r.status_code == 400 and "not an image" in r.json()["error"]


def test_prefix_cache_keys_images_by_content(srv, local):
    """A second turn whose tokens extend a kept cache whole, but whose image differs, must not reuse that
    cache (an image's <|image|> token is the same token for every image); with the same image it does."""
    model, processor = local
    first = chat(srv, [{"type": "image_url", "image_url": {"url": data_url(png(1))}},
                       {"type": "text", "text": QUESTION}]).json()["choices"][0]["message"]["content"]

    def turn(seed: int) -> tuple[str, dict]:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(seed))}},
                                                 {"type": "text", "text": QUESTION}]},
                    {"role": "assistant", "content": first}, {"role": "user", "content": "And the colours?"}]
        r = httpx.post(srv.url + "/v1/chat/completions", headers=AUTH, timeout=300, json={
            "model": "tiny-vision", "messages": messages, "max_tokens": N, "temperature": 0}).json()
        local_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                          messages[1], messages[2]]
        want = llama_mlx.generate(model, processor, local_messages, N,
                                  images=[Image.open(io.BytesIO(png(seed)))])
        assert r["choices"][0]["message"]["content"] == want, seed
        return want, r["usage"]

    other, usage = turn(2)  # the same tokens as the kept conversation, another image
    assert not (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    same, usage = turn(1)  # the kept conversation's own image: its cache is reused
    assert other != same
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_http_urls_fetched_only_when_allowed():
    """`--allow-image-urls`'s path, in-process (api_images): fetched from a loopback http server and
    decoded; refused without the flag; a response over the size bound is refused."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from unittest import mock

    from llama_mlx import api_images
    from llama_mlx.api_common import ApiError

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = png(3) if self.path == "/a.png" else b"x" * 5000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    part = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url + "/a.png"}}]}
    try:
        messages, images = api_images.take_images([part], api_images.ImagePolicy(allow_urls=True))
        assert messages[0]["content"] == [{"type": "image"}]
        assert images[0].key == api_images.decode_image(png(3)).key and images[0].image.size == (120, 20)
        with pytest.raises(ApiError, match="--allow-image-urls"):
            api_images.take_images([part], api_images.ImagePolicy())
        with mock.patch.object(api_images, "MAX_IMAGE_BYTES", 4000), pytest.raises(ApiError, match="limit"):
            api_images.take_images([{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": url + "/big"}}]}], api_images.ImagePolicy(allow_urls=True))
    finally:
        httpd.shutdown()


def test_an_image_over_the_prompt_text_cap_is_still_served(srv, local):
    """The 2 MB cap is on prompt text: an image's base64 has its own bounds (20 MiB, 50 Mpixels)."""
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(out, format="PNG")
    data = out.getvalue()
    assert len(data_url(data)) > 3 << 20
    r = chat(srv, [{"type": "image_url", "image_url": {"url": data_url(data)}}, {"type": "text", "text": QUESTION}])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected(local, data)
