"""Image prompts for GRPO with a vision-language policy (Qwen2(.5)-VL).

TRL's ``GRPOTrainer`` trains a VLM when its ``processing_class`` is a processor (not a bare
tokenizer) and the dataset has an ``images`` column of decoded images: it fills each
``{"type": "image"}`` part of the conversational prompt with the row's next image, renders the
prompt with the processor's chat template (``<|vision_start|><|image_pad|><|vision_end|>`` per
image), and the processor expands each pad to its patch count and gives the model
``pixel_values``/``image_grid_thw`` for generation, the old/reference log-probs and the loss.

What this module adds to that:

* :func:`vl_processor`: the Qwen2.5-VL processor from the policy's tokenizer (its chat template,
  the one SFT encoded with) and the PIL image processor SFT patches images with
  (:func:`training.models.load_image_processor`); the full processor insists on a video
  processor, which needs torchvision (not installable on CPU machines), so it goes without. Its
  tokenizer pads on the left, as TRL pads the prompts (TRL's own ``AutoProcessor`` load does too).
* :func:`image_prompt_tokens`: a prompt's length with its images expanded, from the image headers
  only (the same resizes as SFT: :func:`training.packing.image_token_count`), so
  ``max_prompt_length`` leaves out image prompts as it does text prompts.
* :class:`ImagePrompts`: the dataset transform that loads a row's images from their URIs in the
  run's image store (:func:`training.data.load_image`), downscaled to ``max_pixels`` as SFT does
  (:func:`training.data.fit_pixels`), and puts one image placeholder per image before the text
  of the first user turn (SFT's convention, :func:`training.data.normalize_messages`). Images are
  decoded when a batch asks for them (a small cache: GRPO asks for each prompt
  ``num_generations`` times), never held for the whole dataset.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from octomed_data.errors import ConfigError


def vl_processor(model_path: str | Path, tokenizer: Any) -> Any:
    """A Qwen2.5-VL processor (``ProcessorMixin``: TRL's VLM path) without a video processor."""
    from training.models import image_only_vl_processor_class, load_image_processor

    class ImageOnlyProcessor(image_only_vl_processor_class()):
        """Qwen2.5-VL's processor for images only (no torchvision video processor)."""

        def __call__(self, images=None, text=None, **kwargs):
            # TRL passes one entry per prompt, None for a text prompt of a mixed batch; the
            # processor matches images to the text's image pads in order, so a flat list is the same.
            if isinstance(images, (list, tuple)):
                images = [im for entry in images if entry for im in flatten(entry)] or None
            return super().__call__(images=images, text=text, **kwargs)

        def save_pretrained(self, save_directory, *args, **kwargs):
            # What a checkpoint needs to load again: the policy's tokenizer as it came (its own
            # padding sides) and the image processor (the processor's own save would serialize
            # the missing video processor).
            tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)
            return []

    if not tokenizer.chat_template:
        raise ConfigError(f"the policy's tokenizer at {model_path} has no chat template")
    # TRL left-pads the prompts it generates from, and takes the per-token image types
    # (mm_token_type_ids) from this processor's batch: padded on the other side, they would mark
    # text tokens as an image's (wrong 3-D positions, or a crash once prompt lengths differ).
    left = copy.deepcopy(tokenizer)
    left.padding_side = left.truncation_side = "left"
    return ImageOnlyProcessor(
        image_processor=load_image_processor(model_path),
        tokenizer=left,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


def flatten(entry: Any) -> list[Any]:
    """One prompt's images as a list (TRL gives a list per prompt, or one image)."""
    return [im for im in entry if im is not None] if isinstance(entry, (list, tuple)) else [entry]


def with_placeholders(prompt: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The prompt with ``count`` image parts before the text of its first user turn."""
    out, placed = [], False
    for message in prompt:
        content = message["content"]
        if message["role"] == "user" and not placed:
            text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            message = {**message, "content": [{"type": "image"}] * count + text}
            placed = True
        out.append(message)
    if not placed and count:
        raise ConfigError("an RL image prompt has no user turn to put its images in")
    return out


def token_count(ids: Any) -> int:
    """Tokens of ``apply_chat_template(..., tokenize=True)``: a list of ids, or (transformers 5) a
    ``BatchEncoding`` (a mapping, not a dict) whose ``input_ids`` they are."""
    return len(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def prompt_tokens(tokenizer: Any, prompt: list[dict[str, Any]]) -> int:
    """Tokens of a text prompt rendered with the generation prompt, as the policy sees it."""
    return token_count(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))


def image_prompt_tokens(
    tokenizer: Any, prompt: list[dict[str, Any]], uris: list[str], image_processor: Any, max_pixels: int
) -> int:
    """Tokens of an image prompt once each image is expanded to its patches (headers only).

    Raises :class:`octomed_data.schema.RecordError` (``image_not_found``, ``bad_image``) for an
    image that cannot be read.
    """
    from training.packing import image_size, image_token_count

    n = prompt_tokens(tokenizer, with_placeholders(prompt, len(uris)))
    for uri in uris:
        n += image_token_count(*image_size({"path": uri, "bytes": None}), image_processor, max_pixels) - 1
    return n


class ImagePrompts:
    """``Dataset.with_transform``: image URIs -> decoded RGB images (``images``) and the prompt
    with its image placeholders; text rows come out as they are (empty ``images``)."""

    def __init__(self, max_pixels: int, cache_size: int = 64) -> None:
        self.max_pixels = max_pixels
        self.cache_size = cache_size
        self.cache: OrderedDict[str, Any] = OrderedDict()  # GRPO asks for a prompt num_generations times

    def image(self, uri: str) -> Any:
        from training.data import fit_pixels, load_image

        if uri in self.cache:
            self.cache.move_to_end(uri)
            return self.cache[uri]
        image = fit_pixels(load_image({"bytes": None, "path": uri}), self.max_pixels)
        self.cache[uri] = image
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return image

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out = dict(batch)
        uris = batch["images"]
        out["images"] = [[self.image(u) for u in row] for row in uris]
        out["prompt"] = [
            with_placeholders(p, len(row)) if row else p for p, row in zip(batch["prompt"], uris, strict=True)
        ]
        return out
