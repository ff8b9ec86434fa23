"""Converters: a dataset's official raw download on local disk -> `out/images/` + `out/{split}.jsonl`.

Each converter is a plain function `convert_X(src, out, **options) -> {split: n_records}`; this
registry names them for the `convert` CLI and documents their options. No torch, no ray here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ._common import ConversionError
from .cauldron import convert_cauldron
from .docvqa import convert_docvqa
from .docvqa_mini import convert_docvqa_mini
from .generic import convert_generic
from .hateful_memes import convert_hateful_memes
from .nlvr2 import convert_nlvr2
from .ucf101 import convert_ucf101


@dataclass(frozen=True)
class Converter:
    """A registry entry: the function, one line on what it reads, and a doc line per option."""

    fn: Callable[..., dict[str, int]]
    summary: str
    options: dict[str, str] = field(default_factory=dict)


CONVERTERS: dict[str, Converter] = {
    "ucf101": Converter(
        convert_ucf101,
        "UCF-101/{Class}/*.avi + ucfTrainTestlist/, or the recipe's UCF101_subset.tar.gz (or its "
        "extracted {train,val,test}/{Class}/*.avi) -> 8 JPEG frames per video; train/val/test",
        {
            "classes": "comma-separated class names, or 'all' (default: the recipe's first 10 of classInd.txt; "
                       "for the subset, all of its classes)",
            "split": "official split list 1, 2 or 3 (default 1; full download only)",
            "val_fraction": "share of train groups gXX (highest numbers) moved to val; 0 = no val (default 0.1; "
                            "full download only, the subset keeps its own val)",
            "jpeg_quality": "JPEG quality of the saved frames (default 95)",
            "overwrite": "re-extract frames that already exist (default false)",
        },
    ),
    "docvqa": Converter(
        convert_docvqa,
        "DocVQA Task 1 {train,val,test}_v1.0[_withQT].json + documents/ (or spdocvqa_qas/ + "
        "spdocvqa_images/) -> train/val, all answers kept",
        {
            "images_dir": "folder holding the document images if neither next to the json files nor in a "
                          "'*images*' folder beside theirs",
            "include_test": "also write the answerless test split to test_noanswer.jsonl (default false)",
        },
    ),
    "hateful_memes": Converter(
        convert_hateful_memes,
        "Hateful Memes data/{train,dev_seen,test_seen}.jsonl (phase 2) or data/{train,dev,test}.jsonl "
        "(phase 1) + img/ -> yes/no; train/val/test (an unlabelled test -> test_noanswer)",
        {"splits": "out:raw pairs (default 'train:train,val:dev_seen,test:test_seen', "
                   "phase 1: 'train:train,val:dev,test:test')"},
    ),
    "nlvr2": Converter(
        convert_nlvr2,
        "NLVR2 {train,dev,test1}.json + images/{train/NN,dev,test1}/, or the GitHub clone "
        "nlvr2/data/*.json + images/train/NN/, dev/, test1/ -> two-image yes/no; train/val/test",
        {
            "images_dir": "root of the image folders train/, dev/, test1/ (default: found from the json folder up)",
            "splits": "out:raw pairs (default 'train:train,val:dev,test:test1')",
            "skip_missing_images": "skip examples whose images are absent instead of failing (default false)",
        },
    ),
    "cauldron": Converter(
        convert_cauldron,
        "the_cauldron parquet (images + texts) -> multi-turn records in train.jsonl",
        {"subsets": "comma-separated subset folders under src (default those of docvqa, hateful_memes, nlvr2 present)"},
    ),
    "docvqa_mini": Converter(
        convert_docvqa_mini,
        "DocVQA mini parquet (id, image, query, answers) -> one split per shard prefix",
        {"language": "key of the 'query' dict to use (default 'en')"},
    ),
    "generic": Converter(
        convert_generic,
        "any parquet/jsonl/csv with image, question and answer columns",
        {
            "image_col": "column with an image path, encoded bytes, {bytes,path} or a list of them (default 'image')",
            "question_col": "column with the question (default 'question')",
            "answer_col": "column with the answer string or list of references (default 'answer')",
            "id_col": "column with a unique id (default: split-file-row)",
            "images_root": "folder that relative image paths start from (default: the table's folder)",
            "split": "split name when src is a single file (default 'train')",
            "source": "value of the records' 'source' field (default 'generic')",
        },
    ),
}

__all__ = [
    "CONVERTERS", "Converter", "ConversionError",
    "convert_cauldron", "convert_docvqa", "convert_docvqa_mini", "convert_generic",
    "convert_hateful_memes", "convert_nlvr2", "convert_ucf101",
]
