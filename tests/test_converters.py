"""Each converter on a tiny fixture in its dataset's official raw layout, written by the test."""

import argparse
import io
import json

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets_ray.convert_cli import add_convert_parser
from datasets_ray.converters import CONVERTERS, ConversionError
from datasets_ray.converters.ucf101 import DEFAULT_CLASSES, frame_indices, prompt
from datasets_ray.schema import iter_jsonl, validate_file


def png(path, colour="red", size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def png_bytes(colour="red", fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format=fmt)
    return buf.getvalue()


def load(out, split):
    """Records of out/{split}.jsonl, after checking the whole file validates."""
    good, n_bad = validate_file(out / f"{split}.jsonl", out / "images")
    assert n_bad == 0
    return good


def write_lines(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i) + "\n" for i in items))


# --------------------------------------------------------------------------------------- ucf101

N_FRAMES = 20


def level(i):
    """Grey level that encodes frame index i (decoded back with round((mean - 10) / 12))."""
    return 10 + 12 * i


def write_avi(path, n=N_FRAMES):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.options = {"qscale": "2"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), level(i), np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def ucf_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("ucf_raw")
    lists = src / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text(
        "".join(f"{i} {c}\n" for i, c in enumerate(DEFAULT_CLASSES, start=1)) + "101 YoYo\n"
    )
    train, test = [], []
    for cls in ("ApplyEyeMakeup", "Archery", "YoYo"):
        for g in (1, 8, 9, 10):
            rel = f"{cls}/v_{cls}_g{g:02d}_c01.avi"
            write_avi(src / "UCF-101" / rel)
            (test if g == 1 else train).append(rel)
    (lists / "trainlist01.txt").write_text("".join(f"{r} 1\n" for r in train))
    (lists / "testlist01.txt").write_text("".join(f"{r}\n" for r in test))
    return src


def test_ucf101_frame_indices():
    assert frame_indices(20) == [0, 2, 5, 7, 10, 12, 15, 17]
    assert frame_indices(8) == list(range(8))
    assert frame_indices(4) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_ucf101_default_classes(ucf_src, tmp_path):
    out = tmp_path / "out"
    counts = CONVERTERS["ucf101"].fn(ucf_src, out)
    # groups 8, 9, 10 in train: val_fraction 0.1 still carves one group (the highest, g10)
    assert counts == {"train": 4, "val": 2, "test": 2}
    train, val, test = load(out, "train"), load(out, "val"), load(out, "test")
    assert {r["id"] for r in val} == {"v_ApplyEyeMakeup_g10_c01", "v_Archery_g10_c01"}
    assert all("_g01_" in r["id"] for r in test)
    assert not any("YoYo" in r["id"] for r in train + val + test)

    r = next(r for r in train if r["id"] == "v_Archery_g08_c01")
    turn = r["conversations"][0]
    assert turn["assistant"] == "Archery" and r["source"] == "ucf101"
    assert turn["images"] == [f"train/Archery/v_Archery_g08_c01.{k}.jpg" for k in range(8)]
    tags = "".join(f"<|image_{k}|>" for k in range(1, 9))
    assert turn["user"] == tags + "\n" + prompt(DEFAULT_CLASSES)
    assert turn["user"].endswith("following classes: ApplyEyeMakeup, ApplyLipstick, Archery, BabyCrawling, "
                                 "BalanceBeam, BandMarching, BaseballPitch, Basketball, BasketballDunk, BenchPress.")

    # the frames saved are floor(k * T / 8), read back from the grey level each frame was drawn with
    got = []
    for rel in turn["images"]:
        with Image.open(out / "images" / rel) as im:
            assert im.size == (64, 48)  # native resolution
            got.append(round((np.asarray(im.convert("L"), np.float32).mean() - 10) / 12))
    assert got == frame_indices(N_FRAMES)


def test_ucf101_class_option_and_no_val(ucf_src, tmp_path):
    out = tmp_path / "out"
    counts = CONVERTERS["ucf101"].fn(ucf_src, out, classes="YoYo,Archery", val_fraction=0)
    assert counts == {"train": 6, "test": 2}
    assert not (out / "val.jsonl").exists()
    r = load(out, "train")[0]
    assert r["conversations"][0]["user"].endswith("following classes: Archery, YoYo.")


