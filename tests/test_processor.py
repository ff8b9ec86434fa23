"""phi3v_ray.processor: HD crops (SPEC §3) and prompt tokenization with placeholder blocks (SPEC §4)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v_ray.constants import CLIP_MEAN, CLIP_STD
from phi3v_ray.processor import (
    Phi3VImageProcessor,
    Phi3VProcessor,
    check_tags,
    crops_per_image,
    hd_scale,
    pixel_values_from_crops,
    tokens_per_image,
)

CROP = 336
MEAN = torch.tensor(CLIP_MEAN).reshape(3, 1, 1)
STD = torch.tensor(CLIP_STD).reshape(3, 1, 1)

# SPEC §3 worked examples: (W, H, num_crops) → image_sizes [H, W], tokens per image.
WORKED = [
    ((320, 240, 4), (672, 672), 757),
    ((320, 240, 16), (1008, 1344), 1921),
    ((336, 336, 1), (336, 336), 313),
    ((336, 336, 16), (1344, 1344), 2509),
    ((1700, 2200, 16), (1344, 1344), 2509),
    ((1000, 200, 16), (672, 2688), 2485),
    ((200, 1000, 16), (2688, 672), 2557),
]


def normalize(rgb_uint8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → CLIP-normalized (3, H, W) float32, computed here independently of the processor."""
    x = torch.from_numpy(rgb_uint8.astype(np.float32)).permute(2, 0, 1) / 255.0
    return (x - MEAN) / STD


def untile(crops: np.ndarray, height: int, width: int) -> np.ndarray:
    """Row-major (h·w, 3, 336, 336) crops → (3, H, W): the inverse of the processor's tiling."""
    h, w = height // CROP, width // CROP
    return crops.reshape(h, w, 3, CROP, CROP).transpose(2, 0, 3, 1, 4).reshape(3, height, width)


