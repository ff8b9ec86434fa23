"""Search spaces for Ray Tune sweeps: plain data, validated, converted to `ray.tune` domains in one place.

A space names the preset and mode its trials start from, what to sample, the metric to optimise,
and how many trials to run by default:

    "docvqa-lora": preset docvqa, mode lora, lr log-uniform 5e-5..1e-3, rank 8..128, alpha/rank 0.5..2

Each sampled key is a `TrainConfig` setting (short or dotted name: `num_crops` or `data.num_crops`) or a
derived key (`lora_alpha_ratio`: alpha = ratio × rank). Every candidate value is checked against
TrainConfig's validation before a sweep starts.
A spec is a one-key dict, e.g. {"loguniform": [1e-5, 1e-3]}, {"uniform": [0, 0.1]},
{"choice": [8, 16, 32]} or {"grid": ["H100", "L4"]} (every value, num_samples times); a plain value
is fixed. Learning-rate ranges sit around the recipe's values (SPEC §5): full fine-tuning
5e-6..5e-5 (published 1e-5..2e-5), LoRA/QLoRA around 2e-4.

    phi3v-ray tune --list                         # every space below
    phi3v-ray tune --space docvqa-lora checkpoint=/models/Phi-3.5-vision-instruct train_file=... use_gpu=true
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml

from phi3v_ray.config import ConfigError, Mode, ModeName, Problem, TrainConfig, load_config, resolve_key

DERIVED_KEYS = {"lora_alpha_ratio": "LoRA alpha as a multiple of the rank: lora_alpha = ratio × lora_rank"}
SPEC_KINDS = ("loguniform", "uniform", "choice", "grid")
METRICS = ("loss", "val/accuracy", "val/anls", "val/anls_cased", "val/roc_auc")  # what the training loop reports

# The recipe's neighbourhoods (SPEC §5); "ours" where the recipe publishes a single value.
FULL_LR = {"loguniform": [5e-6, 5e-5]}
LORA_LR = {"loguniform": [5e-5, 1e-3]}
LORA_RANK = {"choice": [8, 16, 32, 64, 128]}
ALPHA_RATIO = {"choice": [0.5, 1, 2]}  # published: r32 α16 (0.5) on DocVQA, r128 α256 (2) on memes

# Every sweep trial evaluates on a subset and skips the step-0 evaluation (all trials start from
# the same weights, and LoRA's zero-initialised B makes the adapters a no-op there).
SWEEP_EVAL = {"eval_before": False, "eval_max_samples": 500}


@dataclass(frozen=True)
class SweepSpace:
    """One named search space: where trials start, what they sample, what decides."""

    name: str
    preset: str  # phi3v_ray preset (or YAML file) the trials start from
    mode: str  # training mode, applied before the preset's per-mode section
    metric: str  # reported metric to optimise
    metric_mode: str  # "min" or "max"
    num_samples: int  # default trial count (each grid value counts once per sample)
    params: dict[str, Any]  # key → spec (sampled) or plain value (fixed)
    settings: dict[str, Any] = field(default_factory=dict)  # fixed TrainConfig overrides for every trial
    grace_period: int = 1  # ASHA: optimizer steps before a trial may be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _lora(name, preset, metric, mode="lora", grace=200, **extra) -> SweepSpace:
    params = {"lr": LORA_LR, "lora_rank": LORA_RANK, "lora_alpha_ratio": ALPHA_RATIO, **extra.pop("params", {})}
    return SweepSpace(name=name, preset=preset, mode=mode, metric=metric, metric_mode="max", params=params,
                      settings={**SWEEP_EVAL, **extra.pop("settings", {})}, grace_period=grace, **extra)


def _full(name, preset, metric, mode="full", grace=200, **extra) -> SweepSpace:
    return SweepSpace(name=name, preset=preset, mode=mode, metric=metric, metric_mode="max", params={"lr": FULL_LR},
                      settings={**SWEEP_EVAL, **extra.pop("settings", {})}, grace_period=grace, **extra)


SPACES: dict[str, SweepSpace] = {s.name: s for s in (
    SweepSpace(
        name="demo-lora", preset="demo", mode="lora", metric="loss", metric_mode="min", num_samples=4,
        params={"lr": {"loguniform": [2e-4, 2e-2]}, "lora_rank": {"choice": [4, 8, 16]}, "lora_alpha_ratio": {"choice": [1, 2]}},
        # one CPU per trial's worker (the demo preset gives its single run both cores): two trials side by side
        settings={"num_workers": 1, "cpus_per_worker": 1, "epochs": 1, "max_steps": 20, "log_every": 1, "report_every_s": 0,
                  "eval_before": False},
        grace_period=4,
        description="the embedded demo (tiny model, CPU): LoRA lr × rank × alpha on training loss, minutes on a laptop",
    ),
    _lora("docvqa-lora", "docvqa", "val/anls", num_samples=16,
          description="DocVQA LoRA (published r32 α16 at 2e-4: ANLS 82.46)"),
    _lora("docvqa-qlora", "docvqa", "val/anls", mode="qlora", num_samples=16,
          description="DocVQA QLoRA (published 81.85)"),
    _lora("docvqa-qlora-l4", "docvqa", "val/anls", mode="qlora", num_samples=16,
          params={"micro_batch": {"choice": [1, 2]}, "num_crops": {"choice": [4, 8, 16]}},
          settings={"accelerator_type": "L4"},
          description="DocVQA QLoRA on an L4 pool (24 GB): also micro batch and crop budget"),
    _full("docvqa-full", "docvqa", "val/anls", num_samples=8,
          description="DocVQA full fine-tuning, ZeRO-2 (published 83.65)"),
    _lora("hateful_memes-lora", "hateful_memes", "val/accuracy", grace=100, num_samples=16,
          description="hateful memes LoRA (published r128 α256 at 2e-4: accuracy 86.6)"),
    _lora("hateful_memes-qlora", "hateful_memes", "val/accuracy", mode="qlora", grace=100, num_samples=16,
          description="hateful memes QLoRA (published 84.0)"),
    _full("hateful_memes-full", "hateful_memes", "val/accuracy", grace=100, num_samples=8,
          description="hateful memes full fine-tuning (published 86.4)"),
    _full("nlvr2-full", "nlvr2", "val/accuracy", grace=500, num_samples=8,
          description="NLVR2 full fine-tuning (published 89.40 at lr 1e-5, 3 epochs)"),
    _full("nlvr2-frozen_vision", "nlvr2", "val/accuracy", mode="frozen_vision", grace=500, num_samples=8,
          description="NLVR2 with the vision tower frozen (published 89.20)"),
    _lora("ucf101-lora", "ucf101", "val/accuracy", grace=100, num_samples=12,
          description="UCF-101 (8 frames per clip) LoRA"),
)}


# ----------------------------------------------------------------- lookup
def space_names() -> list[str]:
    return sorted(SPACES)


def get_space(name_or_path: str) -> SweepSpace:
    """A named space, or a YAML file holding one space's fields; validated."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError([Problem("space", name_or_path, "file not found")], what="search space")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError([Problem("space", name_or_path, "expected a mapping of SweepSpace fields")],
                              what="search space")
        data.setdefault("name", path.stem)
        known = {f.name for f in dataclasses.fields(SweepSpace)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([Problem(k, data[k], f"unknown key in {name_or_path}; space fields: {sorted(known)}")
                               for k in unknown], what="search space")
        space = SweepSpace(**data)
    elif name_or_path in SPACES:
        space = SPACES[name_or_path]
    else:
        raise ConfigError([Problem("space", name_or_path, f"neither a YAML file nor a named space; spaces: "
                                                          f"{', '.join(space_names())}")], what="search space")
    validate_space(space)
    return space


def describe(space: SweepSpace) -> str:
    shown = ", ".join(f"{k} {_spec_text(v)}" for k, v in space.params.items())
    return (f"{space.name:<22} {space.preset + '/' + space.mode:<26} {space.metric_mode} {space.metric:<13} "
            f"{space.num_samples:>3} trials  {shown}")


def _spec_text(spec) -> str:
    if not isinstance(spec, dict):
        return f"={spec!r}"
    (kind, args), = spec.items()
    return f"{kind}{list(args)}"


# ----------------------------------------------------------------- validation
def validate_space(space: SweepSpace) -> SweepSpace:
    """Check the space's fields and every candidate value against TrainConfig; raise one ConfigError.

    Each fixed setting is checked against the preset (in the space's mode), each sampled value
    against the preset with the fixed settings applied: a value the trainer would reject is
    reported with its field, whichever trial would have drawn it.
    """
    problems: list[Problem] = []
    try:
        preset = load_config(space.preset, {"mode": space.mode})
        problems += preset.value_problems()
    except ConfigError as err:
        problems += err.problems
        preset = TrainConfig()  # still check the values against the defaults
    if space.metric_mode not in ("min", "max"):
        problems.append(Problem("metric_mode", space.metric_mode, "use min or max"))
    if space.metric not in METRICS:
        problems.append(Problem("metric", space.metric, f"use one of {list(METRICS)}"))
    for name in ("num_samples", "grace_period"):
        if getattr(space, name) < 1:
            problems.append(Problem(name, getattr(space, name), "must be ≥ 1"))
    if not space.reduction_factor > 1:
        problems.append(Problem("reduction_factor", space.reduction_factor, "must be > 1"))
    sampled = {resolve_key(k) or k for k in space.params}
    if {"lora_alpha", "lora_alpha_ratio"} <= sampled:
        problems.append(Problem("params", sorted(space.params), "sample lora_alpha or lora_alpha_ratio, not both"))
    both = sorted(sampled & {resolve_key(k) or k for k in space.settings})
    if both:
        problems.append(Problem("params", both, "both sampled and fixed in settings; keep one"))
    uses_lora = space.mode in get_args(ModeName) and Mode(space.mode).uses_lora

    try:
        trial_base = preset.replace(**{k: v for k, v in space.settings.items() if k not in DERIVED_KEYS})
    except ConfigError:  # reported below, value by value
        trial_base = preset
    for entries, base in ((space.settings, preset), (space.params, trial_base)):
        for key, spec in entries.items():
            name = resolve_key(key) or (key if key in DERIVED_KEYS else None)
            if name is None:
                close = difflib.get_close_matches(key, TrainConfig.setting_names() + list(DERIVED_KEYS), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(Problem(key, spec, f"unknown key; {hint}use a TrainConfig setting or one of "
                                                   f"{sorted(DERIVED_KEYS)}"))
                continue
            if name.startswith("lora_") and not uses_lora:
                problems.append(Problem(key, spec, f"has no effect in mode={space.mode!r}"))
            values, problem = candidate_values(spec)
            if problem:
                problems.append(Problem(key, spec, problem))
                continue
            for value in values:
                problems += candidate_problems(base, key, value)
    if problems:
        raise ConfigError(problems, what=f"search space {space.name!r}")
    return space


def candidate_values(spec) -> tuple[list, str | None]:
    """The values a spec can produce at its edges (range ends, every choice); (values, problem)."""
    if not isinstance(spec, dict):
        return [spec], None
    if len(spec) != 1:
        return [], f"a spec has exactly one kind of {list(SPEC_KINDS)}"
    (kind, args), = spec.items()
    if kind not in SPEC_KINDS:
        return [], f"unknown kind {kind!r}; use one of {list(SPEC_KINDS)}"
    if not isinstance(args, (list, tuple)) or not args:
        return [], f"{kind} takes a non-empty list"
    if kind in ("loguniform", "uniform"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
            return [], f"{kind} takes [low, high] with low < high"
        if kind == "loguniform" and args[0] <= 0:
            return [], "loguniform needs low > 0"
    return list(args), None


def candidate_problems(base: TrainConfig, key: str, value) -> list[Problem]:
    """What TrainConfig's validation finds when a trial sets key=value on base, and not on base itself.

    Only the checks that need no files on this machine (`TrainConfig.value_problems`): types,
    choices, ranges and how settings combine (e.g. micro_batch × num_workers vs global_batch).
    """
    if key == "lora_alpha_ratio":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        return [] if ok else [Problem(key, value, "must be a number > 0")]
    try:
        cfg = base.replace(**{key: value})
    except ConfigError as err:  # a value of the wrong type
        return err.problems
    before = base.value_problems()
    return [p for p in cfg.value_problems() if p not in before]


# ----------------------------------------------------------------- conversion
def to_tune(params: dict[str, Any]) -> dict[str, Any]:
    """Specs → `ray.tune` domains (the one place that knows Tune's sampling API)."""
    from ray import tune

    make = {
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    out = {}
    for key, spec in params.items():
        if isinstance(spec, dict):
            (kind, args), = spec.items()
            out[key] = make[kind](args)
        else:
            out[key] = spec
    return out


def apply_sample(base: dict[str, Any] | TrainConfig, sample: dict[str, Any]) -> TrainConfig:
    """A trial's TrainConfig: the sweep's base (a TrainConfig or its dict) + this trial's sample, derived keys resolved."""
    sample = dict(sample)
    ratio = sample.pop("lora_alpha_ratio", None)
    cfg = (base if isinstance(base, TrainConfig) else TrainConfig.from_dict(base)).replace(**sample)
    if ratio is not None:
        cfg = cfg.replace(lora_alpha=float(ratio) * cfg.lora_rank)
    return cfg
