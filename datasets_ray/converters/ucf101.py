"""UCF-101 (official download) -> 8-frame video classification records.

Raw layout under `src`:

    UCF-101/{Class}/v_{Class}_g{gg}_c{cc}.avi
    ucfTrainTestlist/classInd.txt             "1 ApplyEyeMakeup"
    ucfTrainTestlist/trainlist0{1,2,3}.txt    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    ucfTrainTestlist/testlist0{1,2,3}.txt     "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"

Each video gives 8 frames at indices floor(k*T/8), k = 0..7 (T = decoded frame count), at native
resolution, saved as images/{split}/{Class}/{video}.{k}.jpg. Validation groups are carved from the
train list by group number (the highest-numbered groups), so no group's clips leak across splits;
UCF-101 groups are shared by all classes, as in the official split protocol.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..schema import write_jsonl
from ._common import ConversionError, as_list, require_file

# The recipe's 10-class subset: the first 10 lines of classInd.txt.
DEFAULT_CLASSES = [
    "ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam",
    "BandMarching", "BaseballPitch", "Basketball", "BasketballDunk", "BenchPress",
]
NUM_FRAMES = 8
_GROUP = re.compile(r"_g(\d+)_c\d+$")


def frame_indices(total: int, n: int = NUM_FRAMES) -> list[int]:
    """The recipe's sampling: floor(k * total / n) for k = 0..n-1."""
    return [k * total // n for k in range(n)]


def prompt(classes: list[str]) -> str:
    return f"Classify the video into one of the following classes: {', '.join(sorted(classes))}."


def _read_list(path: Path) -> list[str]:
    """Video paths (Class/v_..avi) from a train/test list; the label column is ignored."""
    require_file(path, "split list")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _extract(video: Path, out_paths: list[Path], quality: int) -> None:
    """Decode `video` and save the sampled frames to `out_paths` as JPEG."""
    import av

    def one_pass(total: int | None) -> int:
        want = {} if not total else {idx: k for k, idx in enumerate(frame_indices(total))}
        count = 0
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if count in want:
                    img = frame.to_image()
                    for k, idx in enumerate(frame_indices(total)):
                        if idx == count:  # short videos sample one frame more than once
                            img.save(out_paths[k], format="JPEG", quality=quality)
                count += 1
        return count

    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise ConversionError(f"{video}: no video stream")
            header_total = container.streams.video[0].frames
        decoded = one_pass(header_total)
        if decoded != header_total:  # header missing or wrong: sample again from the true count
            if decoded == 0:
                raise ConversionError(f"{video}: no decodable frames")
            one_pass(decoded)
    except ConversionError:
        raise
    except Exception as e:  # PyAV raises its own error types for broken files
        raise ConversionError(f"{video}: cannot decode video ({type(e).__name__}: {e})") from None


def convert_ucf101(
    src: Path,
    out: Path,
    *,
    classes=None,
    split: int = 1,
    val_fraction: float = 0.1,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> dict[str, int]:
    """Convert official UCF-101 to train/val/test jsonl with 8 JPEG frames per video."""
    src, out = Path(src), Path(out)
    videos_dir = src / "UCF-101"
    lists_dir = src / "ucfTrainTestlist"
    if not videos_dir.is_dir():
        raise ConversionError(f"{videos_dir}: UCF-101 video folder not found")
    split = int(split)
    if split not in (1, 2, 3):
        raise ConversionError(f"option 'split' must be 1, 2 or 3, got {split}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConversionError(f"option 'val_fraction' must be in [0, 1), got {val_fraction}")

    class_ind = require_file(lists_dir / "classInd.txt", "class index")
    known = [line.split()[1] for line in class_ind.read_text().splitlines() if line.strip()]
    if classes in (None, "", []):
        wanted = list(DEFAULT_CLASSES)
    elif classes == "all":
        wanted = known
    else:
        wanted = as_list(classes, "classes")
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise ConversionError(f"{class_ind}: unknown class(es) {unknown}")
    # The lists spell some class folders with different case than the video names; match lowercase.
    wanted_lc = {c.lower(): c for c in wanted}

    raw = {
        "train": _read_list(lists_dir / f"trainlist0{split}.txt"),
        "test": _read_list(lists_dir / f"testlist0{split}.txt"),
    }
    chosen = {name: [v for v in vids if v.split("/")[0].lower() in wanted_lc] for name, vids in raw.items()}

    groups = sorted({_group(v) for v in chosen["train"]})
    n_val = round(len(groups) * float(val_fraction))
    if float(val_fraction) > 0 and len(groups) > 1:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_groups = set(groups[len(groups) - n_val:]) if n_val else set()
    splits = {
        "train": [v for v in chosen["train"] if _group(v) not in val_groups],
        "val": [v for v in chosen["train"] if _group(v) in val_groups],
        "test": chosen["test"],
    }

    text = prompt(wanted)
    counts = {}
    for name, vids in splits.items():
        if name == "val" and not val_groups:
            continue
        records = []
        for rel in vids:
            video = videos_dir / rel
            if not video.is_file():
                raise ConversionError(f"{video}: video listed in {lists_dir} not found")
            label = wanted_lc[rel.split("/")[0].lower()]
            stem = video.stem
            rel_images = [f"{name}/{label}/{stem}.{k}.jpg" for k in range(NUM_FRAMES)]
            paths = [out / "images" / r for r in rel_images]
            if overwrite or not all(p.is_file() for p in paths):
                paths[0].parent.mkdir(parents=True, exist_ok=True)
                _extract(video, paths, int(jpeg_quality))
            user = "".join(f"<|image_{k}|>" for k in range(1, NUM_FRAMES + 1)) + "\n" + text
            records.append({
                "id": stem,
                "source": "ucf101",
                "conversations": [{"images": rel_images, "user": user, "assistant": label}],
            })
        counts[name] = write_jsonl(out / f"{name}.jsonl", records)
    return counts


def _group(video_rel: str) -> int:
    m = _GROUP.search(Path(video_rel).stem)
    if not m:
        raise ConversionError(f"video name {video_rel!r} does not match v_Class_gXX_cYY")
    return int(m.group(1))
