"""phi3v_ray.examples and phi3v_ray.collate: label masking, multi-turn tags, overflow, padding (SPEC §4)."""

import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v_ray.collate import ahead, batch_stats, collate
from phi3v_ray.constants import IGNORE_INDEX
from phi3v_ray.examples import SequenceTooLong, build_example, build_generation_prompt, chat_prompt
from phi3v_ray.processor import Phi3VImageProcessor, Phi3VProcessor, tokens_per_image

BOS, ENDOFTEXT, ASSISTANT, END, USER, SYSTEM = 1, 32000, 32001, 32007, 32010, 32006
NEWLINE = 201  # "\n" in the tiny tokenizer (checked below)
SQUARE = Image.new("RGB", (336, 336), (200, 30, 30))
WIDE = Image.new("RGB", (672, 336), (30, 200, 30))  # at num_crops 2: [336, 672], 3 crops, 457 tokens


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return Phi3VProcessor.from_pretrained(tiny_ckpt)  # num_crops 1: every image is [336, 336], 313 tokens


@pytest.fixture(scope="module")
def processor2(processor):
    return Phi3VProcessor(processor.tokenizer, Phi3VImageProcessor(2))


def enc(processor, text, special=False):
    return processor.tokenizer(text, add_special_tokens=special)["input_ids"]


def test_tiny_tokenizer_special_ids(processor):
    assert enc(processor, "\n") == [NEWLINE]
    assert enc(processor, "<|user|><|assistant|><|end|><|endoftext|><|system|>") == [USER, ASSISTANT, END, ENDOFTEXT, SYSTEM]
    assert enc(processor, "x", special=True)[0] == BOS


def test_single_turn_labels(processor):
    conv = [{"images": ["a.png"], "user": "What colour is the shape?", "assistant": "red"}]
    ex = build_example(processor, conv, [SQUARE])
    ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
    n = tokens_per_image(336, 336)
    prompt = (
        enc(processor, "<|user|>\n", True)
        + [-1] * n
        + enc(processor, "\nWhat colour is the shape?<|end|>\n<|assistant|>\n", True)
    )
    answer = enc(processor, "red") + [END, NEWLINE, ENDOFTEXT]
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer
    # spelled out: BOS, role tokens, placeholders and "<|assistant|>\n" are masked; the suffix is supervised
    assert labels[-3:] == [END, NEWLINE, ENDOFTEXT]
    for i, t in enumerate(ids[: len(prompt)]):
        assert labels[i] == IGNORE_INDEX, (i, t)
    assert ids[len(prompt) - 2 : len(prompt)] == [ASSISTANT, NEWLINE]
    assert ex.num_images == 1 and ex.pixel_values.shape == (1, 2, 3, 336, 336)
    assert ex.input_ids.dtype == np.int64 and ex.labels.dtype == np.int64


def test_user_text_with_tags_kept(processor):
    conv = [{"images": ["a", "b"], "user": "<|image_1|><|image_2|>\nSame colour?", "assistant": "no"}]
    ex = build_example(processor, conv, [SQUARE, SQUARE])
    ids = ex.input_ids.tolist()
    n = tokens_per_image(336, 336)
    i1, i2 = ids.index(-1), ids.index(-2)
    assert i2 == i1 + n + 1 and ids[i1 + n] == BOS  # lone BOS between adjacent tags
    assert ids.count(-1) == n and ids.count(-2) == n


def test_system_prompt_only_in_first_turn(processor):
    conv = [{"images": [], "user": "hi", "assistant": "yes"}, {"images": [], "user": "again", "assistant": "no"}]
    ex = build_example(processor, conv, [], system="be brief")
    ids = ex.input_ids.tolist()
    assert ids.count(SYSTEM) == 1 and ids.index(SYSTEM) == 1
    assert ex.pixel_values.shape[0] == 0 and ex.num_images == 0


