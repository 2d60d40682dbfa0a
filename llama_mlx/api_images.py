"""Images in server requests (Llama 3.2 Vision): OpenAI `image_url` and Responses `input_image` parts,
Anthropic `image` blocks, ollama's `images`, decoded with bounds and keyed by a hash of their pixels.

    messages, images = take_images(messages, policy)   # image parts become {"type": "image"}

Data URLs (base64) are always read. http(s) URLs are fetched only when the server runs with
`--allow-image-urls`, file paths (`file://` or a plain path) only with `--allow-image-files DIR`
and only under DIR (symbolic links resolved first, so none leads out). An image is at most
`MAX_IMAGE_BYTES` encoded and `MAX_IMAGE_PIXELS` pixels (a decompression bomb is refused before
it is decoded); anything else is an `ApiError` 400 saying why.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .api_common import ApiError

__all__ = ["MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "ImagePolicy", "ServerImage", "decode_image", "take_images"]

MAX_IMAGE_BYTES = 20 << 20  # an encoded image (the request body bounds a data URL further: --max-body-bytes)
MAX_IMAGE_PIXELS = 50_000_000  # width x height; Llama 3.2 Vision reads at most 4 tiles of 560 x 560 anyway
URL_TIMEOUT = 10.0  # seconds for an http(s) fetch


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from besides data URLs: http(s) (`allow_urls`), files under `files_dir`."""

    allow_urls: bool = False
    files_dir: Optional[Path] = None


@dataclass(frozen=True)
class ServerImage:
    image: Any  # a decoded Pillow image
    key: str  # sha256 of its mode, size and pixels: what the prefix cache tells images apart by


def _bad(message: str) -> ApiError:
    return ApiError(400, message, param="messages", code="invalid_image")


def decode_image(data: bytes, where: str = "the image") -> ServerImage:
    """A `ServerImage` from encoded bytes (PNG, JPEG, ... anything Pillow reads), or ApiError 400."""
    if len(data) > MAX_IMAGE_BYTES:
        raise _bad(f"{where} is {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte limit")
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise _bad(f"{where} is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS}-pixel limit")
            image.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # (Pillow's own check, in open)
        raise _bad(f"{where} has too many pixels, over the {MAX_IMAGE_PIXELS}-pixel limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _bad(f"{where} is not an image Pillow can read ({e.__class__.__name__})") from None
    digest = hashlib.sha256(f"{image.mode} {width}x{height}\n".encode())
    digest.update(image.tobytes())
    return ServerImage(image, digest.hexdigest())


def _from_data_url(url: str, where: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise _bad(f"{where}: a data URL must be base64 (data:image/png;base64,...)")
    return _b64(payload, where)


def _b64(payload: str, where: str) -> bytes:
    if not isinstance(payload, str):
        raise _bad(f"{where}: the image data must be a base64 string")
    if len(payload) > (MAX_IMAGE_BYTES + 2) // 3 * 4 + 4:
        raise _bad(f"{where} is over the {MAX_IMAGE_BYTES}-byte limit")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{where}: the image data is not valid base64") from None


def _from_http(url: str, where: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_urls:
        raise _bad(f"{where}: this server does not fetch image URLs unless it runs with --allow-image-urls; send "
                   "the image inline as a data URL (data:image/png;base64,...)")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "llama-mlx"}),
                                    timeout=URL_TIMEOUT) as response:
            data = response.read(MAX_IMAGE_BYTES + 1)
    except (OSError, ValueError) as e:
        raise _bad(f"{where}: could not fetch {url}: {e}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise _bad(f"{where} is over the {MAX_IMAGE_BYTES}-byte limit")
    return data


def _from_file(name: str, where: str, policy: ImagePolicy) -> bytes:
    if policy.files_dir is None:
        raise _bad(f"{where}: this server reads no image files unless it runs with --allow-image-files DIR (and "
                   "then only under DIR); send the image inline as a data URL (data:image/png;base64,...)")
    root = Path(policy.files_dir).resolve()
    path = Path(name).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()  # links resolved: none leads out
    if not path.is_relative_to(root):
        raise _bad(f"{where}: {name} is outside the folder --allow-image-files allows")
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise _bad(f"{where} is over the {MAX_IMAGE_BYTES}-byte limit")
        return path.read_bytes()
    except OSError:
        raise _bad(f"{where}: {name}: no such image file under the allowed folder") from None


def _url_bytes(url: Any, where: str, policy: ImagePolicy) -> bytes:
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}: the image needs a URL (a data URL: data:image/png;base64,...)")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _from_data_url(url, where)
    if scheme in ("http", "https"):
        return _from_http(url, where, policy)
    if scheme == "file":
        return _from_file(urllib.parse.unquote(urllib.parse.urlparse(url).path), where, policy)
    if len(scheme) > 1:
        raise _bad(f"{where}: image URLs of scheme {scheme!r} are not read (data, http(s) or file)")
    return _from_file(url, where, policy)


def _part_bytes(part: dict, where: str, policy: ImagePolicy) -> bytes:
    kind = part.get("type")
    if kind == "image_url":  # OpenAI chat: {"image_url": {"url": ...}} (or the URL alone)
        url = part.get("image_url")
        return _url_bytes(url.get("url") if isinstance(url, dict) else url, where, policy)
    if kind == "input_image":  # OpenAI Responses: {"image_url": "data:..."}
        if part.get("file_id"):
            raise _bad(f"{where}: uploaded files (file_id) are not kept by this server; send a data URL")
        return _url_bytes(part.get("image_url"), where, policy)
    source = part.get("source")  # Anthropic: {"source": {"type": "base64", "data": ...} or {"type": "url"}}
    if not isinstance(source, dict):
        raise _bad(f"{where}: an image block needs a source ({{type: base64, media_type, data}})")
    if source.get("type") == "base64":
        return _b64(source.get("data"), where)
    if source.get("type") == "url":
        return _url_bytes(source.get("url"), where, policy)
    raise _bad(f"{where}: image sources of type {source.get('type')!r} are not read (base64 or url)")


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image")


def has_images(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(map(is_image_part, m["content"]))
        for m in messages)


def take_images(messages: list, policy: ImagePolicy) -> tuple[list, list[ServerImage]]:
    """Messages whose image parts are `{"type": "image"}` (what a vision chat template renders as
    `<|image|>`), and their images decoded, in order. One image per message: 400 past that."""
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list) or not any(map(is_image_part, content)):
            out.append(m)
            continue
        n = sum(1 for p in content if is_image_part(p))
        if n > 1:
            raise _bad(f"message {i} holds {n} images: one image per message (as Llama 3.2 Vision was trained); "
                       "put each in its own message")
        parts = []
        for p in content:
            if is_image_part(p):
                images.append(decode_image(_part_bytes(p, f"message {i}'s image", policy), f"message {i}'s image"))
                parts.append({"type": "image"})
            else:
                parts.append(p)
        out.append({**m, "content": parts})
    return out, images
