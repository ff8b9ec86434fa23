"""`phi3v-ray`: train, eval, export, predict, tune, submit, convert, tiny.

    phi3v-ray train                                   # the embedded demo on a local Ray
    phi3v-ray train --config docvqa mode=lora checkpoint=/models/Phi-3.5-vision-instruct ...
    phi3v-ray eval checkpoint=runs/x/checkpoint_.../model val_file=... images_root=...
    phi3v-ray export --run runs/phi3v-demo --out exported/
    phi3v-ray export --run s3://bucket/runs/docvqa --out exported/     # fetches and verifies the final weights
    phi3v-ray predict --run runs/phi3v-demo --image page.png --question "What is the total?"
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _train(args) -> int:
    from .config import ConfigError, config_help

    if args.help_config:
        print(config_help())
        return 0
    from .launch import ClusterCannotFit, RayDidNotStart, run_training
    from .checkpointing import CheckpointCorrupt
    from .lease import RunInUse

    # each refusal and its exit status
    exit_codes = ((ConfigError, 2), (ClusterCannotFit, 3), (RayDidNotStart, 3), (CheckpointCorrupt, 4), (RunInUse, 5))
    try:
        cfg, problems = _read_config(args)
        run_training(cfg, problems=problems)
    except tuple(kind for kind, _ in exit_codes) as err:
        print(f"phi3v-ray: {err}", file=sys.stderr)
        return next(code for kind, code in exit_codes if isinstance(err, kind))
    except Exception as err:
        from .failures import deterministic_message, out_of_memory_message

        message = deterministic_message(err) or out_of_memory_message(err)
        if message is None:
            raise
        import ray

        ray.shutdown()  # no worker log lines forwarded after ours: the CLI's last line names file, record, reason
        print(f"phi3v-ray: stopped: {message}", file=sys.stderr, flush=True)  # the last line: file, record, reason
        return 4
    return 0


def _read_config(args):
    """(config, problems so far) for `train` and `eval`; `eval checkpoint=<run or checkpoint>` starts from
    the settings stored with that checkpoint."""
    from .config import parse_overrides, read_config, resolve_key

    source = args.config or ("demo" if not args.overrides or _only_run_keys(args.overrides) else None)
    if args.command == "eval":
        from .resolve import eval_config

        checkpoint = next((str(v) for k, v in parse_overrides(args.overrides).items() if resolve_key(k) == "checkpoint"), "")
        if checkpoint:
            return eval_config(args.config, args.overrides, checkpoint)
        cfg, problems = read_config(source, args.overrides)
        return cfg.replace(eval_only=True), problems
    return read_config(source, args.overrides)


def _only_run_keys(overrides: list[str]) -> bool:
    """Overrides that leave the demo meaningful (`phi3v-ray train epochs=2` still runs the demo)."""
    from .config import resolve_key

    data_keys = {"train_file", "val_file", "images_root", "checkpoint"}
    return not any(resolve_key(item.partition("=")[0].strip()) in data_keys for item in overrides)


def _export(args) -> int:
    from .checkpointing import CheckpointCorrupt
    from .export import export
    from .storage import StorageAccessDenied
    from .weights import CheckpointDownloadError

    try:
        out = export(run=args.run, checkpoint=args.checkpoint, base=args.base, out=args.out)
    except (CheckpointCorrupt, CheckpointDownloadError) as err:  # damaged weights are never exported
        print(f"phi3v-ray: {err}", file=sys.stderr)
        return 4
    except (FileNotFoundError, ValueError, StorageAccessDenied) as err:  # each names the path or flag at fault
        print(f"phi3v-ray: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


def _predict(args) -> int:
    from .checkpointing import CheckpointCorrupt
    from .predict import run_cli

    try:
        return run_cli(args)
    except (FileNotFoundError, ValueError, CheckpointCorrupt) as err:  # each names the file or flag at fault
        print(f"phi3v-ray: {err}", file=sys.stderr)
        return 2


def _tiny(args) -> int:
    from .tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.out, seed=args.seed, num_crops=args.num_crops)
    print(f"wrote a tiny random Phi-3.5-vision checkpoint to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3v-ray", description="Fine-tune Phi-3.5-vision on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, text in (("train", "fine-tune (no arguments: the embedded demo)"), ("eval", "evaluate a checkpoint on val_file")):
        p = sub.add_parser(name, help=text, description=text + ". Settings are key=value; see --help-config.")
        p.add_argument("--config", help="preset name (demo, docvqa, hateful_memes, nlvr2, ucf101) or a YAML file")
        p.add_argument("--help-config", action="store_true", help="list every setting with its type, default and meaning")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show Ray's and the libraries' own output (by default it goes to <run>/logs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        p.set_defaults(func=_train)

    p = sub.add_parser("export", help="write a run's final weights in the official layout (LoRA merged)",
                       description="Write a run's final weights in the official layout (LoRA merged). --run and "
                                   "--checkpoint may be local, NFS or on object storage (s3://, gs://, abfs://): "
                                   "only the final weights, train_state.json and the manifests are downloaded, and "
                                   "verified before anything is written.")
    p.add_argument("--run", help="a run directory (storage_path/name, local or a URI); its latest checkpoint is exported")
    p.add_argument("--checkpoint", help="a checkpoint directory holding model/ or adapter/ (local or a URI)")
    p.add_argument("--base", help="base model for an adapter (default: the run's checkpoint setting)")
    p.add_argument("--out", required=True,
                   help="a local folder (upload it afterwards with aws s3 sync / gcloud storage rsync / azcopy)")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="answer a question about images or a video (or a jsonl of records), on the CPU")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", help="a checkpoint directory (or its model/ or adapter/), or an exported folder")
    where.add_argument("--run", help="a run directory: its newest finished checkpoint")
    p.add_argument("--base", help="base model for an adapter (default: the run's checkpoint setting)")
    p.add_argument("--question", help="what to ask; the images' tags are put first unless it has <|image_k|> tags")
    p.add_argument("--image", nargs="+", action="extend", metavar="PATH", help="one or more images, in tag order")
    p.add_argument("--video", help="a video file: its frames are sampled as in the ucf101 recipe (PyAV)")
    p.add_argument("--frames", type=int, default=8, help="frames taken from --video (default 8)")
    p.add_argument("--jsonl", help="records in the project's jsonl format: one prediction per record (first turn)")
    p.add_argument("--images-root", help="folder the records' image paths are relative to (default: the jsonl's)")
    p.add_argument("--out", help="with --jsonl: where the predictions go (jsonl)")
    p.add_argument("--max-new-tokens", type=int, help="generation length cap (default: the run's max_new_tokens, or 64)")
    p.add_argument("--num-crops", type=int, help="HD crop budget per image (default: the run's num_crops)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("tiny", help="write a tiny random checkpoint in the official layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-crops", type=int, default=4)
    p.set_defaults(func=_tiny)

    # Imported, not probed: a subcommand whose module is broken fails here with its traceback
    # instead of silently vanishing from the CLI.
    from datasets_ray.convert_cli import add_convert_parser
    from tune_spaces.cli import add_parser as add_tune_parser

    from .submit import add_parser as add_submit_parser

    add_convert_parser(sub)
    add_tune_parser(sub)
    add_submit_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """What libraries print on the driver by themselves (the tiny model's rope notice, save progress bars,
    DeepSpeed's accelerator guess when transformers imports it) stays off a quiet console."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not os.environ.get("RAY_ADDRESS"):  # a private local Ray: its workers share this machine's hardware
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["PHI3V_VERBOSE"] = "1"
    elif os.environ.get("PHI3V_VERBOSE", "") in ("", "0"):
        _quiet_libraries()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