def test_multi_turn_tags_bos_and_labels(processor):
    conv = [
        {"images": ["a"], "user": "What colour is the shape?", "assistant": "red"},
        {"images": ["b", "c"], "user": "Do both images show the same colour?", "assistant": "yes"},
        {"images": [], "user": "Which way?", "assistant": "left"},
    ]
    ex = build_example(processor, conv, [SQUARE, SQUARE, SQUARE])
    ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
    n = tokens_per_image(336, 336)

    turns = []
    for user, answer in [
        ("<|image_1|>\nWhat colour is the shape?", "red"),
        ("<|image_2|><|image_3|>\nDo both images show the same colour?", "yes"),
        ("Which way?", "left"),
    ]:
        turns.append((processor.tokenize_prompt(chat_prompt(user), {1: n, 2: n, 3: n}), enc(processor, answer) + [END, NEWLINE, ENDOFTEXT]))
    assert ids == [t for p, a in turns for t in p + a]
    assert labels == [t for p, a in turns for t in [IGNORE_INDEX] * len(p) + a]
    # every turn starts again with BOS <|user|>
    starts = [i for i in range(len(ids) - 1) if ids[i] == BOS and ids[i + 1] == USER]
    assert len(starts) == 3
    assert ids[starts[1] - 1] == ENDOFTEXT and ids[starts[2] - 1] == ENDOFTEXT
    # the images of turn 2 get the global tags 2 and 3
    assert [ids.count(-k) for k in (1, 2, 3, 4)] == [n, n, n, 0]
    assert starts[0] < ids.index(-1) < starts[1] < ids.index(-2) < ids.index(-3) < starts[2]
    assert ex.num_images == 3


def test_mismatched_image_count(processor):
    with pytest.raises(ValueError, match="1 images but 2"):
        build_example(processor, [{"images": ["a"], "user": "q", "assistant": "a"}], [SQUARE, SQUARE])


def _three_turns():
    return [
        {"images": ["a"], "user": "What colour is the shape?", "assistant": "red"},
        {"images": ["b"], "user": "What colour is the shape?", "assistant": "green"},
        {"images": ["c", "d"], "user": "Do both images show the same colour?", "assistant": "no"},
    ]


def test_truncate_drops_earliest_whole_turns_and_renumbers(processor):
    red, green, blue, yellow = (Image.new("RGB", (336, 336), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)])
    images = [red, green, blue, yellow]
    full = build_example(processor, _three_turns(), images)
    last_only = build_example(processor, _three_turns()[2:], [blue, yellow])
    last_two = build_example(processor, _three_turns()[1:], [green, blue, yellow])
    n = tokens_per_image(336, 336)
    assert len(full.input_ids) > len(last_two.input_ids) > len(last_only.input_ids)

    cut = build_example(processor, _three_turns(), images, max_length=len(last_two.input_ids), overflow="truncate")
    np.testing.assert_array_equal(cut.input_ids, last_two.input_ids)
    np.testing.assert_array_equal(cut.labels, last_two.labels)
    np.testing.assert_array_equal(cut.pixel_values, last_two.pixel_values)  # green, blue, yellow
    assert [int((cut.input_ids == -k).sum()) for k in (1, 2, 3, 4)] == [n, n, n, 0]

    cut = build_example(processor, _three_turns(), images, max_length=len(last_two.input_ids) - 1, overflow="truncate")
    np.testing.assert_array_equal(cut.input_ids, last_only.input_ids)
    np.testing.assert_array_equal(cut.labels, last_only.labels)
    np.testing.assert_array_equal(cut.pixel_values, last_only.pixel_values)
    assert cut.num_images == 2 and int(cut.input_ids.min()) == -2
    # answers are kept whole: the label tail is the full supervised answer of the last turn
    assert cut.labels[-3:].tolist() == [END, NEWLINE, ENDOFTEXT]

    fits = build_example(processor, _three_turns(), images, max_length=len(full.input_ids), overflow="truncate")
    np.testing.assert_array_equal(fits.input_ids, full.input_ids)


def test_overflow_reject_and_last_turn_too_long(processor):
    images = [SQUARE] * 4
    full = build_example(processor, _three_turns(), images)
    with pytest.raises(SequenceTooLong):
        build_example(processor, _three_turns(), images, max_length=len(full.input_ids) - 1)
    with pytest.raises(SequenceTooLong):
        build_example(processor, _three_turns(), images, max_length=len(full.input_ids) - 1, overflow="reject")
    last_only = build_example(processor, _three_turns()[2:], images[:2])
    with pytest.raises(SequenceTooLong):  # the last turn alone does not fit: never cut an answer
        build_example(processor, _three_turns(), images, max_length=len(last_only.input_ids) - 1, overflow="truncate")
    assert issubclass(SequenceTooLong, ValueError)
    with pytest.raises(ValueError, match="overflow"):
        build_example(processor, _three_turns(), images, overflow="cut")


