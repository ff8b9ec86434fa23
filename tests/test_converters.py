"""Each converter on a tiny fixture in its dataset's official raw layout, written by the test."""

import argparse
import io
import json
import tarfile

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets_ray.convert_cli import add_convert_parser
from datasets_ray.converters import CONVERTERS, ConversionError
from datasets_ray.converters._common import write_splits
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


def assert_nothing_written(out):
    """After a failed run: no split file and no temporary file in `out` (images may be there)."""
    left = sorted(p.name for p in out.iterdir() if p.name != "images") if out.exists() else []
    assert left == []


# ---------------------------------------------------------------------------------- write_splits


def test_write_splits_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    assert write_splits(out, {"train": [{"id": "a"}], "val": iter([{"id": "b"}, {"id": "c"}])}) == {
        "train": 1, "val": 2}
    assert [json.loads(t) for _, t in iter_jsonl(out / "val.jsonl")] == [{"id": "b"}, {"id": "c"}]

    def failing():
        yield {"id": "x"}
        raise ConversionError("record 2 is bad")

    before = (out / "train.jsonl").read_text()
    with pytest.raises(ConversionError, match="record 2 is bad"):
        write_splits(out, {"train": [{"id": "new"}], "val": failing()})
    # the earlier, finished train.jsonl is untouched, and no temporary file is left
    assert (out / "train.jsonl").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl", "val.jsonl"]
    with pytest.raises(ConversionError, match="not a plain file name"):
        write_splits(out, {"../escape": []})


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
    (lists / "testlist01.txt").write_text("")  # every listed video is checked to exist before decoding
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


