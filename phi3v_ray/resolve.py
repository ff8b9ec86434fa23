"""What the driver settles before any worker starts: paths, the weights an eval reads, and resumes.

    cfg = absolute_paths(cfg)                  # paths typed by the user, resolved where they typed them
    target = eval_target("runs/phi3v-demo")    # a run, a checkpoint, its model/ or adapter/, or a weights folder
    check_resume(cfg)                          # refuses to resume a run that was trained with other settings

Ray Train starts each worker in its own working directory, so a relative path must become absolute
here; a checkpoint path that is not a directory is never taken for a Hub repo id unless the user
allows downloads (`allow_download=true`), and then it is fetched here, once, not on every worker.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, Problem, TrainConfig
from .storage import is_remote, list_checkpoints, read_text

PATH_SETTINGS = ("checkpoint", "train_file", "val_file", "images_root", "storage_path")
# Settings a run cannot change and still resume: the weights, what trains, and how it is sharded.
RESUME_FINGERPRINT = ("mode", "checkpoint", "lora_rank", "lora_alpha", "lora_vision", "freeze_text_embedding",
                      "resolved_zero_stage", "train_file")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute from the driver's working directory (URIs and 'tiny' stay as they are)."""
    flat = cfg.to_flat()
    changes = {}
    for name in PATH_SETTINGS:
        value = flat[name]
        if value and not is_remote(value) and not (name == "checkpoint" and value == "tiny"):
            local = Path(value).expanduser()
            if name == "checkpoint" and not local.exists() and HUB_ID.match(value) and not value.startswith("."):
                continue  # maybe a Hub id: `fetch_hub_checkpoint` or the path check decides
            changes[name] = str(local.absolute())
    return cfg.replace(**changes) if changes else cfg


def fetch_hub_checkpoint(cfg: TrainConfig) -> TrainConfig:
    """`checkpoint=org/name` with allow_download=true: the Hub snapshot (weights as safetensors, configs,
    tokenizer; never code), fetched once on the driver. Without allow_download nothing is looked up."""
    value = cfg.checkpoint
    if value == "tiny" or is_remote(value) or Path(value).exists() or not HUB_ID.match(value):
        return cfg
    if not cfg.allow_download:
        raise ConfigError([Problem("checkpoint", value, "no such directory; if it is a Hugging Face Hub repo id, "
                                                        "add allow_download=true to fetch it (nothing is downloaded "
                                                        "otherwise), or download it and give the directory")])
    from huggingface_hub import snapshot_download

    local = snapshot_download(value, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])
    return cfg.replace(checkpoint=local)


# ----------------------------------------------------------------------------- what `eval` reads
@dataclass(frozen=True)
class EvalTarget:
    """The weights an evaluation loads and the settings they were trained with."""

    weights: str  # a folder in the official layout (model/, an export, or the base for an adapter)
    trained: str = ""  # a checkpoint whose trainable weights go on top (adapter/ or trainable.safetensors)
    settings: dict | None = None  # the config stored with the checkpoint (None for a plain weights folder)
    run_name: str = ""  # the trained run's name


def eval_target(path: str) -> EvalTarget:
    """A run directory (its newest checkpoint holding final weights), a checkpoint directory, its
    model/ or adapter/ subfolder, or a folder of weights in the official layout (an export, a base)."""
    from .checkpointing import STATE_FILE, check_checkpoint

    root = Path(path)
    if root.name in ("model", "adapter") and (root.parent / STATE_FILE).is_file():
        root = root.parent
    checkpoints = [] if (root / STATE_FILE).is_file() else list_checkpoints(str(root))
    if checkpoints:
        final = [c for c in checkpoints if (Path(c) / "model").is_dir() or (Path(c) / "adapter").is_dir()]
        if not final:
            raise ConfigError([Problem("checkpoint", path, "this run has no finished checkpoint (model/ or adapter/); "
                                                           "finish it or name one of its checkpoint_* directories")])
        root = Path(final[0])
    if (root / STATE_FILE).is_file():
        check_checkpoint(root)  # CheckpointCorrupt naming the file: never evaluate damaged weights
        settings = json.loads((root / STATE_FILE).read_text())["config"]
        name = settings.get("name", "")
        base = settings.get("checkpoint", "")
        if (root / "model").is_dir():
            return EvalTarget(str(root / "model"), "", settings, name)
        if (root / "adapter").is_dir() or (root / "trainable.safetensors").is_file():
            return EvalTarget(base, str(root), settings, name)
        raise ConfigError([Problem("checkpoint", path, "this checkpoint holds only DeepSpeed shards (an intermediate "
                                                       "ZeRO checkpoint); evaluate the run's final checkpoint")])
    if (root / "config.json").is_file():
        return EvalTarget(str(root))
    raise ConfigError([Problem("checkpoint", path, "neither a run, a checkpoint, nor a folder of weights "
                                                   "(no train_state.json, checkpoint_* or config.json there)")])


