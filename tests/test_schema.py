"""The record format: every way a record can be bad is caught, named, and (in skip mode) kept."""

import json
import os
import pickle

import pytest
from PIL import Image

from datasets_ray.schema import BadRecord, iter_jsonl, parse_line, validate_file, validate_record, write_jsonl
from phi3v_ray.constants import image_tag, image_tags


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        Image.new("RGB", (4, 4), "red").save(images / name)
    return images


def rec(rid="r1", images=("a.png",), user=None, assistant="yes", **extra):
    images = list(images)
    if user is None:
        user = "".join(f"<|image_{k}|>" for k in range(1, len(images) + 1)) + "\nQ?"
    return {"id": rid, "source": "t", "conversations": [{"images": images, "user": user, "assistant": assistant}],
            **extra}


def bad_reason(record, root, **kw) -> str:
    with pytest.raises(BadRecord) as e:
        validate_record(record, root, **kw)
    return e.value.reason


def test_good_record_is_normalised(root):
    out = validate_record(rec(images=["./sub/c.png"], answers=["x"]), root)
    assert out["conversations"][0]["images"] == ["sub/c.png"]
    assert out["answers"] == ["x"]


def test_tags_may_be_omitted(root):
    validate_record(rec(images=["a.png", "b.png"], user="no tags here"), root)


def test_multi_turn_tags_are_global(root):
    r = {"id": "m", "source": "t", "conversations": [
        {"images": ["a.png"], "user": "<|image_1|>\nfirst", "assistant": "x"},
        {"images": ["b.png", "sub/c.png"], "user": "<|image_2|><|image_3|>\nsecond", "assistant": "y"},
    ]}
    images = [t["images"] for t in validate_record(r, root)["conversations"]]
    assert images == [["a.png"], ["b.png", "sub/c.png"]]
    r["conversations"][1]["user"] = "<|image_1|><|image_2|>\nsecond"
    assert "expected tags [2, 3]" in bad_reason(r, root)


def test_image_tags():
    assert image_tags("<|image_2|>x<|image_10|><|image_2|>") == [2, 10, 2]
    assert image_tags("<image>") == []
    assert image_tags(image_tag(3) + image_tag(12)) == [3, 12]


def test_malformed_json_line():
    with pytest.raises(BadRecord) as e:
        parse_line('{"id": "x",', "data/train.jsonl", 17)
    assert str(e.value).startswith("data/train.jsonl:17: malformed JSON")


def test_non_object_line():
    with pytest.raises(BadRecord, match="expected a JSON object"):
        parse_line("[1, 2]", "f.jsonl", 1)


@pytest.mark.parametrize("field", ["id", "source", "conversations"])
def test_missing_field(root, field):
    r = rec()
    del r[field]
    assert bad_reason(r, root) == f"missing required field '{field}'"


def test_wrong_field_type(root):
    assert "must be str" in bad_reason(rec(rid=5), root)


def test_missing_turn_field(root):
    r = rec()
    del r["conversations"][0]["assistant"]
    assert "missing 'assistant'" in bad_reason(r, root)


def test_empty_conversations(root):
    r = rec()
    r["conversations"] = []
    assert "empty" in bad_reason(r, root)


def test_missing_image_message(root):
    with pytest.raises(BadRecord) as e:
        validate_record(rec(rid="abc", images=["x.jpg"]), root, path="data/train.jsonl", line=17)
    assert str(e.value) == f"data/train.jsonl:17 (id=abc): image 'x.jpg' does not exist under {root}"
    assert (e.value.path, e.value.line, e.value.record_id) == ("data/train.jsonl", 17, "abc")


def test_image_that_is_a_directory(root):
    assert "does not exist" in bad_reason(rec(images=["sub"]), root)


def test_dotdot_escape(root):
    (root.parent / "outside.png").write_bytes((root / "a.png").read_bytes())
    assert "'..'" in bad_reason(rec(images=["../outside.png"]), root)


def test_absolute_path(root):
    assert "absolute" in bad_reason(rec(images=[str(root / "a.png")]), root)


def test_symlink_out_of_root(root):
    target = root.parent / "secret.png"
    target.write_bytes((root / "a.png").read_bytes())
    os.symlink(target, root / "link.png")
    assert "outside" in bad_reason(rec(images=["link.png"]), root)


def test_symlink_inside_root_is_fine(root):
    os.symlink(root / "a.png", root / "alias.png")
    validate_record(rec(images=["alias.png"]), root)


def test_tags_differ_from_images(root):
    assert "do not match" in bad_reason(rec(images=["a.png", "b.png"], user="<|image_1|>\nQ"), root)


