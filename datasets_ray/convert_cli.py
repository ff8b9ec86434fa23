"""`phi3v-ray convert NAME --src RAW_DIR --out DIR [-o key=value ...]`: raw dataset -> jsonl + images.

After converting, every written split is checked with `schema.validate_file` (skip with
--no-validate), so a converted folder is known to load before any GPU is asked for. Splits named
`*_noanswer` (a test set released without answers) are for prediction only and are not validated.
A converter writes its split files all or nothing: a failed run leaves none behind.

`--format parquet` writes sharded Parquet with the images embedded instead (out/{split}/part-*.parquet,
see datasets_ray/shards.py); `--out` may then, or for jsonl, be a bucket (s3://, gs://, abfs://): the
conversion runs in a local temporary folder and is uploaded when it is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from .converters import CONVERTERS, ConversionError
from .schema import BadRecord, validate_file

# A converter writes a split that has no answers (for prediction only) as "{split}_noanswer"; such
# splits are not validated, since validate_record refuses empty answers on purpose.
NOANSWER_SUFFIX = "_noanswer"


def _options_help() -> str:
    lines = ["converters and their options (-o key=value):"]
    for name, conv in CONVERTERS.items():
        lines.append(f"  {name}: {conv.summary}")
        lines += [f"      {key}: {doc}" for key, doc in conv.options.items()]
    return "\n".join(lines)


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `convert` sub-command to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "convert",
        help="convert a raw dataset download into jsonl + images",
        description="Convert a dataset's official raw layout on local disk into out/{split}.jsonl "
        "and out/images/.",
        epilog=_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=sorted(CONVERTERS), help="which converter")
    p.add_argument("--src", required=True, type=Path,
                   help="folder (or file, e.g. UCF101_subset.tar.gz) of the raw download")
    p.add_argument("--out", required=True, help="output folder (local, s3://, gs://, abfs://) for {split}.jsonl and "
                   "images/, or for {split}/part-*.parquet")
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                   help="jsonl + image files (default), or Parquet shards with the images embedded: prefer it for "
                        "buckets holding many small images (one request per shard, not per image)")
    p.add_argument("--shard-rows", type=int, default=None, help="parquet: records per shard (default 256)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="converter option (repeatable); values true/false/numbers are parsed")
    p.add_argument("--classes", help="ucf101: comma-separated class names, or 'all'")
    p.add_argument("--val-fraction", type=float,
                   help="ucf101 (full download): share of train groups moved to val")
    p.add_argument("--no-validate", action="store_true", help="skip validating the written splits")
    p.set_defaults(func=run_convert)
    return p


def _parse_value(text: str):
    """'true' -> True, '3' -> 3, '0.1' -> 0.1; anything else stays a string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (bool, int, float)) or value is None else text


def _collect_options(args) -> dict:
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {item!r} must look like key=value")
        options[key.strip()] = _parse_value(value.strip())
    if args.classes is not None:
        options["classes"] = args.classes
    if args.val_fraction is not None:
        options["val_fraction"] = args.val_fraction
    allowed = CONVERTERS[args.name].options
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"converter {args.name!r} has no option(s) {unknown}; it takes {sorted(allowed) or 'none'}"
        )
    return options


def run_convert(args) -> int:
    """Run the converter named in `args`, then validate its splits; returns a process exit code."""
    try:
        options = _collect_options(args)
    except ValueError as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    from phi3v_ray.storage import is_remote

    staged = args.format == "parquet" or is_remote(str(args.out))
    with tempfile.TemporaryDirectory(prefix="phi3v-convert-") if staged else nullcontext() as tmp:
        local = Path(tmp) if staged else Path(args.out)
        code = _convert(args, options, local)
        if code or not staged:
            return code
        return _publish(args, local)


def _publish(args, local: Path) -> int:
    """The converted folder → `--out`: Parquet shards, or the jsonl + images uploaded as they are."""
    from phi3v_ray.storage import upload_dir

    from .shards import DEFAULT_SHARD_ROWS, convert_to_shards

    splits = sorted(p.name[: -len(".jsonl")] for p in local.glob("*.jsonl"))
    if args.format == "parquet":
        counts = convert_to_shards(local, splits, str(args.out), args.shard_rows or DEFAULT_SHARD_ROWS)
        for split, n in counts.items():
            print(f"{args.name}: wrote {n} records with their images to {str(args.out).rstrip('/')}/{split}/")
    else:
        n = upload_dir(local, str(args.out))
        print(f"{args.name}: uploaded {n} files to {args.out}")
    return 0


def _convert(args, options: dict, out: Path) -> int:
    try:
        counts = CONVERTERS[args.name].fn(args.src, out, **options)
        for split, n in counts.items():
            print(f"{args.name}: wrote {n} records to {out / f'{split}.jsonl'}")
            if split.endswith(NOANSWER_SUFFIX):
                print(f"{args.name}: {split}: no answers, for prediction only (not validated)")
                continue
            if args.no_validate:
                continue
            good, _ = validate_file(out / f"{split}.jsonl", out / "images")
            print(f"{args.name}: {split}: {len(good)} records validated")
    except (ConversionError, BadRecord) as e:
        print(f"convert {args.name}: {e}", file=sys.stderr)
        return 1
    return 0