def test_generation_prompt(processor):
    ex = build_generation_prompt(processor, "What colour is the shape?", [SQUARE])
    n = tokens_per_image(336, 336)
    expected = processor.tokenize_prompt(chat_prompt("<|image_1|>\nWhat colour is the shape?"), {1: n})
    assert ex.input_ids.tolist() == expected
    assert ex.input_ids[-2:].tolist() == [ASSISTANT, NEWLINE]
    assert (ex.labels == IGNORE_INDEX).all()


# --- collate -----------------------------------------------------------------------------------


def _rows(processor, processor2):
    """Rows with 0, 1 and 2 images; row 1 at num_crops 2 (3 crop slots), row 2 at num_crops 1 (2 slots)."""
    r0 = build_example(processor, [{"images": [], "user": "Which way does the square move?", "assistant": "left"}], [])
    r1 = build_example(processor2, [{"images": ["a"], "user": "What colour is the shape?", "assistant": "green"}], [WIDE])
    r2 = build_example(
        processor, [{"images": ["a", "b"], "user": "Do both images show the same colour?", "assistant": "yes"}], [SQUARE, WIDE]
    )
    return [r0, r1, r2]


def _as_row(ex):
    return {"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": ex.pixel_values, "image_sizes": ex.image_sizes}


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding_and_images(processor, processor2, side):
    examples = _rows(processor, processor2)
    assert [e.num_images for e in examples] == [0, 1, 2]
    assert [e.pixel_values.shape[1] for e in examples] == [2, 3, 2]
    assert examples[1].image_sizes.tolist() == [[336, 672]]
    batch = collate([_as_row(e) for e in examples], padding_side=side)
    lengths = [len(e.input_ids) for e in examples]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["input_ids"].dtype == torch.int64
    for i, (e, length) in enumerate(zip(examples, lengths)):
        real = slice(0, length) if side == "right" else slice(width - length, width)
        pad = slice(length, width) if side == "right" else slice(0, width - length)
        assert batch["input_ids"][i, real].tolist() == e.input_ids.tolist()
        assert batch["labels"][i, real].tolist() == e.labels.tolist()
        assert (batch["input_ids"][i, pad] == ENDOFTEXT).all()
        assert (batch["labels"][i, pad] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][i, real] == 1).all() and (batch["attention_mask"][i, pad] == 0).all()
        # the answer's own <|endoftext|> stays visible: the mask comes from lengths, not from the pad id
        eot = real.start + length - 1
        assert batch["input_ids"][i, eot] == ENDOFTEXT and batch["attention_mask"][i, eot] == 1
    if side == "right":
        assert batch["attention_mask"].sum(1).tolist() == lengths

    # images of all rows, concatenated in row order, zero-padded to the largest crop count
    pv, sizes = batch["pixel_values"], batch["image_sizes"]
    assert pv.shape == (3, 3, 3, 336, 336) and pv.dtype == torch.float32
    assert sizes.tolist() == [[336, 672], [336, 336], [336, 336]]  # WIDE at num_crops 1 is scaled to [336, 336]
    np.testing.assert_array_equal(pv[0, :3].numpy(), examples[1].pixel_values[0])
    np.testing.assert_array_equal(pv[1, :2].numpy(), examples[2].pixel_values[0])
    np.testing.assert_array_equal(pv[2, :2].numpy(), examples[2].pixel_values[1])
    assert (pv[1:, 2:] == 0).all()
    assert batch_stats(batch) == (sum(lengths), 3)


