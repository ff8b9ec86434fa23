"""The training config: one typed dataclass, loaded from a preset or YAML plus `key=value` overrides.

Every field's help text doubles as CLI help (`phi3v-ray train --help-config`). `validate()` runs on
the driver before any worker starts and reports every problem at once, each with the field, the
bad value and the fix. Dicts exist only at Ray's boundaries (`train_loop_config`, Tune's
`param_space`); workers rebuild the dataclass first thing.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .modes import Mode


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # --- run ---
    name: str = _f("phi3v-demo", "run name; the same name + storage_path resumes the run")
    storage_path: str = _f("", "where checkpoints and results go (local path, NFS, s3://, gs://); default $PHI3V_STORAGE_PATH or ./runs")
    seed: int = _f(0, "seed for weights of new adapters, dropout and data order")
    # --- model ---
    checkpoint: str = _f("tiny", "checkpoint directory in the official layout, or 'tiny' to write a random tiny one")
    mode: str = _f("lora", "full | frozen_vision | lora | qlora")
    precision: str = _f("auto", "auto | bf16 | fp16 | fp32 (auto picks from the GPU the worker gets)")
    attention: str = _f("auto", "auto | flash_attention_2 | sdpa | eager")
    gradient_checkpointing: bool = _f(True, "non-reentrant activation checkpointing of every layer")
    freeze_text_embedding: bool = _f(False, "also freeze the token embedding (the recipe did this by accident in frozen_vision)")
    lora_rank: int = _f(64, "LoRA rank r")
    lora_alpha: float = _f(128.0, "LoRA alpha (the recipe uses 2·rank)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_vision: bool = _f(True, "LoRA adapters on CLIP and the projector too")
    zero_stage: int = _f(-1, "DeepSpeed ZeRO stage: 2, or 0 for plain DDP; -1 = 2 for full fine-tuning, 0 otherwise")
    # --- data ---
    train_file: str = _f("", "training jsonl (the recipe's record format)")
    val_file: str = _f("", "validation jsonl for evaluation during training (optional)")
    images_root: str = _f("", "directory the records' image paths are relative to")
    num_crops: int = _f(16, "HD crop budget per image, 1..16 (recipe: 16 for documents, 4 for video frames)")
    max_length: int = _f(8192, "longest tokenized example")
    overflow: str = _f("reject", "reject | truncate: what to do with examples longer than max_length (truncate drops earliest turns)")
    on_bad_record: str = _f("fail", "fail | skip: skip writes each bad record to a quarantine file and counts it")
    # --- optimisation ---
    lr: float = _f(2e-4, "peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases, norms and separators)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-7, "AdamW epsilon")
    warmup_steps: int = _f(50, "linear warmup steps")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    epochs: int = _f(1, "passes over the training data")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = run all epochs)")
    micro_batch: int = _f(1, "examples per worker per forward pass")
    grad_accum: int = _f(0, "micro batches per optimizer step; 0 = derive from global_batch")
    global_batch: int = _f(64, "examples per optimizer step across all workers (used when grad_accum is 0)")
    # --- cluster ---
    num_workers: int = _f(1, "training workers (one per GPU)")
    use_gpu: bool = _f(False, "train on GPUs")
    accelerator_type: str = _f("", "Ray accelerator type to request, e.g. H100, A100, L4 (empty = any)")
    worker_resource: str = _f("", "custom resource each training worker takes one unit of (a node pool's label; empty = none)")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per training worker")
    preprocess_cpus: float = _f(0.5, "CPUs per Ray Data preprocessing actor")
    preprocess_actors: int = _f(1, "Ray Data preprocessing actors")
    data_node_resource: str = _f("", "custom resource that marks CPU nodes for preprocessing (empty = anywhere)")
    max_failures: int = _f(2, "worker failures to recover from (restarts from the latest checkpoint)")
    # --- checkpoints, evaluation, logging ---
    checkpoint_every: int = _f(0, "save a checkpoint every N optimizer steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints to keep")
    eval_every: int = _f(0, "evaluate every N optimizer steps (0 = only before and after training)")
    eval_before: bool = _f(True, "evaluate before the first step")
    eval_max_samples: int = _f(0, "evaluate on at most this many validation records (0 = all)")
    eval_batch: int = _f(4, "prompts per generation batch")
    max_new_tokens: int = _f(64, "generation length cap (recipe: 64)")
    log_every: int = _f(1, "report metrics every N optimizer steps")
    fault_injection: str = _f("", "chaos testing: 'rank:step:marker_file' makes that worker's process exit once after that step")
    eval_only: bool = _f(False, "evaluate the checkpoint on val_file and stop (what `phi3v-ray eval` runs)")

    # ----------------------------------------------------------------- derived values
    @property
    def mode_enum(self) -> Mode:
        return Mode(self.mode)

    @property
    def accumulation(self) -> int:
        """Micro batches per optimizer step, computed once from the batch settings."""
        if self.grad_accum > 0:
            return self.grad_accum
        return max(1, self.global_batch // max(1, self.micro_batch * self.num_workers))

    @property
    def effective_global_batch(self) -> int:
        return self.micro_batch * self.num_workers * self.accumulation

    @property
    def resolved_zero_stage(self) -> int:
        if self.zero_stage >= 0:
            return self.zero_stage
        return 2 if self.mode_enum is Mode.FULL else 0

    @property
    def resolved_storage_path(self) -> str:
        path = self.storage_path or os.environ.get("PHI3V_STORAGE_PATH") or "runs"
        return path if "://" in path else str(Path(path).expanduser().resolve())

    def worker_resources(self) -> dict[str, float]:
        """What one training worker holds: CPUs, a GPU, the accelerator type and pool label it asks for."""
        need = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            need["GPU"] = 1
        if self.accelerator_type:
            need[f"accelerator_type:{self.accelerator_type}"] = 0.001  # how Ray itself requests a type
        if self.worker_resource:
            need[self.worker_resource] = 1
        return need

    # ----------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError([f"unknown key {k!r}{_suggest(k, names)}" for k in unknown])
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "TrainConfig":
        """Check every field; raise ConfigError listing all problems with their fixes."""
        problems = []

        def bad(name, fix):
            problems.append(f"{name}={getattr(self, name)!r}: {fix}")

        valid_mode = self.mode in [m.value for m in Mode]
        if not valid_mode:
            bad("mode", f"use one of {[m.value for m in Mode]}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            bad("precision", "use auto, bf16, fp16 or fp32")
        if self.attention not in ("auto", "flash_attention_2", "sdpa", "eager"):
            bad("attention", "use auto, flash_attention_2, sdpa or eager")
        if not 1 <= self.num_crops <= 16:
            bad("num_crops", "must be in 1..16")
        if self.overflow not in ("reject", "truncate"):
            bad("overflow", "use reject or truncate")
        if self.on_bad_record not in ("fail", "skip"):
            bad("on_bad_record", "use fail or skip")
        for name in ("lr", "adam_eps", "max_grad_norm"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            problems.append(f"adam_beta1/adam_beta2=({self.adam_beta1}, {self.adam_beta2}): each must be in [0, 1)")
        for name in ("micro_batch", "num_workers", "epochs", "lora_rank", "max_new_tokens", "eval_batch", "max_length", "log_every"):
            if getattr(self, name) < 1:
                bad(name, "must be ≥ 1")
        for name in ("warmup_steps", "max_steps", "checkpoint_every", "eval_every", "eval_max_samples", "grad_accum", "max_failures"):
            if getattr(self, name) < 0:
                bad(name, "must be ≥ 0")
        per_pass = self.micro_batch * self.num_workers
        if self.grad_accum == 0 and per_pass > 0 and self.global_batch % per_pass:
            bad("global_batch", f"must be a multiple of micro_batch × num_workers = {self.micro_batch * self.num_workers}, "
                                "or set grad_accum explicitly")
        if self.zero_stage not in (-1, 0, 2):
            bad("zero_stage", "use 2 (ZeRO-2), 0 (plain DDP) or -1 (automatic)")
        if valid_mode and self.mode_enum is Mode.QLORA:
            if self.resolved_zero_stage == 2:
                bad("zero_stage", "QLoRA's 4-bit base cannot be sharded by ZeRO-2 here; use zero_stage=0")
            if self.precision == "fp32" and self.use_gpu:
                bad("precision", "QLoRA computes in bf16 or fp16 on GPUs")
        if self.lora_alpha <= 0:
            bad("lora_alpha", "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.cpus_per_worker < 0 or self.preprocess_cpus <= 0:
            problems.append(f"cpus_per_worker={self.cpus_per_worker}, preprocess_cpus={self.preprocess_cpus}: need ≥ 0 and > 0")
        if self.checkpoint != "tiny" and "://" not in self.checkpoint and not Path(self.checkpoint).is_dir():
            bad("checkpoint", "not a directory; point it at a Phi-3.5-vision checkpoint, or use 'tiny'")
        if self.train_file and not Path(self.train_file).is_file():
            bad("train_file", "file not found")
        if self.val_file and not Path(self.val_file).is_file():
            bad("val_file", "file not found")
        if not self.train_file and not self.eval_only:
            bad("train_file", "set a training jsonl (or run the default demo: `phi3v-ray train` with no config)")
        if self.eval_only and not self.val_file:
            bad("val_file", "evaluation needs a validation jsonl")
        if (self.train_file or self.val_file) and (not self.images_root or not Path(self.images_root).is_dir()):
            bad("images_root", "set it to the directory the records' image paths are relative to")
        if problems:
            raise ConfigError(problems)
        return self


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid training config:\n  - " + "\n  - ".join(problems))


def _suggest(key: str, names: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(cls, name: str, value):
    """YAML and key=value strings → the field's type."""
    ftype = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if isinstance(value, str) and ftype != "str":
        value = yaml.safe_load(value) if value != "" else value
    try:
        if ftype == "bool":
            if isinstance(value, str):
                raise ValueError
            return bool(value)
        if ftype == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if ftype == "float":
            return float(value)
        if ftype == "str":
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError([f"{name}={value!r}: expected {ftype}"]) from None
    return value