def block_image(rows: int, cols: int) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """rows×cols blocks of 336 px, each a distinct solid colour; colours listed row-major."""
    colours = [(30 + 50 * r, 20 + 60 * c, 11 * (r * cols + c) + 7) for r in range(rows) for c in range(cols)]
    arr = np.zeros((rows * CROP, cols * CROP, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        r, c = divmod(i, cols)
        arr[r * CROP : (r + 1) * CROP, c * CROP : (c + 1) * CROP] = colour
    return Image.fromarray(arr), colours


@pytest.mark.parametrize("size_crops, expected_size, expected_tokens", WORKED, ids=[f"{w}x{h}@{n}" for (w, h, n), _, _ in WORKED])
def test_worked_examples(size_crops, expected_size, expected_tokens):
    width, height, num_crops = size_crops
    out = Phi3VImageProcessor(num_crops).preprocess([Image.new("RGB", (width, height), (90, 120, 150))])
    assert out["image_sizes"].tolist() == [list(expected_size)]
    assert out["num_img_tokens"] == [expected_tokens]
    assert tokens_per_image(*expected_size) == expected_tokens
    pv = out["pixel_values"]
    assert pv.shape == (1, num_crops + 1, 3, CROP, CROP)
    assert pv.dtype == np.float32
    used = 1 + (expected_size[0] // CROP) * (expected_size[1] // CROP)
    assert (pv[0, used:] == 0).all(), "padding crops must be all zero"
    assert (np.abs(pv[0, :used]).reshape(used, -1).max(axis=1) > 0).all(), "real crops must hold data"


def test_several_images_in_one_call_keep_their_order():
    images = [Image.new("RGB", (320, 240)), Image.new("RGB", (200, 1000)), Image.new("RGB", (336, 336))]
    out = Phi3VImageProcessor(16).preprocess(images, return_tensors="pt")
    assert out["image_sizes"].tolist() == [[1008, 1344], [2688, 672], [1344, 1344]]
    assert out["num_img_tokens"] == [1921, 2557, 2509]
    assert isinstance(out["pixel_values"], torch.Tensor) and out["pixel_values"].shape == (3, 17, 3, CROP, CROP)


def test_hd_scale_is_the_largest_that_fits():
    for num_crops in range(1, 17):
        for width, height in [(320, 240), (1000, 200), (1008, 672), (336, 336), (2200, 1700), (5000, 100)]:
            ratio = width / height
            scale = hd_scale(width, height, num_crops)
            assert scale * np.ceil(scale / ratio) <= num_crops
            assert (scale + 1) * np.ceil((scale + 1) / ratio) > num_crops


@pytest.mark.parametrize("num_crops", [6, 8])
@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_crops_land_row_major(num_crops, portrait):
    # 1008×672 (ratio 1.5): scale 3 since 3·ceil(3/1.5) = 6 ≤ n < 12 = 4·ceil(4/1.5), so new_w = 1008 and
    # new_h = 672: the image is kept at its size and every 336-block is exactly one crop.
    rows, cols = (3, 2) if portrait else (2, 3)
    image, colours = block_image(rows, cols)
    out = Phi3VImageProcessor(num_crops).preprocess([image])
    assert out["image_sizes"].tolist() == [[rows * CROP, cols * CROP]]
    pv = out["pixel_values"][0]
    for slot, colour in enumerate(colours, start=1):
        expected = normalize(np.full((CROP, CROP, 3), colour, dtype=np.uint8)).numpy()
        np.testing.assert_allclose(pv[slot], expected, atol=1e-5, err_msg=f"crop slot {slot}")
    assert (pv[1 + rows * cols :] == 0).all()


@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_global_view_is_bicubic_of_normalized_hd(portrait):
    rows, cols = (3, 2) if portrait else (2, 3)
    image, _ = block_image(rows, cols)
    pv = Phi3VImageProcessor(6).preprocess([image])["pixel_values"][0]
    hd = normalize(np.asarray(image))
    expected = F.interpolate(hd[None], size=(CROP, CROP), mode="bicubic", align_corners=False)[0]
    np.testing.assert_allclose(pv[0], expected.numpy(), atol=1e-5)
    # bicubic, not bilinear or area: the distinction is visible at the block edges
    bilinear = F.interpolate(hd[None], size=(CROP, CROP), mode="bilinear", align_corners=False)[0]
    assert np.abs(pv[0] - bilinear.numpy()).max() > 1e-2


@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_white_padding_and_normalization(portrait):
    # 1000×200 at 16 crops: ratio 5 → scale 8, new 2688×537, padded to 672: top int(135/2) = 67, bottom 68.
    size = (200, 1000) if portrait else (1000, 200)
    out = Phi3VImageProcessor(16).preprocess([Image.new("RGB", size, (0, 0, 0))])
    height, width = out["image_sizes"][0].tolist()
    assert (height, width) == ((2688, 672) if portrait else (672, 2688))
    pv = out["pixel_values"][0]
    hd = untile(pv[1 : 1 + (height // CROP) * (width // CROP)], height, width)

    expected_u8 = np.full((672, 2688, 3), 255, dtype=np.uint8)
    expected_u8[67 : 67 + 537] = 0
    if portrait:
        expected_u8 = expected_u8.transpose(1, 0, 2)  # padding goes left (67) / right (68)
    expected = normalize(expected_u8)
    np.testing.assert_allclose(hd, expected.numpy(), atol=1e-5)

    # the normalisation constants themselves: white → (1 − mean)/std, black → −mean/std
    white = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    black = -np.array(CLIP_MEAN) / np.array(CLIP_STD)
    np.testing.assert_allclose(hd[:, 0, 0], white, atol=1e-5)
    np.testing.assert_allclose(hd[:, 100, 100], black, atol=1e-5)

    glb = F.interpolate(expected[None], size=(CROP, CROP), mode="bicubic", align_corners=False)[0]
    np.testing.assert_allclose(pv[0], glb.numpy(), atol=1e-5)


def test_resize_is_pil_bilinear_then_pad():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    out = Phi3VImageProcessor(4).preprocess([image])
    pv = out["pixel_values"][0]
    hd = untile(pv[1:5], 672, 672)
    resized = np.asarray(image.resize((672, 504), Image.Resampling.BILINEAR))  # scale 2, new_h int(672/(4/3)) = 504
    expected = np.full((672, 672, 3), 255, dtype=np.uint8)
    expected[84 : 84 + 504] = resized
    np.testing.assert_allclose(hd, normalize(expected).numpy(), atol=1e-5)


def test_non_rgb_images_are_converted():
    gray = Image.new("L", (320, 240), 128)
    rgba = Image.new("RGBA", (320, 240), (128, 128, 128, 255))
    proc = Phi3VImageProcessor(4)
    a = proc.preprocess([gray])["pixel_values"]
    b = proc.preprocess([rgba])["pixel_values"]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [0, 17, 2.5, -1, "4"])
def test_num_crops_out_of_range(bad):
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor(bad)


# --- tokenization ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return Phi3VProcessor.from_pretrained(tiny_ckpt, num_crops=4)


def test_from_pretrained_reads_num_crops(tiny_ckpt):
    assert Phi3VProcessor.from_pretrained(tiny_ckpt).image_processor.num_crops == 1  # conftest writes num_crops=1


def test_tokenization_per_chunk_bos_and_placeholder_blocks(processor):
    tok = processor.tokenizer
    # at num_crops 4: 320×240 → [672, 672], 757 tokens; 1000×200 → scale 4, [336, 1344], 745 tokens
    small, big = Image.new("RGB", (320, 240)), Image.new("RGB", (1000, 200))
    n1, n2 = 757, 745
    text = "<|user|>\n<|image_1|><|image_2|>\nDo both images show the same colour?<|end|>\n<|assistant|>\n"
    out = processor(text, [small, big])
    ids = out["input_ids"][0].tolist()

    head = tok("<|user|>\n")["input_ids"]
    tail = tok("\nDo both images show the same colour?<|end|>\n<|assistant|>\n")["input_ids"]
    assert head[0] == 1 and tail[0] == 1
    assert ids == head + [-1] * n1 + [1] + [-2] * n2 + tail  # the empty chunk between the tags is a lone BOS
    assert ids.count(1) == 3
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert out["pixel_values"].shape == (2, 5, 3, CROP, CROP)
    assert out["image_sizes"].tolist() == [[672, 672], [336, 1344]]


def test_tokenization_tag_order_and_text_between(processor):
    out = processor("<|image_1|>\nleft<|image_2|>right", [Image.new("RGB", (336, 336)), Image.new("RGB", (1000, 200))])
    ids = out["input_ids"][0].tolist()
    n1, n2 = tokens_per_image(672, 672), tokens_per_image(336, 1344)
    tok = processor.tokenizer
    assert ids == [1] + [-1] * n1 + tok("\nleft")["input_ids"] + [-2] * n2 + tok("right")["input_ids"]


def test_text_only_prompt(processor):
    out = processor("<|user|>\nhello<|end|>\n<|assistant|>\n", [])
    assert out["pixel_values"] is None and out["image_sizes"] is None
    assert out["input_ids"][0].tolist() == processor.tokenizer("<|user|>\nhello<|end|>\n<|assistant|>\n")["input_ids"]


@pytest.mark.parametrize(
    "text, n_images, match",
    [
        ("<|image_1|>\nq", 2, "do not match"),  # images ≠ distinct tags
        ("<|image_1|><|image_2|>\nq", 1, "do not match"),
        ("<|image_1|><|image_3|>\nq", 2, "do not match"),  # tags not 1..n
        ("<|image_2|>\nq", 1, "do not match"),
        ("<|image_0|>\nq", 1, "do not match"),
        ("<|image_1|><|image_1|>\nq", 1, "repeat"),  # repeated tag
        ("plain text", 1, "do not match"),
    ],
)
def test_tag_errors(processor, text, n_images, match):
    with pytest.raises(ValueError, match=match):
        processor(text, [Image.new("RGB", (336, 336))] * n_images)


def test_check_tags_with_offset():
    assert check_tags("<|image_4|><|image_3|>", 2, first=3) == [4, 3]
    with pytest.raises(ValueError):
        check_tags("<|image_1|><|image_2|>", 2, first=3)


def test_decode_stops_at_stop_tokens(processor):
    ids = processor.tokenizer("red", add_special_tokens=False)["input_ids"]
    assert processor.decode(ids + [32007, 201, 32000] + ids) == "red"
    assert processor.decode(ids + [32000] + ids) == "red"


# ------------------------------------------------------------------ the uint8 layout of the Ray Data rows
SHAPES = [((1700, 2200), 16), ((2200, 1700), 16), ((320, 240), 4), ((1000, 200), 16), ((200, 1000), 16),
          ((336, 336), 1), ((640, 480), 7), ((97, 1301), 9)]


@pytest.mark.parametrize("size, num_crops", SHAPES, ids=[f"{w}x{h}@{n}" for (w, h), n in SHAPES])
def test_uint8_crops_expand_to_the_float_path_bit_for_bit(size, num_crops):
    rng = np.random.default_rng(num_crops)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    proc = Phi3VImageProcessor(num_crops)
    ref = proc.preprocess([image])
    out = proc.hd_crops([image])
    np.testing.assert_array_equal(out["image_sizes"], ref["image_sizes"])
    assert out["num_img_tokens"] == ref["num_img_tokens"]
    crops = out["pixel_crops"]
    assert crops.dtype == np.uint8 and crops.shape == (crops_per_image(out["image_sizes"])[0], 3, CROP, CROP)
    assert crops.nbytes * 4 * (num_crops + 1) / crops.shape[0] == ref["pixel_values"].nbytes  # only real crops travel
    full = pixel_values_from_crops(torch.from_numpy(crops), torch.from_numpy(out["image_sizes"]), num_slots=num_crops + 1)
    assert full.dtype == torch.float32
    np.testing.assert_array_equal(full.numpy(), ref["pixel_values"])  # same float32 ops, same order: identical
    tight = pixel_values_from_crops(torch.from_numpy(crops), torch.from_numpy(out["image_sizes"]))
    assert tight.shape[1] == 1 + crops.shape[0]  # default: as many slots as the image needs
    np.testing.assert_array_equal(tight.numpy(), ref["pixel_values"][:, : tight.shape[1]])


def test_uint8_crops_of_several_images_and_non_rgb():
    images = [Image.new("L", (320, 240), 77), Image.new("RGBA", (200, 1000), (1, 2, 3, 255)), Image.new("RGB", (336, 336))]
    proc = Phi3VImageProcessor(16)
    ref = proc.preprocess(images)
    out = proc.hd_crops(images)
    assert crops_per_image(out["image_sizes"]) == [12, 16, 16] and out["pixel_crops"].shape[0] == 44
    full = pixel_values_from_crops(torch.from_numpy(out["pixel_crops"]), torch.from_numpy(out["image_sizes"]), 17)
    np.testing.assert_array_equal(full.numpy(), ref["pixel_values"])
    assert proc.hd_crops([])["pixel_crops"].shape == (0, 3, CROP, CROP)
    with pytest.raises(ValueError, match="image_sizes name 44 crops, pixel_crops has 43"):
        pixel_values_from_crops(torch.from_numpy(out["pixel_crops"][:-1]), torch.from_numpy(out["image_sizes"]))
    with pytest.raises(ValueError, match="num_slots 5 is too few"):
        pixel_values_from_crops(torch.from_numpy(out["pixel_crops"]), torch.from_numpy(out["image_sizes"]), 5)
