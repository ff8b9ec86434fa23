"""`phi3v-ray tune`: run or resume a sweep over a named search space.

    phi3v-ray tune --list
    phi3v-ray tune --space demo-lora                               # the demo, on a local Ray
    phi3v-ray tune --space docvqa-lora --num-samples 24 --search optuna \\
        checkpoint=/models/Phi-3.5-vision-instruct train_file=data/docvqa/train.jsonl \\
        val_file=data/docvqa/val.jsonl images_root=data/docvqa/images num_workers=4 use_gpu=true
    phi3v-ray tune --space docvqa-lora --resume ...                # after the sweep's driver died
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    text = "sweep learning rate, LoRA rank/alpha (and more) with Ray Tune"
    p = subparsers.add_parser("tune", help=text, description=text + ". Settings for every trial are key=value.")
    p.add_argument("--space", help="named search space (see --list) or a YAML file with one space")
    p.add_argument("--list", action="store_true", help="print the named search spaces and exit")
    p.add_argument("--num-samples", type=int, help="trials to sample (default: the space's)")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha", help="asha stops poor trials early")
    p.add_argument("--search", choices=("random", "optuna"), default="random")
    p.add_argument("--grace-period", type=int, help="ASHA: optimizer steps before a trial may be stopped")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: derived from the cluster)")
    p.add_argument("--name", help="experiment name under storage_path (default: tune-<space>)")
    p.add_argument("--resume", action="store_true", help="resume the sweep in storage_path/name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig settings for every trial")
    p.set_defaults(func=_tune)
    return p


def _tune(args) -> int:
    from phi3v_ray.config import ConfigError
    from phi3v_ray.launch import ClusterCannotFit

    from .spaces import SPACES, describe

    if args.list:
        for name in sorted(SPACES):
            print(describe(SPACES[name]))
        return 0
    if not args.space:
        print("phi3v-ray tune: give --space NAME (see --list)", file=sys.stderr)
        return 2
    from .run import run_sweep

    try:
        grid = run_sweep(args.space, num_samples=args.num_samples, scheduler=args.scheduler, search=args.search,
                         overrides=args.overrides, name=args.name, resume=args.resume, grace_period=args.grace_period,
                         max_concurrent=args.max_concurrent)
    except ConfigError as err:
        print(f"phi3v-ray tune: {err}", file=sys.stderr)
        return 2
    except ClusterCannotFit as err:
        print(f"phi3v-ray tune: {err}", file=sys.stderr)
        return 3
    return 1 if grid.num_errors == len(grid) else 0