def test_tag_without_image(root):
    assert "do not match" in bad_reason(rec(images=[], user="<|image_1|>\nQ"), root)


def test_repeated_tag(root):
    assert "repeats image tag(s) [1]" in bad_reason(rec(user="<|image_1|><|image_1|>\nQ"), root)


@pytest.mark.parametrize("answer", ["", "  \n"])
def test_empty_answer(root, answer):
    assert "empty assistant answer" in bad_reason(rec(assistant=answer), root)


def test_too_many_images(root):
    assert "more than the limit 1" in bad_reason(rec(images=["a.png", "b.png"]), root, max_images_per_turn=1)


def test_bad_record_survives_pickle():
    e = pickle.loads(pickle.dumps(BadRecord("why", path="f.jsonl", line=3, record_id="x")))
    assert (e.reason, e.path, e.line, e.record_id, str(e)) == ("why", "f.jsonl", 3, "x", "f.jsonl:3 (id=x): why")


def test_round_trip(root, tmp_path):
    records = [rec("a", answers=["yes", "Yes"]), rec("b", images=["a.png", "sub/c.png"], assistant="ünïcode")]
    path = tmp_path / "train.jsonl"
    assert write_jsonl(path, records) == 2
    good, n_bad = validate_file(path, root)
    assert (good, n_bad) == (records, 0)


def _mixed_file(root, path):
    """Five good lines and one of each bad kind; returns (good ids, number of bad lines)."""
    lines = [
        json.dumps(rec("g1")),
        '{"id": "broken", ',                                        # malformed JSON
        json.dumps({"id": "nofield", "source": "t"}),               # missing field
        json.dumps(rec("g2", images=["b.png"])),
        json.dumps(rec("missing", images=["nope.png"])),            # missing image
        json.dumps(rec("escape", images=["../x.png"])),             # '..'
        json.dumps(rec("g3", images=["a.png", "b.png"])),
        json.dumps(rec("tags", images=["a.png", "b.png"], user="<|image_1|>\nQ")),
        json.dumps(rec("empty", assistant=" ")),
        json.dumps(rec("g1")),                                      # duplicate id
        "",                                                         # blank lines are not records
        json.dumps(rec("g4")),
    ]
    path.write_text("\n".join(lines) + "\n")
    return ["g1", "g2", "g3", "g4"], 7


def test_validate_file_fail_mode(root, tmp_path):
    path = tmp_path / "train.jsonl"
    _mixed_file(root, path)
    with pytest.raises(BadRecord) as e:
        validate_file(path, root)
    assert e.value.line == 2 and e.value.path == str(path) and "malformed JSON" in e.value.reason


def test_validate_file_fail_mode_duplicate(root, tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [rec("a"), rec("b"), rec("a")])
    with pytest.raises(BadRecord, match="duplicate id") as e:
        validate_file(path, root)
    assert (e.value.line, e.value.record_id) == (3, "a")


def test_validate_file_skip_mode_quarantines(root, tmp_path):
    path, quarantine = tmp_path / "train.jsonl", tmp_path / "bad" / "train.quarantine.jsonl"
    good_ids, n_expected_bad = _mixed_file(root, path)
    good, n_bad = validate_file(path, root, on_bad_record="skip", quarantine_path=quarantine)
    assert [r["id"] for r in good] == good_ids
    assert n_bad == n_expected_bad
    entries = [json.loads(t) for _, t in iter_jsonl(quarantine)]
    assert len(entries) == n_bad
    assert len(good) + n_bad == sum(1 for _ in iter_jsonl(path))  # nothing lost
    by_line = {e["line"]: e for e in entries}
    assert sorted(by_line) == [2, 3, 5, 6, 8, 9, 10]
    assert "malformed JSON" in by_line[2]["reason"] and by_line[2]["raw"] == '{"id": "broken", '
    assert "missing required field" in by_line[3]["reason"]
    assert "does not exist" in by_line[5]["reason"] and by_line[5]["id"] == "missing"
    assert "'..'" in by_line[6]["reason"]
    assert "do not match" in by_line[8]["reason"]
    assert "empty assistant" in by_line[9]["reason"]
    assert "duplicate id" in by_line[10]["reason"] and by_line[10]["id"] == "g1"
    assert all(e["file"] == str(path) for e in entries)
    # the raw line is kept verbatim so it can be fixed and re-added
    assert json.loads(by_line[10]["raw"]) == rec("g1")


def test_validate_file_rejects_unknown_mode(root, tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [])
    with pytest.raises(ValueError, match="on_bad_record"):
        validate_file(path, root, on_bad_record="ignore")
