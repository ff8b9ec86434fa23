"""`phi3v-ray convert NAME --src RAW_DIR --out DIR [-o key=value ...]`: raw dataset -> jsonl + images.

After converting, every written split is checked with `schema.validate_file` (skip with
--no-validate), so a converted folder is known to load before any GPU is asked for. Splits named
`*_noanswer` (a test set released without answers) are for prediction only and are not validated.
A converter writes its split files all or nothing: a failed run leaves none behind.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    p.add_argument("--out", required=True, type=Path, help="output folder for {split}.jsonl and images/")
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
    try:
        counts = CONVERTERS[args.name].fn(args.src, args.out, **options)
        for split, n in counts.items():
            print(f"{args.name}: wrote {n} records to {args.out / f'{split}.jsonl'}")
            if split.endswith(NOANSWER_SUFFIX):
                print(f"{args.name}: {split}: no answers, for prediction only (not validated)")
                continue
            if args.no_validate:
                continue
            good, _ = validate_file(args.out / f"{split}.jsonl", args.out / "images")
            print(f"{args.name}: {split}: {len(good)} records validated")
    except (ConversionError, BadRecord) as e:
        print(f"convert {args.name}: {e}", file=sys.stderr)
        return 1
    return 0