def test_ucf101_unknown_class(ucf_src, tmp_path):
    with pytest.raises(ConversionError, match=r"unknown class\(es\) \['Nope'\]"):
        CONVERTERS["ucf101"].fn(ucf_src, tmp_path / "out", classes=["Nope"])


def test_ucf101_unreadable_video(tmp_path):
    src = tmp_path / "raw"
    lists = src / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n")
    bad = src / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a video at all" * 10)
    (lists / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
    (lists / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi\n")
    with pytest.raises(ConversionError, match="v_ApplyEyeMakeup_g08_c01.avi: cannot decode video"):
        CONVERTERS["ucf101"].fn(src, tmp_path / "out", classes="ApplyEyeMakeup", val_fraction=0)


def test_ucf101_missing_video(ucf_src, tmp_path):
    src = tmp_path / "raw"
    (src / "UCF-101").mkdir(parents=True)
    lists = src / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("3 Archery\n")
    (lists / "trainlist01.txt").write_text("Archery/v_Archery_g08_c01.avi 3\n")
    (lists / "testlist01.txt").write_text("")
    with pytest.raises(ConversionError, match="v_Archery_g08_c01.avi: video listed .* not found"):
        CONVERTERS["ucf101"].fn(src, tmp_path / "out", classes="Archery")


# --------------------------------------------------------------------------------------- docvqa


def docvqa_item(qid, doc, answers=None):
    item = {"questionId": qid, "question": f"What is field {qid}?", "image": f"documents/{doc}.png",
            "docId": 1, "ucsf_document_id": "x", "ucsf_document_page_no": "1", "data_split": "train"}
    if answers is not None:
        item["answers"] = answers
    return item


@pytest.fixture
def docvqa_src(tmp_path):
    src = tmp_path / "raw"
    for doc in ("d1", "d2", "d3"):
        png(src / "train" / "documents" / f"{doc}.png")
    (src / "train" / "train_v1.0.json").write_text(json.dumps({"dataset_name": "docvqa", "data": [
        docvqa_item(1, "d1", ["$12", "12 dollars"]), docvqa_item(2, "d1", ["Smith"]),
    ]}))
    png(src / "val" / "documents" / "d2.png")
    (src / "val" / "val_v1.0_withQT.json").write_text(json.dumps({"data": [docvqa_item(3, "d2", ["1999"])]}))
    png(src / "test" / "documents" / "d3.png")
    (src / "test" / "test_v1.0.json").write_text(json.dumps({"data": [docvqa_item(4, "d3")]}))
    return src


def test_docvqa(docvqa_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert CONVERTERS["docvqa"].fn(docvqa_src, out) == {"train": 2, "val": 1}
    assert "skipping test_v1.0.json" in capsys.readouterr().out
    train = load(out, "train")
    assert train[0] == {
        "id": "1", "source": "docvqa", "answers": ["$12", "12 dollars"],
        "conversations": [{"images": ["train/d1.png"], "user": "<|image_1|>\nWhat is field 1?",
                           "assistant": "$12"}],
    }
    assert load(out, "val")[0]["answers"] == ["1999"]


def test_docvqa_include_test(docvqa_src, tmp_path):
    out = tmp_path / "out"
    counts = CONVERTERS["docvqa"].fn(docvqa_src, out, include_test=True)
    assert counts == {"train": 2, "val": 1, "test_noanswer": 1}
    (_, line), = iter_jsonl(out / "test_noanswer.jsonl")
    rec = json.loads(line)
    assert rec["answers"] == [] and rec["conversations"][0]["assistant"] == ""
    assert (out / "images" / rec["conversations"][0]["images"][0]).is_file()


def test_docvqa_missing_image(docvqa_src, tmp_path):
    (docvqa_src / "val" / "documents" / "d2.png").unlink()
    with pytest.raises(ConversionError, match=r"val_v1.0_withQT.json item 0: image 'documents/d2.png' not found"):
        CONVERTERS["docvqa"].fn(docvqa_src, tmp_path / "out")


def test_docvqa_missing_answers(docvqa_src, tmp_path):
    (docvqa_src / "val" / "val_v1.0_withQT.json").write_text(json.dumps({"data": [docvqa_item(3, "d2")]}))
    with pytest.raises(ConversionError, match=r"item 0 \(questionId=3\): no answers"):
        CONVERTERS["docvqa"].fn(docvqa_src, tmp_path / "out")


# -------------------------------------------------------------------------------- hateful memes


@pytest.fixture
def memes_src(tmp_path):
    src = tmp_path / "raw"
    for split, rows in {"train": [(1235, 1), (42953, 0)], "dev_seen": [(8291, 1)], "test_seen": [(16395, 0)]}.items():
        items = []
        for mid, label in rows:
            png(src / "img" / f"{mid:05d}.png")
            items.append({"id": mid, "img": f"img/{mid:05d}.png", "label": label, "text": "some meme text"})
        write_lines(src / f"{split}.jsonl", items)
    return src


def test_hateful_memes(memes_src, tmp_path):
    out = tmp_path / "out"
    assert CONVERTERS["hateful_memes"].fn(memes_src, out) == {"train": 2, "val": 1, "test": 1}
    train = load(out, "train")
    assert train[0]["conversations"] == [{"images": ["img/01235.png"],
                                          "user": "<|image_1|>\nIs this meme hateful? Answer yes or no.",
                                          "assistant": "yes"}]
    assert train[1]["conversations"][0]["assistant"] == "no" and train[1]["id"] == "42953"


def test_hateful_memes_missing_field(memes_src, tmp_path):
    write_lines(memes_src / "dev_seen.jsonl", [{"id": 1, "img": "img/08291.png", "text": "x"}])
    with pytest.raises(ConversionError, match=r"dev_seen.jsonl:1: missing field 'label'"):
        CONVERTERS["hateful_memes"].fn(memes_src, tmp_path / "out")


def test_hateful_memes_missing_split_file(memes_src, tmp_path):
    (memes_src / "test_seen.jsonl").unlink()
    with pytest.raises(ConversionError, match="test_seen.jsonl: Hateful Memes split file for 'test' not found"):
        CONVERTERS["hateful_memes"].fn(memes_src, tmp_path / "out")


# ---------------------------------------------------------------------------------------- nlvr2


@pytest.fixture
def nlvr2_src(tmp_path):
    src = tmp_path / "raw"
    items = {"train": [("train-10171-0-0", "True", 65), ("train-10171-0-1", "False", 65)],
             "dev": [("dev-850-0-0", "False", None)], "test1": [("test1-12-1-0", "True", None)]}
    for split, rows in items.items():
        lines = []
        for ident, label, directory in rows:
            stem = ident.rsplit("-", 1)[0]
            folder = src / "images" / split / (str(directory) if directory is not None else "")
            for i in (0, 1):
                png(folder / f"{stem}-img{i}.png", colour=("red", "blue")[i])
            item = {"identifier": ident, "sentence": "There are two dogs.", "label": label,
                    "left_url": "http://x", "right_url": "http://y", "writer": "1", "synset": "dog"}
            if directory is not None:
                item["directory"] = directory
            lines.append(item)
        write_lines(src / "data" / f"{split}.json", lines)
    return src


def test_nlvr2(nlvr2_src, tmp_path):
    out = tmp_path / "out"
    assert CONVERTERS["nlvr2"].fn(nlvr2_src, out) == {"train": 2, "val": 1, "test": 1}
    train = load(out, "train")
    assert train[0]["id"] == "train-10171-0-0"
    assert train[0]["conversations"] == [{
        "images": ["train/train-10171-0-img0.png", "train/train-10171-0-img1.png"],
        "user": "<|image_1|><|image_2|>\nThere are two dogs. Answer yes or no.", "assistant": "yes"}]
    assert train[1]["conversations"][0]["assistant"] == "no"
    assert load(out, "val")[0]["conversations"][0]["images"] == ["dev/dev-850-0-img0.png", "dev/dev-850-0-img1.png"]


def test_nlvr2_missing_images(nlvr2_src, tmp_path, capsys):
    (nlvr2_src / "images" / "dev" / "dev-850-0-img1.png").unlink()
    with pytest.raises(ConversionError, match=r"dev.json:1: images for dev-850-0-0 not found"):
        CONVERTERS["nlvr2"].fn(nlvr2_src, tmp_path / "out")
    counts = CONVERTERS["nlvr2"].fn(nlvr2_src, tmp_path / "out2", skip_missing_images=True)
    assert counts["val"] == 0 and "skipped 1 example" in capsys.readouterr().out


def test_nlvr2_bad_label(nlvr2_src, tmp_path):
    write_lines(nlvr2_src / "data" / "test1.json", [{"identifier": "test1-12-1-0", "sentence": "s", "label": "maybe"}])
    with pytest.raises(ConversionError, match="test1.json:1: label must be True or False"):
        CONVERTERS["nlvr2"].fn(nlvr2_src, tmp_path / "out")


# ------------------------------------------------------------------------------------- cauldron

CAULDRON_SCHEMA = pa.schema([
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("texts", pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))),
])


def write_cauldron(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CAULDRON_SCHEMA), path)


