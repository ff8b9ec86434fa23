"""Numbers and names of Phi-3.5-vision that the data side and the model side share (SPEC §1, §3, §4).

Pure Python on purpose: the converters, the record schema, Ray Data actors, the collator and the
model all import from here, so this module imports nothing heavier than `re`.
"""

from __future__ import annotations

import re

# Labels at this value are not supervised (PyTorch's cross-entropy default ignore_index).
IGNORE_INDEX = -100

# Special-token ids of the Phi-3.5-vision tokenizer (SPEC §4).
BOS_ID = 1
ENDOFTEXT_ID = 32000  # <|endoftext|>: eos for generation and the pad id
END_ID = 32007  # <|end|>: closes every chat turn
STOP_IDS = (ENDOFTEXT_ID, END_ID)  # generation stops at either

# HD image transform (SPEC §1, §3).
CROP_SIZE = 336  # pixels per crop side: CLIP ViT-L/14-336's 24×24 patch grid
GRID = 12  # merged feature grid per crop side: 336 / 14 / 2
MAX_NUM_CROPS = 16  # largest crop budget per image
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Image k of a record is tagged `<|image_k|>` in the user text, k = 1..n across the record.
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


def image_tag(k: int) -> str:
    """The tag of image k: `<|image_k|>`."""
    return f"<|image_{k}|>"


def image_tags(text: str) -> list[int]:
    """The k of every `<|image_k|>` tag in `text`, in order of appearance, repeats kept."""
    return [int(k) for k in IMAGE_TAG.findall(text)]
