"""UCF-101 -> 8-frame video classification records, from either official download.

The full dataset (UCF101.rar + the RecognitionTask split zip, unpacked under `src`):

    UCF-101/{Class}/v_{Class}_g{gg}_c{cc}.avi
    ucfTrainTestlist/classInd.txt             "1 ApplyEyeMakeup"
    ucfTrainTestlist/trainlist0{1,2,3}.txt    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    ucfTrainTestlist/testlist0{1,2,3}.txt     "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"

Validation groups are carved from the train list by group number (the highest-numbered groups),
so no group's clips leak across splits; UCF-101 groups are shared by all classes, as in the
official split protocol.

The recipe's own download, UCF101_subset.tar.gz (10 classes, already split 300/30/75 clips): `src`
is the tarball, a folder holding it, or its extracted tree

    UCF101_subset/{train,val,test}/{Class}/v_{Class}_g{gg}_c{cc}.avi

whose train/val/test split is kept as given (the options split and val_fraction do not apply).
The tarball's clips are unpacked to a temporary folder in `out`, removed afterwards.

Each video gives 8 frames at indices floor(k*T/8), k = 0..7 (T = decoded frame count), at native
resolution, saved as images/{split}/{Class}/{video}.{k}.jpg. A record's id is its video's name
(v_Class_gXX_cYY), and records are in sorted order, so neither depends on directory listing order.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath

from phi3v_ray.constants import image_tag

from ._common import ConversionError, as_list, require_file, write_splits

# The recipe's 10-class subset: the first 10 lines of classInd.txt.
DEFAULT_CLASSES = [
    "ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam",
    "BandMarching", "BaseballPitch", "Basketball", "BasketballDunk", "BenchPress",
]
NUM_FRAMES = 8
_GROUP = re.compile(r"_g(\d+)_c\d+$")
SUBSET_SPLITS = ("train", "val", "test")
SUBSET_NAME = "UCF101_subset"
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def frame_indices(total: int, n: int = NUM_FRAMES) -> list[int]:
    """The recipe's sampling: floor(k * total / n) for k = 0..n-1."""
    return [k * total // n for k in range(n)]


def prompt(classes: list[str]) -> str:
    return f"Classify the video into one of the following classes: {', '.join(sorted(classes))}."


def _read_list(path: Path) -> list[str]:
    """Video paths (Class/v_..avi) from a train/test list; the label column is ignored."""
    require_file(path, "split list")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def sample_frames(video: Path, n: int = NUM_FRAMES) -> list:
    """The recipe's n frames of a video (indices floor(k*T/n), T = decoded frame count) as PIL images.

    Decoded with PyAV. The header's frame count is used only when decoding confirms it; otherwise a
    second pass samples from the true count. Short videos repeat a frame. Raises ConversionError
    naming the video when it has no video stream or no decodable frame, or cannot be decoded.
    """
    import av

    def one_pass(total: int | None) -> tuple[int, list]:
        wanted = frame_indices(total, n) if total else []
        images, count = {}, 0
        with av.open(str(video)) as container:
            for frame in container.decode(container.streams.video[0]):
                if count in wanted:
                    images[count] = frame.to_image()
                count += 1
        return count, [images[i] for i in wanted if i in images]

    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise ConversionError(f"{video}: no video stream")
            header_total = container.streams.video[0].frames
        decoded, frames = one_pass(header_total)
        if decoded != header_total:  # header missing or wrong: sample again from the true count
            if decoded == 0:
                raise ConversionError(f"{video}: no decodable frames")
            _, frames = one_pass(decoded)
        return frames
    except ConversionError:
        raise
    except Exception as e:  # PyAV raises its own error types for broken files
        raise ConversionError(f"{video}: cannot decode video ({type(e).__name__}: {e})") from None


def _extract(video: Path, out_paths: list[Path], quality: int) -> None:
    """Decode `video` and save the sampled frames to `out_paths` as JPEG."""
    for image, path in zip(sample_frames(video, len(out_paths)), out_paths, strict=True):
        image.save(path, format="JPEG", quality=quality)


def convert_ucf101(
    src: Path,
    out: Path,
    *,
    classes=None,
    split=None,
    val_fraction=None,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> dict[str, int]:
    """Convert UCF-101 (full download or the recipe's subset) to jsonl with 8 JPEG frames per video."""
    src, out = Path(src), Path(out)
    tarball, tree = _find_layout(src)
    if tarball is None and tree is None:
        return _convert_full(src, out, classes, split, val_fraction, int(jpeg_quality), bool(overwrite))
    given = [name for name, value in (("split", split), ("val_fraction", val_fraction)) if value is not None]
    if given:
        raise ConversionError(
            f"{tarball or tree}: the UCF101_subset download comes split into train/val/test and is "
            f"kept so; option(s) {given} apply only to the full UCF-101 download"
        )
    if tree is not None:
        return _convert_subset(tree, out, classes, int(jpeg_quality), bool(overwrite))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".ucf101-unpack-") as tmp:
        tree = _unpack_subset(tarball, Path(tmp))
        return _convert_subset(tree, out, classes, int(jpeg_quality), bool(overwrite), shown=tarball)


def _is_subset_tree(folder: Path) -> bool:
    return (folder / "train").is_dir() and any((folder / s).is_dir() for s in ("val", "test"))


def _find_layout(src: Path) -> tuple[Path | None, Path | None]:
    """(tarball, extracted subset tree) for the subset download; (None, None) for the full one."""
    if src.is_file():
        if not src.name.endswith(TARBALL_SUFFIXES):
            raise ConversionError(f"{src}: expected a folder or the UCF101_subset.tar.gz tarball")
        return src, None
    if (src / "UCF-101").is_dir():
        return None, None
    for tree in (src, src / SUBSET_NAME):
        if _is_subset_tree(tree):
            return None, tree
    for suffix in TARBALL_SUFFIXES:
        if (src / f"{SUBSET_NAME}{suffix}").is_file():
            return src / f"{SUBSET_NAME}{suffix}", None
    raise ConversionError(
        f"{src}: no UCF-101 download found; expected UCF-101/ + ucfTrainTestlist/ (the full dataset), "
        f"{SUBSET_NAME}/{{train,val,test}}/<Class>/*.avi, or {SUBSET_NAME}.tar.gz"
    )


def _unpack_subset(tarball: Path, dest: Path) -> Path:
    """Write the tarball's clips to dest/{split}/{Class}/{name}.avi; returns dest.

    Only regular files whose path ends in {train,val,test}/<Class>/<name>.avi are written, under
    names built here, so links and odd paths in the archive are never followed.
    """
    n = 0
    try:
        with tarfile.open(tarball) as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[-3] not in SUBSET_SPLITS:
                    continue
                split, cls, name = parts[-3:]
                if not name.lower().endswith(".avi") or name.startswith("._") or ".." in (cls, name):
                    continue
                target = dest / split / cls / name
                if target.exists():
                    raise ConversionError(f"{tarball}: {split}/{cls}/{name} appears twice in the tarball")
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as f, open(target, "wb") as g:
                    shutil.copyfileobj(f, g)
                n += 1
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ConversionError(f"{tarball}: cannot read the tarball ({type(e).__name__}: {e})") from None
    if not n:
        raise ConversionError(f"{tarball}: no clips {{train,val,test}}/<Class>/*.avi in the tarball")
    return dest


def _subset_clips(tree: Path) -> dict[str, list[tuple[str, Path]]]:
    """{split: [(class, video), ...]} of an extracted subset, sorted by class then file name."""
    clips = {}
    for split in SUBSET_SPLITS:
        if not (tree / split).is_dir():
            continue
        clips[split] = [
            (cls_dir.name, video)
            for cls_dir in sorted(p for p in (tree / split).iterdir() if p.is_dir())
            for video in sorted(cls_dir.iterdir())
            if video.suffix.lower() == ".avi" and not video.name.startswith("._") and video.is_file()
        ]
    return clips


def _convert_subset(
    tree: Path, out: Path, classes, quality: int, overwrite: bool, shown: Path | None = None
) -> dict[str, int]:
    """Convert an extracted UCF101_subset tree, keeping its own train/val/test split."""
    shown = shown or tree
    clips = _subset_clips(tree)
    present = sorted({cls for vids in clips.values() for cls, _ in vids})
    if not present:
        raise ConversionError(f"{shown}: no clips {{train,val,test}}/<Class>/*.avi found")
    if classes in (None, "", [], "all"):
        wanted = present
    else:
        wanted = as_list(classes, "classes")
        unknown = [c for c in wanted if c not in present]
        if unknown:
            raise ConversionError(f"{shown}: unknown class(es) {unknown}; the subset has {present}")
    chosen = {split: [(c, v) for c, v in vids if c in wanted] for split, vids in clips.items()}
    for split, vids in chosen.items():
        twice = sorted(stem for stem, n in Counter(v.stem for _, v in vids).items() if n > 1)
        if twice:
            raise ConversionError(f"{shown}: {split}/ holds clip(s) {twice} in more than one class folder")
    sizes = "/".join(str(len(vids)) for vids in chosen.values())
    print(f"ucf101: {shown}: {SUBSET_NAME} layout, its own {'/'.join(chosen)} split kept "
          f"({sizes} clips, {len(wanted)} classes)")
    text = prompt(wanted)
    return write_splits(out, {
        split: _records(split, [(video, cls) for cls, video in vids], text, out, quality, overwrite)
        for split, vids in chosen.items()
    })


def _records(split: str, videos: list[tuple[Path, str]], text: str, out: Path, quality: int, overwrite: bool):
    """Yield one split's records from (video, label) pairs; each video's 8 frames are extracted to
    out/images/{split}/{label}/ unless they are there already (or overwrite)."""
    user = "".join(image_tag(k) for k in range(1, NUM_FRAMES + 1)) + "\n" + text
    for video, label in videos:
        rel_images = [f"{split}/{label}/{video.stem}.{k}.jpg" for k in range(NUM_FRAMES)]
        paths = [out / "images" / r for r in rel_images]
        if overwrite or not all(p.is_file() for p in paths):
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            _extract(video, paths, quality)
        yield {
            "id": video.stem,
            "source": "ucf101",
            "conversations": [{"images": rel_images, "user": user, "assistant": label}],
        }


def _convert_full(
    src: Path, out: Path, classes, split, val_fraction, quality: int, overwrite: bool
) -> dict[str, int]:
    """Convert the full UCF-101 download: official split list, val groups carved from train."""
    videos_dir = src / "UCF-101"  # present: _find_layout checked
    lists_dir = src / "ucfTrainTestlist"
    split = 1 if split is None else int(split)
    val_fraction = 0.1 if val_fraction is None else float(val_fraction)
    if split not in (1, 2, 3):
        raise ConversionError(f"option 'split' must be 1, 2 or 3, got {split}")
    if not 0.0 <= val_fraction < 1.0:
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
    n_val = round(len(groups) * val_fraction)
    if val_fraction > 0 and len(groups) > 1:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_groups = set(groups[len(groups) - n_val:]) if n_val else set()
    splits = {
        "train": [v for v in chosen["train"] if _group(v) not in val_groups],
        "val": [v for v in chosen["train"] if _group(v) in val_groups],
        "test": chosen["test"],
    }
    if not val_groups:
        del splits["val"]

    for vids in splits.values():
        for rel in vids:
            if not (videos_dir / rel).is_file():
                raise ConversionError(f"{videos_dir / rel}: video listed in {lists_dir} not found")
    text = prompt(wanted)
    return write_splits(out, {
        name: _records(
            name, [(videos_dir / rel, wanted_lc[rel.split("/")[0].lower()]) for rel in vids],
            text, out, quality, overwrite,
        )
        for name, vids in splits.items()
    })


def _group(video_rel: str) -> int:
    m = _GROUP.search(Path(video_rel).stem)
    if not m:
        raise ConversionError(f"video name {video_rel!r} does not match v_Class_gXX_cYY")
    return int(m.group(1))