def test_cauldron(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    write_cauldron(src / "docvqa" / "train-00000-of-00001.parquet", [{
        "images": [{"bytes": png_bytes("red"), "path": None}],
        "texts": [{"user": "What is the date?", "assistant": "1999", "source": "docvqa"},
                  {"user": "Who signed?", "assistant": "Smith", "source": "docvqa"}],
    }])
    write_cauldron(src / "nlvr2" / "train-00000-of-00001.parquet", [{
        "images": [{"bytes": png_bytes("red", "JPEG"), "path": None}, {"bytes": png_bytes("blue"), "path": None}],
        "texts": [{"user": "Two dogs. True or False?", "assistant": "True", "source": "nlvr2"}],
    }])
    assert CONVERTERS["cauldron"].fn(src, out) == {"train": 2}
    doc, nlvr = load(out, "train")
    assert doc["id"] == "docvqa-train-00000-of-00001-0" and doc["source"] == "cauldron/docvqa"
    turns = doc["conversations"]
    assert turns[0]["user"] == "<|image_1|>\nWhat is the date?" and len(turns[0]["images"]) == 1
    assert turns[1] == {"images": [], "user": "Who signed?", "assistant": "Smith"}
    assert nlvr["conversations"][0]["user"] == "<|image_1|><|image_2|>\nTwo dogs. True or False?"
    first, second = nlvr["conversations"][0]["images"]
    assert first.endswith(".jpg") and second.endswith(".png")
    with Image.open(out / "images" / second) as im:
        assert im.getpixel((0, 0)) == (0, 0, 255)
    # subsets option picks folders
    assert CONVERTERS["cauldron"].fn(src, tmp_path / "o2", subsets="nlvr2") == {"train": 1}


def test_cauldron_bad_image_bytes(tmp_path):
    src = tmp_path / "raw"
    write_cauldron(src / "hateful_memes" / "train-00000.parquet", [{
        "images": [{"bytes": b"\x89PNG garbage", "path": None}],
        "texts": [{"user": "Hateful?", "assistant": "no", "source": "x"}],
    }])
    with pytest.raises(ConversionError, match=r"train-00000.parquet row 0: image bytes cannot be decoded"):
        CONVERTERS["cauldron"].fn(src, tmp_path / "out")


# ---------------------------------------------------------------------------------- docvqa_mini


def test_docvqa_mini(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    (src / "data").mkdir(parents=True)
    for split, n in (("train", 3), ("test", 1)):
        rows = [{"id": f"{split}_{i}", "image": {"bytes": png_bytes(), "path": None},
                 "query": {"en": f"What is {i}?", "de": f"Was ist {i}?"},
                 "answers": [f"ans{i}", f"Ans {i}"], "words": ["a"], "answer": None} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), src / "data" / f"{split}-00000-of-00001.parquet")
    assert CONVERTERS["docvqa_mini"].fn(src, out) == {"test": 1, "train": 3}
    r = load(out, "train")[2]
    assert r["id"] == "train_2" and r["answers"] == ["ans2", "Ans 2"]
    assert r["conversations"][0]["user"] == "<|image_1|>\nWhat is 2?" and r["conversations"][0]["assistant"] == "ans2"
    # identical image bytes are stored once
    assert len(list((out / "images" / "train").iterdir())) == 1
    assert load(out, "test")[0]["id"] == "test_0"
    CONVERTERS["docvqa_mini"].fn(src, tmp_path / "de", language="de")
    assert load(tmp_path / "de", "train")[0]["conversations"][0]["user"].endswith("Was ist 0?")


def test_docvqa_mini_missing_column(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "1", "query": {"en": "q"}, "answers": ["a"]}]), src / "train.parquet")
    with pytest.raises(ConversionError, match=r"train.parquet: missing column\(s\) \['image'\]"):
        CONVERTERS["docvqa_mini"].fn(src, tmp_path / "out")


