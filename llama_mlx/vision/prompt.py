"""Prompts with images: where each image's `<|image|>` token goes, and attaching the images a
prompt cache does not hold yet. One image per message, as Llama 3.2 Vision was trained."""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import ImageError
from .processor import ImageProcessor

__all__ = ["attach_new_images", "image_prompt_ids", "sees_images"]


def sees_images(model: Any) -> bool:
    """Whether `model` takes images (Llama 3.2 Vision) rather than text alone."""
    return hasattr(model, "attach_images")


def _image_token_id(model: Any) -> int:
    return int(model.config.image_token_index)


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_url", "input_image")


def _with_images(messages: list, count: int) -> list[dict]:
    """Messages whose image parts are `{"type": "image"}` (what the chat template renders as
    `<|image|>`); with none given, the images go first in the last user message."""
    out, found = [], 0
    for m in messages:
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            parts = [{"type": "image"} if _is_image_part(p) else p for p in content]
            n = sum(1 for p in parts if _is_image_part(p))
            if n > 1:
                raise ImageError(f"a {m.get('role', 'user')!r} message holds {n} images: one image per message "
                                 "(Llama 3.2 Vision was trained so)")
            found += n
            m["content"] = parts
        out.append(m)
    if found == 0 and count:
        if count > 1:
            raise ImageError(f"{count} images for one message: one image per message (Llama 3.2 Vision was "
                             "trained so); put each in its own message")
        users = [i for i, m in enumerate(out) if m.get("role") == "user"]
        if not users:
            raise ImageError("an image needs a user message to go with")
        m = out[users[-1]]
        text = m.get("content")
        m["content"] = [{"type": "image"}] + ([{"type": "text", "text": text}] if isinstance(text, str) else
                                              list(text or []))
        found = 1
    if found != count:
        raise ImageError(f"the messages hold {found} image(s) but {count} were given")
    return out


def image_prompt_ids(model: Any, tokenizer: Any, prompt: Any, images: Sequence[Any]) -> list[int]:
    """Prompt ids holding one `<|image|>` per image: chat messages (image parts, or the image put in
    the last user message), plain text (the image first, before BOS, as Meta prompts base models)
    or token ids (counted)."""
    if not sees_images(model):
        raise ImageError("this model reads text only: images need a Llama 3.2 Vision model (model_type mllama)")
    images = list(images)
    token = _image_token_id(model)
    if isinstance(prompt, str):
        if len(images) > 1:
            raise ImageError(f"{len(images)} images for one plain-text prompt: one image per message")
        bos = getattr(tokenizer, "add_bos", False) and getattr(tokenizer, "bos_id", None) is not None
        ids = tokenizer.encode(prompt, bos=bos)
        if images and token not in ids:
            ids = [token] + ids  # Meta's layout for a base model: <|image|><|begin_of_text|>text
    else:
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            ids = tokenizer.apply_chat_template(_with_images(prompt, len(images)), add_generation_prompt=True)
        else:
            ids = [int(t) for t in prompt]
    found = ids.count(token)
    if found != len(images):
        raise ImageError(f"the prompt holds {found} image token(s) but {len(images)} image(s) were given")
    return ids


def attach_new_images(model: Any, processor: Any, cache: list, images: Sequence[Any]) -> None:
    """Encode the images of `images` past those `cache` already holds (a conversation's images, in
    order) and attach them: each image is encoded once per conversation."""
    held = next((len(c.spans) for c in cache if hasattr(c, "spans")), None)
    if held is None:
        raise ImageError("this cache has no cross-attention layers: make it with model.make_cache()")
    if held > len(images):
        raise ImageError(f"the cache holds {held} images, the conversation {len(images)}: start a new cache")
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        vision = model.config.vision
        image_processor = ImageProcessor.for_model(vision.image_size, vision.max_num_tiles)
    for image in images[held:]:
        arrays = image_processor([image])
        model.attach_images(cache, arrays["pixel_values"], arrays["aspect_ratio_ids"], arrays["aspect_ratio_mask"])
