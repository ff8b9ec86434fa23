"""Training and generation examples from records (SPEC §4): chat template, targets, label masking.

A record is the recipe's jsonl shape: `{"id", "conversations": [{"images", "user", "assistant"}, …]}`.
Image tags are numbered 1..n across the whole record; a turn whose `user` text carries no tags gets
its images' tags prepended (`<|image_3|><|image_4|>\\n…`). Every turn is its own templated user
message (so it starts again with BOS) followed by its answer; only answers are supervised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from .constants import IGNORE_INDEX, IMAGE_TAG, image_tag
from .processor import Phi3VProcessor, check_tags, crops_per_image

ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"  # appended to every answer, supervised


class SequenceTooLong(ValueError):
    """A templated example is longer than max_length; the caller decides: reject, or truncate earlier turns."""


def chat_prompt(user: str, system: str | None = None) -> str:
    """One user message in the Phi-3 chat format, with the generation prompt."""
    system_part = f"<|system|>\n{system}<|end|>\n" if system else ""
    return f"{system_part}<|user|>\n{user}<|end|>\n<|assistant|>\n"


def user_text_with_tags(user: str, first_tag: int, n_images: int) -> str:
    """Prepend the turn's image tags when the text has none; else check they are the right ones."""
    if IMAGE_TAG.search(user) is None:
        if n_images == 0:
            return user
        tags = "".join(image_tag(k) for k in range(first_tag, first_tag + n_images))
        return f"{tags}\n{user}"
    check_tags(user, n_images, first=first_tag)
    return user


@dataclass
class Example:
    input_ids: np.ndarray  # (T,) int64, −k at image k's placeholder positions
    labels: np.ndarray  # (T,) int64, −100 except on answer tokens
    pixel_values: np.ndarray | None  # (n_images, num_crops+1, 3, 336, 336) float32; None with uint8 crops
    image_sizes: np.ndarray  # (n_images, 2) int64
    pixel_crops: np.ndarray | None = None  # (Σ h·w, 3, 336, 336) uint8 HD crops (build_example(..., crops=True))

    @property
    def num_images(self) -> int:
        return int(self.image_sizes.shape[0])


def build_example(
    processor: Phi3VProcessor,
    conversations: Sequence[dict],
    images: Sequence[Image.Image],
    *,
    max_length: int | None = None,
    overflow: str = "reject",
    system: str | None = None,
    crops: bool = False,
) -> Example:
    """Tokenize every turn, mask prompts, and preprocess the images (given in record order).

    overflow: "reject" raises SequenceTooLong; "truncate" drops the earliest whole turns (with their
    images) until the rest fits. Answers are never cut; if the last turn alone is too long it is rejected.
    crops: carry the images as uint8 HD crops (`pixel_crops`, the Ray Data rows' layout) instead of
    the model's float pixel_values.
    """
    if overflow not in ("reject", "truncate"):
        raise ValueError(f"overflow must be 'reject' or 'truncate', got {overflow!r}")
    n_total = sum(len(turn.get("images") or []) for turn in conversations)
    if n_total != len(images):
        raise ValueError(f"the conversations name {n_total} images but {len(images)} were given")
    image_processor = processor.image_processor
    pixels = image_processor.hd_crops(images) if crops else image_processor.preprocess(images)
    num_tokens = pixels["num_img_tokens"]

    turns = []  # (ids, labels, first image index, n images) per turn
    tag = 1
    for i, turn in enumerate(conversations):
        n = len(turn.get("images") or [])
        user = user_text_with_tags(turn["user"], tag, n)
        prompt = processor.tokenize_prompt(
            chat_prompt(user, system if i == 0 else None), {k: num_tokens[k - 1] for k in range(tag, tag + n)}
        )
        answer = processor.encode_text(f"{turn['assistant']}{ANSWER_SUFFIX}", add_special_tokens=False)
        turns.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, tag - 1, n))
        tag += n

    lengths = [len(t[0]) for t in turns]
    start = 0
    if max_length is not None and sum(lengths) > max_length:
        if overflow == "reject" or lengths[-1] > max_length:
            raise SequenceTooLong(
                f"example has {sum(lengths)} tokens (last turn {lengths[-1]}), max_length is {max_length}"
            )
        while sum(lengths[start:]) > max_length:
            start += 1
    kept = turns[start:]
    first_image = kept[0][2]
    ids = [t for turn in kept for t in turn[0]]
    labels = [t for turn in kept for t in turn[1]]
    if first_image:  # renumber the placeholders of the images that remain
        ids = [t + first_image if t < 0 else t for t in ids]
    sizes = pixels["image_sizes"]
    if crops:
        first_crop = sum(crops_per_image(sizes[:first_image]))
        pixel_values, pixel_crops = None, pixels["pixel_crops"][first_crop:]
    else:
        pixel_values, pixel_crops = pixels["pixel_values"][first_image:], None
    return Example(
        input_ids=np.asarray(ids, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        pixel_values=pixel_values,
        image_sizes=sizes[first_image:],
        pixel_crops=pixel_crops,
    )


def build_generation_prompt(
    processor: Phi3VProcessor, user: str, images: Sequence[Image.Image], system: str | None = None
) -> Example:
    """A single-turn prompt for generation (labels all −100)."""
    user = user_text_with_tags(user, 1, len(images))
    pixels = processor.image_processor.preprocess(images)
    ids = processor.tokenize_prompt(
        chat_prompt(user, system), {k + 1: n for k, n in enumerate(pixels["num_img_tokens"])}
    )
    ids = np.asarray(ids, dtype=np.int64)
    return Example(ids, np.full_like(ids, IGNORE_INDEX), pixels["pixel_values"], pixels["image_sizes"])