# -------------------------------------------------------------------------------------- generic


def test_generic_csv_paths(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    png(src / "pics" / "a.png")
    png(src / "pics" / "b.png")
    (src / "train.csv").parent.mkdir(parents=True, exist_ok=True)
    (src / "train.csv").write_text("qid,file,q,a\n7,pics/a.png,What?,cat\n8,pics/b.png,<|image_1|> Which?,dog\n")
    (src / "val.csv").write_text("qid,file,q,a\n9,pics/a.png,What?,cat\n")
    counts = CONVERTERS["generic"].fn(src, out, image_col="file", question_col="q", answer_col="a", id_col="qid")
    assert counts == {"train": 2, "val": 1}
    train = load(out, "train")
    assert train[0] == {"id": "7", "source": "generic", "conversations": [
        {"images": ["pics/a.png"], "user": "<|image_1|>\nWhat?", "assistant": "cat"}]}
    assert train[1]["conversations"][0]["user"] == "<|image_1|> Which?"  # tags already there: kept


def test_generic_parquet_bytes_and_jsonl_lists(tmp_path):
    out = tmp_path / "out"
    table = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist([{"img": png_bytes("green"), "question": "Colour?", "answer": "green"}]), table)
    assert CONVERTERS["generic"].fn(table, out, image_col="img", split="val", source="mine") == {"val": 1}
    r = load(out, "val")[0]
    assert r["id"] == "val-mine-0" and r["source"] == "mine"

    png(tmp_path / "elsewhere" / "x.png")
    write_lines(tmp_path / "t" / "test.jsonl",
                [{"image": ["x.png", "x.png"], "question": "Same?", "answer": ["yes", "Yes"]}])
    CONVERTERS["generic"].fn(tmp_path / "t", out, images_root=tmp_path / "elsewhere")
    r = load(out, "test")[0]
    assert r["answers"] == ["yes", "Yes"] and r["conversations"][0]["user"] == "<|image_1|><|image_2|>\nSame?"