def test_collate_text_only_and_options(processor, processor2):
    r0 = _rows(processor, processor2)[0]
    batch = collate([_as_row(r0), {"input_ids": r0.input_ids[:5]}], pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= len(r0.input_ids)
    assert batch["pixel_values"] is None and batch["image_sizes"] is None
    assert (batch["labels"][1] == IGNORE_INDEX).all()  # no labels given → nothing supervised
    assert batch_stats(batch) == (len(r0.input_ids) + 5, 0)
    with pytest.raises(ValueError, match="padding_side"):
        collate([_as_row(r0)], padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_batch_equals_examples_one_by_one(tiny_ckpt, processor, processor2):
    from phi3v_ray.model import Phi3VForCausalLM, causal_lm_loss

    model = Phi3VForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    examples = _rows(processor, processor2)
    batch = collate([_as_row(e) for e in examples], padding_side="right")
    with torch.no_grad():
        out = model(**batch)
        singles = [model(**collate([_as_row(e)])) for e in examples]
    per_example = []
    for i, (e, single) in enumerate(zip(examples, singles)):
        length = len(e.input_ids)
        logits = out.logits[i : i + 1, :length]
        torch.testing.assert_close(logits, single.logits, atol=1e-4, rtol=1e-4)
        loss = causal_lm_loss(logits, batch["labels"][i : i + 1, :length])
        torch.testing.assert_close(loss, single.loss, atol=1e-4, rtol=1e-4)
        per_example.append((loss, int((e.labels[1:] != IGNORE_INDEX).sum())))
    # the batch loss is the token-weighted mean of the per-example losses
    expected = sum(l * n for l, n in per_example) / sum(n for _, n in per_example)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def _object_column(values) -> np.ndarray:
    """A ragged column as Ray Data hands it over in a numpy batch: an object array of arrays."""
    column = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        column[i] = v
    return column


def test_collate_fn_on_a_numpy_batch(processor, processor2):
    import pickle

    from phi3v_ray.collate import Phi3VCollate

    rows = [{**_as_row(e), "id": f"r{i}"} for i, e in enumerate(_rows(processor, processor2))]
    batch = {k: _object_column([r[k] for r in rows]) for k in ("input_ids", "labels", "pixel_values", "image_sizes")}
    batch["id"] = np.asarray([r["id"] for r in rows], dtype=object)
    collate_fn = Phi3VCollate(padding_side="left", return_ids=True)
    out = collate_fn(batch)
    expected = collate(rows, padding_side="left")
    assert out["ids"] == ["r0", "r1", "r2"]
    for k, v in expected.items():
        torch.testing.assert_close(out[k], v)
    copy = pickle.loads(pickle.dumps(collate_fn))
    assert type(copy) is Phi3VCollate and (copy.padding_side, copy.return_ids) == ("left", True)


def _as_crop_row(ex):
    return {"input_ids": ex.input_ids, "labels": ex.labels, "pixel_crops": ex.pixel_crops, "image_sizes": ex.image_sizes}


def _crop_rows(processor, processor2):
    """`_rows` again with uint8 crops (the Ray Data rows' layout), the same examples otherwise."""
    def crops(proc, conv, images):
        return build_example(proc, conv, images, crops=True)

    r0 = crops(processor, [{"images": [], "user": "Which way does the square move?", "assistant": "left"}], [])
    r1 = crops(processor2, [{"images": ["a"], "user": "What colour is the shape?", "assistant": "green"}], [WIDE])
    r2 = crops(processor, [{"images": ["a", "b"], "user": "Do both images show the same colour?", "assistant": "yes"}],
               [SQUARE, WIDE])
    return [r0, r1, r2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_of_uint8_crops_makes_the_same_batch_on_the_device(processor, processor2, side):
    from phi3v_ray.collate import to_device

    floats, crops = _rows(processor, processor2), _crop_rows(processor, processor2)
    for f, c in zip(floats, crops):
        assert f.pixel_crops is None and c.pixel_values is None
        np.testing.assert_array_equal(c.input_ids, f.input_ids)
        np.testing.assert_array_equal(c.labels, f.labels)
    assert [c.pixel_crops.shape[0] for c in crops] == [0, 2, 2] and crops[1].pixel_crops.dtype == np.uint8
    before = collate([_as_row(e) for e in floats], padding_side=side)
    host = collate([_as_crop_row(e) for e in crops], padding_side=side)
    assert host["pixel_values"] is None and host["pixel_crops"].dtype == torch.uint8
    assert host["pixel_crops"].shape == (4, 3, 336, 336)  # real crops only: 2 + 1 + 1
    assert batch_stats(host) == batch_stats(before)
    after = to_device(host, torch.device("cpu"))
    assert "pixel_crops" not in after and set(after) == set(before)
    for k in ("input_ids", "attention_mask", "labels", "image_sizes", "pixel_values"):
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)  # bit for bit, slots and zero padding too


def test_collate_copies_pixels_once_and_refuses_mixed_layouts(processor, processor2):
    crops = _crop_rows(processor, processor2)
    rows = [_as_crop_row(e) for e in crops]
    batch = collate(rows)
    assert not np.shares_memory(batch["pixel_crops"].numpy(), rows[1]["pixel_crops"])
    np.testing.assert_array_equal(batch["pixel_crops"][:2].numpy(), rows[1]["pixel_crops"])
    float_row = _as_row(_rows(processor, processor2)[1])
    with pytest.raises(ValueError, match="mix pixel layouts"):
        collate([rows[2], float_row])
    # a truncated example keeps the crops of the images that remain
    conv = [{"images": ["a"], "user": "one?", "assistant": "a"}, {"images": ["b"], "user": "two?", "assistant": "b"}]
    full = build_example(processor2, conv, [WIDE, SQUARE], crops=True)
    cut = build_example(processor2, conv, [WIDE, SQUARE], crops=True, max_length=len(full.input_ids) - 1,
                        overflow="truncate")
    assert cut.image_sizes.tolist() == [[336, 336]]
    np.testing.assert_array_equal(cut.pixel_crops, full.pixel_crops[2:])


def test_evaluation_prompts_from_uint8_rows_generate_what_float_rows_do(tiny_ckpt, processor, processor2):
    """Evaluation reads the pipeline's rows: uint8 crops give the float rows' prompts and answers."""
    from phi3v_ray.evaluate import generate_answers, prompt_row
    from phi3v_ray.model import Phi3VForCausalLM

    model = Phi3VForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    conv = [{"images": ["a", "b"], "user": "Same colour?", "assistant": "yes"},
            {"images": ["c"], "user": "And this one?", "assistant": "no"}]
    images = [SQUARE, WIDE, SQUARE]
    floats, crops = (build_example(processor2, conv, images, crops=c) for c in (False, True))
    float_prompt, answers = prompt_row(_as_row(floats), processor)
    crop_prompt, crop_answers = prompt_row(_as_crop_row(crops), processor)
    assert crop_answers == answers and crop_prompt["pixel_crops"].shape[0] == 2 + 1  # the first turn's images only
    np.testing.assert_array_equal(crop_prompt["input_ids"], float_prompt["input_ids"])
    a = generate_answers(model, processor, [float_prompt], 4, torch.device("cpu"))
    b = generate_answers(model, processor, [crop_prompt], 4, torch.device("cpu"))
    assert a == b


# ------------------------------------------------------------------------------------ length grouping
class _Shard:
    """Stands in for a worker's Ray Data shard: `iter_batches` in stream order, numpy columns (on a real
    shard in test_pipeline.py)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def iter_batches(self, batch_size, batch_format, prefetch_batches, drop_last=False):
        for k in range(0, len(self.rows), batch_size):
            chunk = self.rows[k:k + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield {key: _object_column([r[key] for r in chunk]) for key in chunk[0]}


def _length_rows(lengths) -> list[dict]:
    return [{"id": f"r{i}", "input_ids": np.full(n, 7, dtype=np.int64), "labels": np.full(n, 7, dtype=np.int64),
             "num_tokens": np.int64(n)} for i, n in enumerate(lengths)]


def _padded_fraction(batches) -> float:
    batches = list(batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1 - real / sum(b["attention_mask"].numel() for b in batches)


def test_the_shuffle_is_a_seeded_permutation_per_epoch_and_rank():
    from phi3v_ray.grouping import shuffle_rows

    rows = [{"id": f"r{i}"} for i in range(50)]

    def order(buffer=8, epoch=0, rank=0, seed=5):
        return [r["id"] for r in shuffle_rows(iter(rows), buffer, seed, epoch, rank)]

    first = order()
    assert sorted(first) == sorted(r["id"] for r in rows) and first != [r["id"] for r in rows]
    assert order() == first  # deterministic: a resumed run reads the same order
    assert len({tuple(order(epoch=1)), tuple(order(rank=1)), tuple(order(seed=6)), tuple(first)}) == 4
    assert order(buffer=1) == [r["id"] for r in rows]  # a buffer of one row keeps stream order
    # a row leaves at most `buffer` - 1 places before it entered: the shuffle is local
    assert max(i - first.index(f"r{i}") for i in range(50)) < 8
    with pytest.raises(ValueError, match="≥ 1 row"):
        next(shuffle_rows(iter(rows), 0, 5, 0))


class _FixedShard:
    """Batches whose columns are fixed-shape arrays (as Ray hands equal-length rows); keeps weak
    references to every batch it handed out."""

    def __init__(self, n: int, length: int):
        self.n, self.length, self.handed = n, length, []

    def iter_batches(self, batch_size, batch_format, prefetch_batches, drop_last=False):
        for k in range(0, self.n, batch_size):
            m = min(batch_size, self.n - k)
            ids = np.full((m, self.length), 7, dtype=np.int64)
            self.handed.append(weakref.ref(ids))
            yield {"id": np.array([f"r{k + i}" for i in range(m)], dtype=object), "input_ids": ids,
                   "labels": ids.copy(), "num_tokens": np.full(m, self.length, dtype=np.int64)}


def test_rows_waiting_in_the_shuffle_buffer_do_not_keep_their_fetched_batches_alive():
    from phi3v_ray.collate import Phi3VCollate, iter_train_batches

    shard = _FixedShard(n=40, length=300)
    it = iter_train_batches(shard, 2, epoch=0, seed=1, shuffle_buffer=16, collate_fn=Phi3VCollate(return_ids=True))
    first = next(it)
    gc.collect()
    # 9 batches fetched (16 rows buffered, 2 drawn); each buffered row holds a copy of its own tokens only
    assert len(shard.handed) >= 8 and sum(ref() is not None for ref in shard.handed) <= 1
    rest = [b["ids"] for b in it]
    ids = first["ids"] + [i for b in rest for i in b]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40)) and len(rest) == 19


def test_length_grouping_is_deterministic_resumable_and_keeps_the_epochs_batches():
    from phi3v_ray.collate import Phi3VCollate, iter_train_batches

    rng = np.random.default_rng(3)
    shard = _Shard(_length_rows(rng.integers(50, 3000, size=50)))

    def ids(epoch=0, skip=0, window=16, micro=4, **kw):
        it = iter_train_batches(shard, micro, epoch=epoch, seed=5, shuffle_buffer=0, skip_batches=skip,
                                length_window=window, collate_fn=Phi3VCollate(return_ids=True), **kw)
        return [b["ids"] for b in it]

    grouped = ids()
    assert [len(b) for b in grouped] == [4] * 12 + [2]  # ⌈50 / 4⌉ batches, the short one last, as ungrouped
    assert sorted(sum(grouped, [])) == sorted(r["id"] for r in shard.rows)  # every row once
    assert grouped == ids()  # deterministic for (seed, epoch)
    assert ids(skip=5) == grouped[5:]  # a resumed run continues with the same batches
    assert ids(epoch=1) != grouped and sorted(sum(ids(epoch=1), [])) == sorted(sum(grouped, []))
    window = {r["id"] for r in shard.rows[:16]}  # grouping stays inside its window of the stream
    assert {i for b in grouped[:4] for i in b} == window
    assert ids(window=10) == ids(window=12)  # rounded up to whole micro-batches
    assert [len(b) for b in ids(drop_last=True)] == [4] * 12
    ungrouped = [b["ids"] for b in iter_train_batches(shard, 1, 0, 5, 0, collate_fn=Phi3VCollate(return_ids=True))]
    assert ids(micro=1) == ungrouped  # micro-batches of one have nothing to group

    def fraction(window):
        return _padded_fraction(iter_train_batches(shard, 4, 0, 5, 0, length_window=window))

    assert fraction(16) < 0.5 * fraction(0), (fraction(16), fraction(0))


def test_length_grouping_does_not_order_batches_by_length():
    from phi3v_ray.grouping import group_by_length

    rows = _length_rows(range(100, 164))
    widths = [max(len(r["input_ids"]) for r in b) for b in group_by_length(rows, 4, 64, seed=0, epoch=0)]
    assert sorted(widths) == list(range(103, 164, 4)) and widths != sorted(widths)


# ------------------------------------------------------------------------------------ packing
def test_pack_lays_samples_end_to_end_with_restarting_positions_and_renumbered_images(processor, processor2):
    from phi3v_ray.engine import supervised_tokens
    from phi3v_ray.packing import pack

    examples = _rows(processor, processor2)  # 0, 1 and 2 images
    rows = [_as_row(e) for e in examples]
    lengths = [len(e.input_ids) for e in examples]
    batch = pack(rows)
    total = sum(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["cu_seqlens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], total]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["max_seqlen"] == max(lengths)
    assert batch["attention_mask"].sum() == total and batch_stats(batch) == (total, 3)
    at = 0
    for e, n, images_before in zip(examples, lengths, (0, 0, 1)):
        ids = e.input_ids.copy()
        ids[ids < 0] -= images_before  # image k of the sample is image k + (images before it in the row)
        assert batch["input_ids"][0, at:at + n].tolist() == ids.tolist()
        assert batch["position_ids"][0, at:at + n].tolist() == list(range(n))
        assert batch["labels"][0, at] == IGNORE_INDEX  # never predicted from the previous sample
        assert batch["labels"][0, at + 1:at + n].tolist() == e.labels[1:].tolist()
        at += n
    assert sorted(set(batch["input_ids"][batch["input_ids"] < 0].tolist())) == [-3, -2, -1]
    padded = collate(rows)
    assert supervised_tokens(batch) == supervised_tokens(padded)  # the step's loss normalisation is unchanged
    for k in ("pixel_values", "image_sizes"):
        torch.testing.assert_close(batch[k], padded[k], rtol=0, atol=0)  # the same images in the same order


def test_pack_respects_its_token_budget(processor, processor2):
    from phi3v_ray.packing import assign_rows, pack

    assert assign_rows([5, 3, 4, 2], 7) == [[0, 3], [1, 2]]  # longest first, to the least-filled row with room
    assert assign_rows([5, 3, 4, 2]) == [[0, 1, 2, 3]]
    assert assign_rows([2550] * 4, 8192) == [[0, 2], [1, 3]]  # balanced: not 3 + 1 padded to 7650
    assert assign_rows([6, 6, 6], 10) == [[0], [1], [2]]
    examples = _rows(processor, processor2)
    lengths = [len(e.input_ids) for e in examples]
    budget = max(lengths) + min(lengths)
    layout = assign_rows(lengths, budget)
    assert sorted(map(len, layout)) == [1, 2]
    batch = pack([_as_row(e) for e in examples], max_tokens=budget)
    rows, width = batch["input_ids"].shape
    real = batch["attention_mask"].sum(1)
    assert rows == 2 and width <= budget and real.tolist() == [sum(lengths[i] for i in r) for r in layout]
    cu = batch["cu_seqlens"].tolist()
    assert cu[-1] == rows * width and len(cu) == 3 + 1 + 1  # three samples and one row's padding segment
    short = int(real.argmin())
    pad = batch["position_ids"][short, int(real[short]):]
    assert pad.tolist() == list(range(width - int(real[short])))  # the padding is a segment of its own
    assert (batch["labels"][short, int(real[short]):] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="does not fit a packed row"):
        pack([_as_row(e) for e in examples], max_tokens=max(lengths) - 1)


def test_iter_train_batches_packs_grouped_micro_batches():
    from phi3v_ray.collate import Phi3VCollate, iter_train_batches

    shard = _Shard(_length_rows(np.random.default_rng(4).integers(50, 3000, size=24)))
    padded = list(iter_train_batches(shard, 4, 0, 1, length_window=8, collate_fn=Phi3VCollate(return_ids=True)))
    packed = list(iter_train_batches(shard, 4, 0, 1, length_window=8,
                                     collate_fn=Phi3VCollate(return_ids=True, packing=True)))
    assert [b["ids"] for b in packed] == [b["ids"] for b in padded]  # the same samples per micro-batch
    assert _padded_fraction(packed) == 0 and _padded_fraction(padded) > 0
    assert all(b["input_ids"].shape[0] == 1 and b["cu_seqlens"].numel() == 5 for b in packed)


# ------------------------------------------------------------------------------------ the training copy
def test_training_copies_send_no_attention_mask_for_right_padding_only(processor, processor2):
    from phi3v_ray.collate import right_padded, to_device

    rows = [_as_row(e) for e in _rows(processor, processor2)]
    cpu = torch.device("cpu")
    right, left, same = collate(rows), collate(rows, padding_side="left"), collate(rows[:1] * 2)
    assert right_padded(right["attention_mask"]) and right_padded(same["attention_mask"])
    assert not right_padded(left["attention_mask"])
    assert to_device(right, cpu, training=True)["attention_mask"] is None
    assert to_device(same, cpu, training=True)["attention_mask"] is None
    torch.testing.assert_close(to_device(left, cpu, training=True)["attention_mask"], left["attention_mask"])
    torch.testing.assert_close(to_device(right, cpu)["attention_mask"], right["attention_mask"])  # generation, eval


def test_the_pipeline_bench_reports_under_2_percent_padding_on_docvqa_shaped_lengths():
    """bench/pipeline.py --padding: DocVQA-shaped micro-batches of 4 (issue #13's goal: < 2 % padded)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_pipeline", Path(__file__).parents[1] / "bench" / "pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.page_tokens() == {"letter": 2509, "a4": 1933}
    lengths = bench.docvqa_lengths(800, letter_share=0.5)
    rows = {r["layout"]: r for r in bench.padding_rows(lengths, 4, [64], max_length=8192)}
    assert {r["micro_batches"] for r in rows.values()} == {200}
    assert rows["stream order, padded"]["padded_tokens_pct"] > 5
    assert rows["grouped in 64 rows, padded"]["padded_tokens_pct"] < 2
    assert rows["packed, one row"]["padded_tokens_pct"] == 0


def test_ahead_keeps_order_raises_where_the_feed_failed_and_stops_when_closed():
    import threading
    import time

    assert list(ahead(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield from range(3)
        raise ValueError("record 3 is bad")

    got = []
    with pytest.raises(ValueError, match="record 3 is bad"):
        for x in ahead(failing(), depth=2):
            got.append(x)
    assert got == [0, 1, 2]  # every batch before the bad one reached the consumer

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = ahead(endless(), depth=2, name="test-ahead")
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()  # a run that ends mid-epoch
    deadline = time.monotonic() + 5
    while any(t.name == "test-ahead" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "test-ahead" for t in threading.enumerate())
    assert len(produced) <= 5 + 2 + 1  # at most `depth` (+ the one in hand) beyond what was consumed



def test_first_fetched_starts_before_it_is_iterated_and_keeps_order_and_errors():
    import threading

    from phi3v_ray.collate import FirstFetched

    started = threading.Event()

    def epoch(fail_at=None):
        started.set()  # what Ray Data's first `iter_batches` call does: bring up the pipeline
        for i in range(4):
            if i == fail_at:
                raise ValueError(f"record {i} is bad")
            yield i

    first = FirstFetched(epoch())
    assert started.wait(timeout=5)  # fetching began before anyone iterated
    assert list(first) == [0, 1, 2, 3]
    assert list(FirstFetched(iter([]))) == []
    with pytest.raises(ValueError, match="record 0 is bad"):  # the first fetch's error, raised to the consumer
        list(FirstFetched(epoch(fail_at=0)))
    got = []
    with pytest.raises(ValueError, match="record 2 is bad"):
        for x in FirstFetched(epoch(fail_at=2)):
            got.append(x)
    assert got == [0, 1]

    unused = epoch()
    never = FirstFetched(unused)
    never._thread.join(timeout=5)
    never.close()  # a run that failed before it trained releases its feed
    assert list(unused) == []