def test_ucf101_failed_run_writes_no_split(tmp_path):
    src = tmp_path / "raw"
    lists = src / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n")
    write_avi(src / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi", n=8)
    bad = src / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi"
    bad.write_bytes(b"broken" * 20)
    (lists / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
    (lists / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="v_ApplyEyeMakeup_g01_c01.avi: cannot decode video"):
        CONVERTERS["ucf101"].fn(src, out, classes="ApplyEyeMakeup", val_fraction=0)
    assert_nothing_written(out)  # train was converted first, yet no train.jsonl is left


# The recipe's own download: UCF101_subset/{train,val,test}/<Class>/*.avi, here 2 classes.
SUBSET = {
    "train": [("Archery", 8), ("Archery", 9), ("BenchPress", 8), ("BenchPress", 9)],
    "val": [("Archery", 10), ("BenchPress", 10)],
    "test": [("Archery", 1), ("BenchPress", 1), ("BenchPress", 2)],
}


@pytest.fixture(scope="module")
def ucf_subset(tmp_path_factory):
    """(parent folder holding the extracted UCF101_subset/, folder holding UCF101_subset.tar.gz)."""
    base = tmp_path_factory.mktemp("ucf_subset")
    tree = base / "extracted" / "UCF101_subset"
    for split, clips in SUBSET.items():
        # written in reverse, so creation order is not the order the records come out in
        for cls, g in reversed(clips):
            write_avi(tree / split / cls / f"v_{cls}_g{g:02d}_c01.avi")
    (tree / "train" / "Archery" / "notes.txt").write_text("not a clip")
    packed = base / "packed"
    packed.mkdir()
    with tarfile.open(packed / "UCF101_subset.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="UCF101_subset")
        link = tarfile.TarInfo("UCF101_subset/train/Archery/v_Archery_g03_c01.avi")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        evil = b"x" * 10
        info = tarfile.TarInfo("UCF101_subset/train/../evil.avi")
        info.size = len(evil)
        tar.addfile(info, io.BytesIO(evil))
    return base / "extracted", packed


def test_ucf101_subset_tree_keeps_its_split(ucf_subset, tmp_path, capsys):
    extracted, _ = ucf_subset
    out = tmp_path / "out"
    assert CONVERTERS["ucf101"].fn(extracted, out) == {"train": 4, "val": 2, "test": 3}
    assert "UCF101_subset layout, its own train/val/test split kept (4/2/3 clips, 2 classes)" in capsys.readouterr().out
    train, val, test = load(out, "train"), load(out, "val"), load(out, "test")
    # ids are the video names, records in sorted (class, name) order: not directory listing order
    assert [r["id"] for r in train] == ["v_Archery_g08_c01", "v_Archery_g09_c01",
                                        "v_BenchPress_g08_c01", "v_BenchPress_g09_c01"]
    assert [r["id"] for r in val] == ["v_Archery_g10_c01", "v_BenchPress_g10_c01"]
    assert [r["conversations"][0]["assistant"] for r in test] == ["Archery", "BenchPress", "BenchPress"]

    turn = train[2]["conversations"][0]
    assert turn["images"] == [f"train/BenchPress/v_BenchPress_g08_c01.{k}.jpg" for k in range(8)]
    tags = "".join(f"<|image_{k}|>" for k in range(1, 9))
    assert turn["user"] == tags + "\n" + "Classify the video into one of the following classes: Archery, BenchPress."
    got = []
    for rel in turn["images"]:
        with Image.open(out / "images" / rel) as im:
            assert im.size == (64, 48)
            got.append(round((np.asarray(im.convert("L"), np.float32).mean() - 10) / 12))
    assert got == frame_indices(N_FRAMES)

    # src may also be the UCF101_subset folder itself; the class option picks classes
    counts = CONVERTERS["ucf101"].fn(extracted / "UCF101_subset", tmp_path / "o2", classes="BenchPress")
    assert counts == {"train": 2, "val": 1, "test": 2}
    assert load(tmp_path / "o2", "val")[0]["conversations"][0]["user"].endswith("following classes: BenchPress.")


def test_ucf101_subset_tarball(ucf_subset, tmp_path):
    extracted, packed = ucf_subset
    from_tree, from_tar, from_folder = tmp_path / "tree", tmp_path / "tar", tmp_path / "folder"
    CONVERTERS["ucf101"].fn(extracted, from_tree)
    assert CONVERTERS["ucf101"].fn(packed / "UCF101_subset.tar.gz", from_tar) == {"train": 4, "val": 2, "test": 3}
    assert CONVERTERS["ucf101"].fn(packed, from_folder) == {"train": 4, "val": 2, "test": 3}  # folder holding it
    for split in ("train", "val", "test"):
        expected = (from_tree / f"{split}.jsonl").read_text()
        assert (from_tar / f"{split}.jsonl").read_text() == expected
        assert (from_folder / f"{split}.jsonl").read_text() == expected
        load(from_tar, split)
    # the unpacked clips are gone; the link and the '..' member were never written
    assert sorted(p.name for p in from_tar.iterdir()) == ["images", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert not list(tmp_path.rglob("evil.avi")) and not list(tmp_path.rglob("*g03*"))


def test_ucf101_subset_errors(ucf_subset, tmp_path):
    extracted, packed = ucf_subset
    with pytest.raises(ConversionError, match=r"comes split into train/val/test .* \['val_fraction'\]"):
        CONVERTERS["ucf101"].fn(extracted, tmp_path / "o", val_fraction=0.2)
    with pytest.raises(ConversionError,
                       match=r"unknown class\(es\) \['YoYo'\]; the subset has \['Archery', 'BenchPress'\]"):
        CONVERTERS["ucf101"].fn(packed, tmp_path / "o", classes="YoYo")
    assert_nothing_written(tmp_path / "o")  # nor the temporary unpack folder

    broken = tmp_path / "UCF101_subset.tar.gz"
    broken.write_bytes((packed / "UCF101_subset.tar.gz").read_bytes()[:300])
    with pytest.raises(ConversionError, match="UCF101_subset.tar.gz: cannot read the tarball"):
        CONVERTERS["ucf101"].fn(broken, tmp_path / "o2")
    assert_nothing_written(tmp_path / "o2")
    with pytest.raises(ConversionError, match=r"no UCF-101 download found; expected UCF-101/ \+ ucfTrainTestlist/"):
        CONVERTERS["ucf101"].fn(tmp_path / "o2", tmp_path / "o3")


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
    assert_nothing_written(tmp_path / "out")  # train converted fine, yet no train.jsonl is left


@pytest.fixture
def docvqa_rrc(tmp_path):
    """The RRC downloads unpacked side by side: spdocvqa_qas/*.json and a flat spdocvqa_images/."""
    src = tmp_path / "rrc"
    for doc in ("d1", "d2", "d3"):
        png(src / "spdocvqa_images" / f"{doc}.png", colour="green")
    (src / "spdocvqa_ocr").mkdir()
    qas = src / "spdocvqa_qas"
    qas.mkdir()
    (qas / "train_v1.0_withQT.json").write_text(json.dumps({"data": [docvqa_item(1, "d1", ["$12"])]}))
    (qas / "val_v1.0_withQT.json").write_text(json.dumps({"data": [docvqa_item(3, "d2", ["1999"])]}))
    (qas / "test_v1.0.json").write_text(json.dumps({"data": [docvqa_item(4, "d3")]}))
    return src


@pytest.mark.parametrize("where", ["parent", "qas"])
def test_docvqa_rrc_layout_finds_images_beside(docvqa_rrc, tmp_path, where, capsys):
    src = docvqa_rrc if where == "parent" else docvqa_rrc / "spdocvqa_qas"
    out = tmp_path / "out"
    assert CONVERTERS["docvqa"].fn(src, out, include_test=True) == {"train": 1, "val": 1, "test_noanswer": 1}
    assert "spdocvqa_images" in capsys.readouterr().out
    assert load(out, "train")[0]["conversations"][0]["images"] == ["train/d1.png"]
    assert load(out, "val")[0]["answers"] == ["1999"]
    with Image.open(out / "images" / "val" / "d2.png") as im:
        assert im.getpixel((0, 0)) == (0, 128, 0)


def test_docvqa_rrc_missing_image_names_the_folders(docvqa_rrc, tmp_path):
    (docvqa_rrc / "spdocvqa_images" / "d2.png").unlink()
    with pytest.raises(ConversionError, match=r"image 'documents/d2.png' not found next to val_v1.0_withQT.json "
                                              r"or in .*spdocvqa_images"):
        CONVERTERS["docvqa"].fn(docvqa_rrc, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


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


def write_memes(folder, files):
    """folder/{name}.jsonl + folder/img/ from {name: [(id, label or None), ...]}."""
    for name, rows in files.items():
        items = []
        for mid, label in rows:
            png(folder / "img" / f"{mid:05d}.png")
            item = {"id": mid, "img": f"img/{mid:05d}.png", "text": "meme text"}
            if label is not None:
                item["label"] = label
            items.append(item)
        write_lines(folder / f"{name}.jsonl", items)


@pytest.fixture
def memes_phase1(tmp_path):
    """The phase-1 release: data/{train,dev,test}.jsonl, the test set without labels."""
    src = tmp_path / "phase1"
    write_memes(src / "data", {"train": [(1235, 1), (42953, 0)], "dev": [(8291, 1)],
                               "test": [(16395, None), (7, None)]})
    (src / "data" / "README.md").write_text("phase 1")
    return src


@pytest.mark.parametrize("inside", [False, True])
def test_hateful_memes_phase1(memes_phase1, tmp_path, capsys, inside):
    src = memes_phase1 / "data" if inside else memes_phase1
    out = tmp_path / "out"
    assert CONVERTERS["hateful_memes"].fn(src, out) == {"train": 2, "val": 1, "test_noanswer": 2}
    printed = capsys.readouterr().out
    assert "phase-1 release" in printed
    assert "test.jsonl has no labels" in printed and "test_noanswer.jsonl for prediction only" in printed
    assert load(out, "val")[0]["conversations"][0]["assistant"] == "yes"
    rows = [json.loads(t) for _, t in iter_jsonl(out / "test_noanswer.jsonl")]
    assert [r["id"] for r in rows] == ["16395", "7"]
    assert rows[0]["conversations"] == [{"images": ["img/16395.png"],
                                         "user": "<|image_1|>\nIs this meme hateful? Answer yes or no.",
                                         "assistant": ""}]
    assert (out / "images" / "img" / "00007.png").is_file()


def test_hateful_memes_phase2_under_data(tmp_path, capsys):
    src = tmp_path / "phase2"
    write_memes(src / "data", {"train": [(1, 0)], "dev_seen": [(2, 1)], "test_seen": [(3, 0)],
                               "dev_unseen": [(4, 1)], "test_unseen": [(5, 0)]})
    out = tmp_path / "out"
    assert CONVERTERS["hateful_memes"].fn(src, out) == {"train": 1, "val": 1, "test": 1}
    assert "phase-2 release" in capsys.readouterr().out
    assert load(out, "test")[0]["id"] == "3"
    counts = CONVERTERS["hateful_memes"].fn(src, tmp_path / "o2", splits="val:dev_unseen,test:test_unseen")
    assert counts == {"val": 1, "test": 1} and load(tmp_path / "o2", "val")[0]["id"] == "4"


def test_hateful_memes_labels_needed(memes_phase1, tmp_path):
    data = memes_phase1 / "data"
    write_lines(data / "test.jsonl", [{"id": 1, "img": "img/16395.png", "label": 0},
                                      {"id": 2, "img": "img/00007.png"}])
    with pytest.raises(ConversionError, match=r"test.jsonl:2: missing field 'label' \(other lines of this file"):
        CONVERTERS["hateful_memes"].fn(memes_phase1, tmp_path / "out")
    write_lines(data / "dev.jsonl", [{"id": 1, "img": "img/08291.png"}])
    with pytest.raises(ConversionError,
                       match=r"dev.jsonl:1: missing field 'label' \(split 'val' is trained or scored on"):
        CONVERTERS["hateful_memes"].fn(memes_phase1, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_hateful_memes_failed_run_writes_no_split(memes_src, tmp_path):
    write_lines(memes_src / "test_seen.jsonl", [{"id": 1, "img": "img/01235.png", "label": 2}])
    with pytest.raises(ConversionError, match="test_seen.jsonl:1: label must be 0 or 1, got 2"):
        CONVERTERS["hateful_memes"].fn(memes_src, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


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
    assert_nothing_written(tmp_path / "out")  # no train.jsonl from the split that did convert
    counts = CONVERTERS["nlvr2"].fn(nlvr2_src, tmp_path / "out2", skip_missing_images=True)
    assert counts["val"] == 0 and "skipped 1 example" in capsys.readouterr().out


def nlvr2_clone(root, images_at):
    """The GitHub clone `root/nlvr/` (json in nlvr2/data/) with the image zips unpacked in
    `images_at`: images/train/<directory>/, and dev/, test1/ beside images/ (not under it)."""
    data = root / "nlvr" / "nlvr2" / "data"
    (root / "nlvr" / "nlvr" / "train").mkdir(parents=True)  # NLVR1 lives in the clone too
    (root / "nlvr" / "README.md").write_text("clone")
    items = {"train": [("train-10171-0-0", "True", 65), ("train-7-1-1", "False", 3)],
             "dev": [("dev-850-0-0", "False", None)], "test1": [("test1-12-1-0", "True", None)]}
    for split, rows in items.items():
        lines = []
        for ident, label, directory in rows:
            stem = ident.rsplit("-", 1)[0]
            folder = images_at / "images" / "train" / str(directory) if split == "train" else images_at / split
            for i in (0, 1):
                png(folder / f"{stem}-img{i}.png", colour=("red", "blue")[i])
            item = {"identifier": ident, "sentence": "Two dogs.", "label": label}
            if directory is not None:
                item["directory"] = directory
            lines.append(item)
        write_lines(data / f"{split}.json", lines)
    # an official ".png" that holds JPEG data: linked as it is
    jpeg = images_at / "dev" / "dev-850-0-img1.png"
    Image.new("RGB", (8, 6), "yellow").save(jpeg, format="JPEG")
    (data / "balanced").mkdir()
    return data


@pytest.mark.parametrize("images_beside_clone", [False, True])
@pytest.mark.parametrize("src_at", ["clone", "parent", "nlvr2", "data"])
def test_nlvr2_github_clone_layout(tmp_path, src_at, images_beside_clone):
    root = tmp_path / "raw"
    data = nlvr2_clone(root, root if images_beside_clone else root / "nlvr")
    src = {"clone": root / "nlvr", "parent": root, "nlvr2": data.parent, "data": data}[src_at]
    out = tmp_path / "out"
    assert CONVERTERS["nlvr2"].fn(src, out) == {"train": 2, "val": 1, "test": 1}
    train, val = load(out, "train"), load(out, "val")
    assert train[1]["conversations"][0]["images"] == ["train/train-7-1-img0.png", "train/train-7-1-img1.png"]
    assert val[0]["conversations"][0]["images"] == ["dev/dev-850-0-img0.png", "dev/dev-850-0-img1.png"]
    assert load(out, "test")[0]["conversations"][0]["assistant"] == "yes"
    images_at = root if images_beside_clone else root / "nlvr"
    jpeg = out / "images" / "dev" / "dev-850-0-img1.png"
    assert jpeg.read_bytes() == (images_at / "dev" / "dev-850-0-img1.png").read_bytes()
    with Image.open(jpeg) as im:
        assert im.format == "JPEG"


def test_nlvr2_clone_without_image_folder(tmp_path):
    root = tmp_path / "raw"
    nlvr2_clone(root, root / "nlvr")
    for f in (root / "nlvr" / "test1").iterdir():
        f.unlink()
    (root / "nlvr" / "test1").rmdir()
    with pytest.raises(ConversionError, match=r"test1.json: image folder 'test1/' not found in .*; unpack test1.zip"):
        CONVERTERS["nlvr2"].fn(root / "nlvr", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


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


def test_cli_convert_prediction_only_split(memes_phase1, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["convert", "hateful_memes", "--src", str(memes_phase1), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "val: 1 records validated" in printed
    assert "wrote 2 records to" in printed
    assert "test_noanswer: no answers, for prediction only (not validated)" in printed


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