def eval_config(source: str | None, overrides: list[str], checkpoint: str) -> tuple[TrainConfig, list[Problem]]:
    """`phi3v-ray eval checkpoint=…`'s config: the settings stored with the checkpoint, then the preset or
    YAML, then the command line; under its own run name (`<run>-eval`, beside the run), so it never
    resumes or overwrites the run it evaluates."""
    from .config import parse_overrides, read_config, resolve_key

    given = {resolve_key(k) or k for k in parse_overrides(overrides)}
    target = eval_target(checkpoint if is_remote(checkpoint) else str(Path(checkpoint).expanduser().absolute()))
    base = {k: v for k, v in (target.settings or {}).items() if k not in _NOT_INHERITED}
    if not target.settings and "mode" not in given:
        base["mode"] = "full"  # plain weights: evaluate them as they are, no fresh adapters
    cfg, problems = read_config(source, overrides, base=base)
    changes = {"checkpoint": target.weights, "eval_only": True, "trained_checkpoint": target.trained}
    if "name" not in given:
        changes["name"] = f"{target.run_name or Path(target.weights).name}-eval"
    if target.trained or target.settings:
        run_dir = Path(target.trained or target.weights).parent
        if target.settings and not target.trained:  # weights = <checkpoint>/model
            run_dir = run_dir.parent
        if "storage_path" not in given:
            changes["storage_path"] = str(run_dir.parent)
    return cfg.replace(**changes), problems


_NOT_INHERITED = ("name", "storage_path", "fault_injection", "max_steps", "eval_only", "trained_checkpoint", "checkpoint")


# ----------------------------------------------------------------------------- resuming a named run
def check_resume(cfg: TrainConfig) -> None:
    """Refuse to resume a run whose newest checkpoint was trained with settings this start changes."""
    for path in list_checkpoints(cfg.run_dir):
        text = read_text(f"{path}/train_state.json")
        if text is None:
            continue
        try:
            stored = TrainConfig.from_dict(json.loads(text)["config"])
        except (ConfigError, KeyError, ValueError):
            return  # written by another version: nothing reliable to compare
        changed = [(key, _value(stored, key), _value(cfg, key)) for key in RESUME_FINGERPRINT
                   if _value(stored, key) != _value(cfg, key)]
        if changed:
            was = ", ".join(f"{k}={a!r}" for k, a, _ in changed)
            now = ", ".join(f"{k}={b!r}" for k, _, b in changed)
            raise ConfigError([Problem("name", cfg.name, (
                f"a run of this name in {cfg.run_dir} was trained with {was}; this start asks {now}, and resuming "
                f"would mix the two. Give this run another name (name={cfg.name}-{cfg.mode}), or move "
                f"{cfg.run_dir} away to start it over"))])
        return


def _value(cfg: TrainConfig, key: str):
    value = getattr(cfg, key) if hasattr(cfg, key) else getattr(cfg.data, key)
    if key in ("lora_rank", "lora_alpha", "lora_vision"):
        return value if cfg.mode_enum.uses_lora else None
    if isinstance(value, str) and value and not is_remote(value) and key in PATH_SETTINGS:
        return str(Path(value).expanduser().absolute())
    return value
