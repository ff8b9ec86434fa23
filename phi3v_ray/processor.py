"""Phi-3.5-vision image processing and prompt tokenization (SPEC §3, §4).

Light on purpose: Ray Data actors import this module, so it never imports the model, and torch only
inside the functions that need it (the decoding actors do not: a worker starts seconds sooner).

`Phi3VImageProcessor` turns PIL images into HD crops; `Phi3VProcessor` splits a prompt on its
`<|image_k|>` tags, tokenizes every chunk on its own (each starts with BOS) and puts image k's
placeholder block — the value −k repeated tokens-per-image times — between the chunks.

Two layouts of the same pixels:

    pixel_values  float32 (n_img, num_crops+1, 3, 336, 336)   what the model reads: [global view,
                  normalised crops…], zero-padded; `preprocess` (generation, evaluation, parity)
    pixel_crops   uint8   (Σ h·w, 3, 336, 336)                the padded HD image's 336-px crops,
                  real ones only, image after image, row-major; `hd_crops` (the Ray Data rows: a
                  16-crop page is 5.4 MB instead of 23 MB)

`pixel_values_from_crops` turns the second into the first with the same float32 torch ops in the
same order (normalise, bicubic global view), so on the CPU the result is bit-identical to
`preprocess`; the training worker runs it on its GPU after a uint8 host-to-device copy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .constants import CLIP_MEAN, CLIP_STD, CROP_SIZE, GRID, IMAGE_TAG, MAX_NUM_CROPS, STOP_IDS, image_tags


def tokens_per_image(height: int, width: int) -> int:
    """Feature tokens of one image whose padded HD size is height × width (SPEC §1.6)."""
    h, w = height // CROP_SIZE, width // CROP_SIZE
    return (h * w + 1) * GRID * GRID + 1 + (h + 1) * GRID


def hd_scale(width: int, height: int, num_crops: int) -> int:
    """Largest integer scale with scale · ceil(scale / ratio) ≤ num_crops, ratio = long / short side."""
    ratio = width / height
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    return scale


def check_num_crops(num_crops: int) -> int:
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or not 1 <= num_crops <= MAX_NUM_CROPS:
        raise ValueError(f"num_crops must be an integer in 1..{MAX_NUM_CROPS}, got {num_crops!r}")
    return num_crops


class Phi3VImageProcessor:
    """PIL image → padded HD tensor → [global view, 336px crops…], zero-padded to num_crops + 1."""

    def __init__(self, num_crops: int = MAX_NUM_CROPS):
        self.num_crops = check_num_crops(num_crops)
        self._mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)

    def hd_image(self, image: Image.Image) -> Image.Image:
        """Resize and white-pad so both sides are multiples of 336 (steps 1–4 of SPEC §3)."""
        image = image.convert("RGB")
        transposed = image.width < image.height
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
        scale = hd_scale(width, height, self.num_crops)
        new_w = scale * CROP_SIZE
        new_h = int(new_w / (width / height))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        target_h = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
        top = int((target_h - new_h) / 2)
        padded = Image.new("RGB", (new_w, target_h), (255, 255, 255))
        padded.paste(image, (0, top))
        if transposed:
            padded = padded.transpose(Image.Transpose.TRANSPOSE)
        return padded

    def crops_one(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """One image → (its HD crops (h·w, 3, 336, 336) uint8, row-major, (H, W)): no float work.

        The pixels of `hd_image`, with the white padding and the transpose back done in numpy
        while cutting the crops (one copy instead of PIL's paste, transpose and array conversion).
        """
        image = image if image.mode == "RGB" else image.convert("RGB")
        transposed = image.width < image.height
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
        new_w = hd_scale(width, height, self.num_crops) * CROP_SIZE
        new_h = int(new_w / (width / height))
        target_h = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
        top = int((target_h - new_h) / 2)
        canvas = np.full((target_h, new_w, 3), 255, dtype=np.uint8)
        canvas[top : top + new_h] = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
        rows, cols = target_h // CROP_SIZE, new_w // CROP_SIZE
        tiles = canvas.reshape(rows, CROP_SIZE, cols, CROP_SIZE, 3)  # (rows, y, cols, x, 3)
        if transposed:  # the HD image is canvas transposed: crop (i, j) is tile (j, i), pixel (y, x) is (x, y)
            crops, size = tiles.transpose(2, 0, 4, 3, 1), (new_w, target_h)  # (cols, rows, 3, x, y)
        else:
            crops, size = tiles.transpose(0, 2, 4, 1, 3), (target_h, new_w)  # (rows, cols, 3, y, x)
        return np.ascontiguousarray(crops).reshape(rows * cols, 3, CROP_SIZE, CROP_SIZE), size

    def hd_crops(self, images: Sequence[Image.Image]) -> dict:
        """Images → pixel_crops (Σ h·w, 3, 336, 336) uint8, image_sizes (n, 2), num_img_tokens [n].

        The compact layout of the Ray Data rows; `pixel_values_from_crops` makes `preprocess`'s
        pixel_values from it.
        """
        crops, sizes = [], []
        for image in images:
            c, size = self.crops_one(image)
            crops.append(c)
            sizes.append(size)
        pixel_crops = np.concatenate(crops) if crops else np.zeros((0, 3, CROP_SIZE, CROP_SIZE), dtype=np.uint8)
        return {
            "pixel_crops": pixel_crops,
            "image_sizes": np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
            "num_img_tokens": [tokens_per_image(h, w) for h, w in sizes],
        }

    def preprocess_one(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """One image → (pixel_values (num_crops+1, 3, 336, 336) float32, (H, W))."""
        hd = self.hd_image(image)
        x = np.asarray(hd, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, H, W)
        x = (x - self._mean) / self._std
        _, height, width = x.shape
        h, w = height // CROP_SIZE, width // CROP_SIZE
        import torch
        import torch.nn.functional as F

        glb = F.interpolate(torch.from_numpy(x)[None], size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False)
        crops = x.reshape(3, h, CROP_SIZE, w, CROP_SIZE).transpose(1, 3, 0, 2, 4)  # (h, w, 3, 336, 336)
        crops = crops.reshape(h * w, 3, CROP_SIZE, CROP_SIZE)  # (h·w, 3, 336, 336), row-major
        out = np.zeros((self.num_crops + 1, 3, CROP_SIZE, CROP_SIZE), dtype=np.float32)
        out[0] = glb[0].numpy()
        out[1 : 1 + h * w] = crops
        return out, (height, width)

    def preprocess(self, images: Sequence[Image.Image], return_tensors: str = "np") -> dict:
        """Images → pixel_values (n, num_crops+1, 3, 336, 336), image_sizes (n, 2), num_img_tokens [n]."""
        pixels, sizes = [], []
        for image in images:
            p, size = self.preprocess_one(image)
            pixels.append(p)
            sizes.append(size)
        if pixels:
            pixel_values = np.stack(pixels)
        else:
            pixel_values = np.zeros((0, self.num_crops + 1, 3, CROP_SIZE, CROP_SIZE), dtype=np.float32)
        image_sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        out = {
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
            "num_img_tokens": [tokens_per_image(h, w) for h, w in sizes],
        }
        if return_tensors == "pt":
            import torch

            out["pixel_values"] = torch.from_numpy(pixel_values)
            out["image_sizes"] = torch.from_numpy(image_sizes)
        return out

    __call__ = preprocess


def crops_per_image(image_sizes) -> list[int]:
    """HD crops (h·w) of each image, from its padded (H, W)."""
    return [int(h) // CROP_SIZE * (int(w) // CROP_SIZE) for h, w in np.asarray(image_sizes).reshape(-1, 2).tolist()]


def pixel_values_from_crops(
    pixel_crops: torch.Tensor, image_sizes: torch.Tensor, num_slots: int | None = None
) -> torch.Tensor:
    """uint8 HD crops → the model's float32 pixel_values, on the crops' device.

    pixel_crops (Σ h·w, 3, 336, 336) uint8, image_sizes (n_img, 2) → (n_img, num_slots, 3, 336, 336),
    slot 0 the global view, then the normalised crops, zero-padded. num_slots defaults to the
    most any image here needs (1 + h·w); the model reads only the slots an image's size names.
    The float32 ops and their order are `preprocess_one`'s: x / 255, (x − mean) / std, bicubic
    of the normalised HD image, so on the CPU the result is bit-identical to `preprocess`.
    """
    import torch
    import torch.nn.functional as F

    sizes = np.asarray(image_sizes.cpu() if torch.is_tensor(image_sizes) else image_sizes).reshape(-1, 2).tolist()
    counts = crops_per_image(sizes)
    if sum(counts) != pixel_crops.shape[0]:
        raise ValueError(f"image_sizes name {sum(counts)} crops, pixel_crops has {pixel_crops.shape[0]}")
    slots = 1 + max(counts, default=0) if num_slots is None else num_slots
    if counts and slots < 1 + max(counts):
        raise ValueError(f"num_slots {slots} is too few: an image here needs {1 + max(counts)}")
    device = pixel_crops.device
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device).reshape(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=device).reshape(3, 1, 1)
    x = pixel_crops.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)  # (Σ h·w, 3, 336, 336), one buffer
    out = torch.zeros((len(counts), slots, 3, CROP_SIZE, CROP_SIZE), dtype=torch.float32, device=device)
    start = 0
    for i, ((height, width), n) in enumerate(zip(sizes, counts)):
        h, w = height // CROP_SIZE, width // CROP_SIZE
        crops = x[start : start + n]  # (h·w, 3, 336, 336)
        hd = crops.reshape(h, w, 3, CROP_SIZE, CROP_SIZE).permute(2, 0, 3, 1, 4).reshape(1, 3, height, width)
        out[i, 0] = F.interpolate(hd, size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False)[0]
        out[i, 1 : 1 + n] = crops
        start += n
    return out


def check_tags(text: str, n_images: int, first: int = 1) -> list[int]:
    """Tags must be distinct and exactly first..first+n_images-1; returns them in order of appearance."""
    tags = image_tags(text)
    expected = list(range(first, first + n_images))
    if len(tags) != len(set(tags)):
        raise ValueError(f"image tags repeat in the prompt: {tags}")
    if sorted(tags) != expected:
        raise ValueError(
            f"image tags {sorted(tags)} do not match the {n_images} image(s) given: expected tags {expected}"
        )
    return tags


@dataclass
class Phi3VProcessor:
    """Tokenizer + image processor, loaded from a checkpoint directory."""

    tokenizer: object
    image_processor: Phi3VImageProcessor

    @classmethod
    def from_pretrained(cls, path: str | Path, num_crops: int | None = None) -> "Phi3VProcessor":
        from transformers import PreTrainedTokenizerFast

        from .weights import local_checkpoint

        path = Path(local_checkpoint(str(path), processor_only=True))  # s3://… → this node's cached copy
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (expected a Phi-3.5-vision checkpoint directory)")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        if num_crops is None:
            config_file = path / "preprocessor_config.json"
            num_crops = json.loads(config_file.read_text()).get("num_crops", 4) if config_file.is_file() else 4
        return cls(tokenizer=tokenizer, image_processor=Phi3VImageProcessor(num_crops=int(num_crops)))

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def tokenize_prompt(self, text: str, tokens_by_tag: dict[int, int]) -> list[int]:
        """Per-chunk tokenization with BOS, −k placeholder blocks between chunks (SPEC §4)."""
        chunks = IMAGE_TAG.split(text)  # [text, k, text, k, text, …]
        ids = self.encode_text(chunks[0], add_special_tokens=True)
        for i in range(1, len(chunks), 2):
            k = int(chunks[i])
            ids += [-k] * tokens_by_tag[k]
            ids += self.encode_text(chunks[i + 1], add_special_tokens=True)
        return ids

    def __call__(self, text: str, images: Sequence[Image.Image] = (), return_tensors: str = "pt") -> dict:
        """Tokenize one prompt with its images → input_ids (1, T), attention_mask, pixel_values, image_sizes."""
        check_tags(text, len(images))
        pixels = self.image_processor.preprocess(images)
        tokens_by_tag = {k + 1: n for k, n in enumerate(pixels["num_img_tokens"])}
        ids = self.tokenize_prompt(text, tokens_by_tag)
        out = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "pixel_values": pixels["pixel_values"] if len(images) else None,
            "image_sizes": pixels["image_sizes"] if len(images) else None,
        }
        if return_tensors == "pt":
            import torch

            out = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in out.items()}
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, cut at the first stop token."""
        kept = []
        for i in ids:
            if int(i) in STOP_IDS:
                break
            kept.append(int(i))
        return self.tokenizer.decode(kept, skip_special_tokens=True)
