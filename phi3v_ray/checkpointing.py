"""What a checkpoint holds and how a worker writes and reads it.

    checkpoint_N/
      train_state.json        step, epoch, batches consumed, the metrics history, the config (rank 0)
      rng_rank{r}.pt          each rank's CPU (and CUDA) RNG state
      adapter/ | trainable.safetensors + optimizer.pt    DDP engine (rank 0)
      deepspeed/              DeepSpeed engine (every rank writes its optimizer shard)
      model/ | adapter/       final weights in the official layout / PEFT format (final checkpoint)
      manifest_rank{r}.json   written last by each rank: size and SHA-256 of every file that rank wrote

The weights are stored once: a final checkpoint of the DDP engine has model/ instead of
trainable.safetensors (resume reads the trained weights from there, `load_trainable_weights`), and
LoRA's adapter/ serves both.

Each rank writes its pieces into its own temporary directory and hands it to `ray.train.report`,
which merges them into one checkpoint directory in storage. A checkpoint is complete when all
world_size manifests are there and every file they list has its size and hash, and its safetensors
hold only finite floating values (`verify_checkpoint`); resume and export check that first.
Nothing here unpickles: `.pt` files are read with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Files of a Phi-3.5-vision checkpoint that are not weights; final weights carry them along.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "preprocessor_config.json", "generation_config.json", "added_tokens.json")
STATE_FILE = "train_state.json"
MANIFEST = "manifest_rank{rank}.json"


class CheckpointCorrupt(RuntimeError):
    """A checkpoint failed verification: missing, truncated or altered files, or non-finite weights."""


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro batches of the current epoch already consumed
    resumed_at: list[int] = field(default_factory=list)  # the step of every resume from a checkpoint


def write_checkpoint(directory: Path, engine, state: TrainState, history: list[dict], config: dict, rank: int,
                     final_weights_from: str | None = None) -> None:
    """This rank's part of a checkpoint; with final_weights_from (the base checkpoint dir), also the final weights."""
    engine.save(directory, rank, weights=final_weights_from is None)  # final: model/ or adapter/ holds them
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({"state": asdict(state), "history": history, "config": config},
                                                       indent=1))
        if final_weights_from is not None:
            export_weights(engine.model, directory, final_weights_from)
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    write_manifest(directory, rank, world_size)  # last: a checkpoint without every manifest is incomplete


def read_checkpoint(directory: Path, engine, rank: int) -> tuple[TrainState, list[dict]]:
    """Restore the engine (weights, optimizer, schedule) and this rank's RNG; returns (state, history).

    The caller has verified the checkpoint (`verify_checkpoint`).
    """
    engine.load(directory)
    saved = json.loads((directory / STATE_FILE).read_text())
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        if torch.is_tensor(rng):  # checkpoints before the CUDA state was saved
            rng = {"cpu": rng}
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**saved["state"]), saved.get("history", [])


# ----------------------------------------------------------------------------- manifests
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, rank: int, world_size: int) -> Path:
    """`manifest_rank{rank}.json`: size and SHA-256 of every file in this rank's piece, written atomically."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel.startswith("manifest_rank"):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    target = directory / MANIFEST.format(rank=rank)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"rank": rank, "world_size": world_size, "files": files}, indent=1))
    os.replace(tmp, target)
    return target


def verify_checkpoint(directory: Path, only: tuple[str, ...] | None = None) -> list[str]:
    """Every problem of a checkpoint directory (empty when it is complete and intact), each naming the file.

    With `only` (path prefixes, e.g. ("model/", "train_state.json")), just the listed files under those are
    checked: what an export fetched of a checkpoint in a bucket. Every rank's manifest is still required.
    """
    directory = Path(directory)
    manifests = sorted(directory.glob("manifest_rank*.json"))
    if not manifests:
        return [f"{directory}: no manifest_rank*.json (unfinished, or written before checkpoints had manifests)"]
    problems, world_size, listed = [], None, {}
    for path in manifests:
        try:
            manifest = json.loads(path.read_text())
            world_size = int(manifest["world_size"])
            listed.update(manifest["files"])
        except (ValueError, KeyError, TypeError) as err:
            problems.append(f"{path}: unreadable manifest ({err})")
    if world_size is not None:
        missing = [r for r in range(world_size) if not (directory / MANIFEST.format(rank=r)).is_file()]
        if missing:
            problems.append(f"{directory}: manifests of ranks {missing} missing (a rank's piece never arrived)")
    for rel, entry in sorted(listed.items()):
        if only is not None and not rel.startswith(only):
            continue
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or overwritten)")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest (the bytes were altered)")
        elif path.suffix == ".safetensors":
            problems += _non_finite(path)
    return problems


def _non_finite(path: Path) -> list[str]:
    """Floating tensors with NaN or infinite values in a safetensors file."""
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{path}: tensor {name} holds {int((~torch.isfinite(t)).sum())} non-finite values")
    return bad


def check_checkpoint(directory: Path) -> None:
    """Raise CheckpointCorrupt naming every problem of the checkpoint."""
    problems = verify_checkpoint(directory)
    if problems:
        raise CheckpointCorrupt(f"checkpoint {directory} failed verification: " + "; ".join(problems))


def export_weights(model, directory: Path, base_checkpoint: str) -> Path:
    """Final weights: the official safetensors layout (model/), or the PEFT adapter (adapter/) for LoRA/QLoRA."""
    if hasattr(model, "peft_config"):
        target = directory / "adapter"
        if not target.is_dir():  # DDP checkpoints already hold it
            model.save_pretrained(target, safe_serialization=True)
    else:
        target = directory / "model"
        model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        source = Path(base_checkpoint) / name
        if source.is_file():
            shutil.copy(source, target / name)
    return target