# ----------------------------------------------------------------- presets and overrides
def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("phi3v_ray.presets").iterdir() if p.name.endswith(".yaml"))


def read_yaml_config(source: str) -> dict[str, Any]:
    """A preset name or a YAML file → a flat dict; a `modes:` section holds per-mode overrides."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError([f"config file {source!r} not found"])
        text = path.read_text()
    elif source in preset_names():
        text = resources.files("phi3v_ray.presets").joinpath(f"{source}.yaml").read_text()
    else:
        raise ConfigError([f"config {source!r} is neither a YAML file nor a preset; presets: {', '.join(preset_names())}"])
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping of key: value"])
    return data


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"override {item!r}: write key=value"])
        out[key.strip()] = value
    return out


def load_config(source: str | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Preset/YAML (or the defaults) + overrides → TrainConfig. Per-mode sections apply after `mode` is known."""
    data = read_yaml_config(source) if source else {}
    over = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    modes = data.pop("modes", {}) or {}
    mode = str(over.get("mode", data.get("mode", TrainConfig.mode)))
    merged = {**data, **(modes.get(mode) or {}), **over}
    if modes and mode not in modes:
        raise ConfigError([f"mode={mode!r}: this preset publishes {sorted(modes)}"])
    return TrainConfig.from_dict(merged)


def config_help() -> str:
    lines = []
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  {f.name:<24} {f.type:<6} default {f.default!r:<14} {f.metadata.get('help', '')}")
    return "\n".join(lines)