def test_generic_errors(tmp_path):
    src = tmp_path / "raw"
    write_lines(src / "train.jsonl", [{"image": "a.png", "question": "q?"}])
    with pytest.raises(ConversionError, match=r"train.jsonl:1: missing field\(s\) \['answer'\]"):
        CONVERTERS["generic"].fn(src, tmp_path / "out")
    write_lines(src / "train.jsonl", [{"image": "a.png", "question": "q?", "answer": "x"}])
    with pytest.raises(ConversionError, match=r"raw/a.png: image named at .*train.jsonl row 0 not found"):
        CONVERTERS["generic"].fn(src, tmp_path / "out")
    write_lines(src / "train.jsonl", [{"image": "../a.png", "question": "q?", "answer": "x"}])
    with pytest.raises(ConversionError, match="unsafe"):
        CONVERTERS["generic"].fn(src, tmp_path / "out")


# ------------------------------------------------------------------------------------------ cli


def cli(argv):
    parser = argparse.ArgumentParser(prog="phi3v-ray")
    add_convert_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert(memes_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["convert", "hateful_memes", "--src", str(memes_src), "--out", str(out),
                "-o", "splits=train:train,val:dev_seen"]) == 0
    printed = capsys.readouterr().out
    assert "train: 2 records validated" in printed and "val: 1 records validated" in printed
    assert not (out / "test.jsonl").exists()


def test_cli_rejects_unknown_option(memes_src, tmp_path, capsys):
    assert cli(["convert", "hateful_memes", "--src", str(memes_src), "--out", str(tmp_path), "-o", "nope=1"]) == 2
    assert "has no option(s) ['nope']" in capsys.readouterr().err


def test_cli_reports_conversion_error(tmp_path, capsys):
    assert cli(["convert", "hateful_memes", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "train.jsonl: Hateful Memes split file" in capsys.readouterr().err


def test_registry_documents_every_option():
    import inspect

    for name, conv in CONVERTERS.items():
        params = inspect.signature(conv.fn).parameters
        keyword_only = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
        assert keyword_only == set(conv.options), name


def test_converters_need_no_torch_or_ray():
    import subprocess
    import sys

    code = ("import sys, datasets_ray.converters, datasets_ray.convert_cli, datasets_ray.demo; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
