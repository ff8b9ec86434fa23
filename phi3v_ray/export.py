"""Export a run's final weights in the official safetensors layout.

Full and frozen-vision runs already hold `model/` in that layout. LoRA and QLoRA runs hold a PEFT
`adapter/`; it is merged into the (unquantized) base model, so the result loads with
`Phi3VForCausalLM.from_pretrained` and in the official code alike. A checkpoint that fails
verification (manifest sizes, SHA-256, finite weights) is refused.

A run or checkpoint on object storage (`--run s3://bucket/runs/name`, gs://, abfs://) exports the same
way from any machine with read access: only what the export reads is downloaded (train_state.json, the
manifests, and model/ or adapter/; a full fine-tune's optimizer shards are tens of GB and stay where
they are), into a hidden folder beside `out`, and checked against the manifests before anything is
written to `out`. `out` is a local folder; to publish the export, upload it (`aws s3 sync`,
`gcloud storage rsync`, `azcopy copy --recursive`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .checkpointing import STATE_FILE, TOKENIZER_FILES, CheckpointCorrupt, check_checkpoint, verify_checkpoint
from .storage import is_dir, is_remote, join, list_checkpoints, list_files

WEIGHT_FOLDERS = ("model", "adapter")


def latest_checkpoint(run_dir: str | Path) -> Path | str:
    """The newest `checkpoint_*` directory of a run that holds final weights (a URI for a run on object storage)."""
    if is_remote(str(run_dir)):
        for ckpt in list_checkpoints(str(run_dir)):  # newest first, by Ray's time-stamped names
            if any(is_dir(join(ckpt, folder)) for folder in WEIGHT_FOLDERS):
                return ckpt
        raise FileNotFoundError(f"{run_dir}: no checkpoint with final weights (model/ or adapter/) found")
    candidates = sorted(Path(run_dir).glob("checkpoint_*"), key=lambda p: p.stat().st_mtime)
    final = [c for c in candidates if (c / "model").is_dir() or (c / "adapter").is_dir()]
    if not final:
        raise FileNotFoundError(f"{run_dir}: no checkpoint with final weights (model/ or adapter/) found")
    return final[-1]


def export(out: str | Path, run: str | None = None, checkpoint: str | None = None, base: str | None = None) -> Path:
    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of --run or --checkpoint")
    if is_remote(str(out)):
        raise ValueError(f"--out {out}: export writes a local folder; export there, then upload it "
                         f"(aws s3 sync / gcloud storage rsync / azcopy copy --recursive)")
    source = latest_checkpoint(run) if run else checkpoint
    out = Path(out)
    if not is_remote(str(source)):
        check_checkpoint(Path(source))  # CheckpointCorrupt naming the file: never export damaged weights
        return _write(Path(source), out, base, move=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside `out`: the same disk, so model/ is moved into place rather than copied, and gone on any failure.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.download-", dir=out.parent) as tmp:
        _fetch_verified(str(source), Path(tmp))
        return _write(Path(tmp), out, base, move=True)


def _fetch_verified(uri: str, dest: Path) -> None:
    """Download the parts of the checkpoint at `uri` that an export reads, and check them against its manifests."""
    listing = list_files(uri)
    folder = next((f for f in WEIGHT_FOLDERS if any(rel.startswith(f"{f}/") for rel in listing)), None)
    if folder is None:
        raise FileNotFoundError(f"{uri}: holds neither model/ nor adapter/ (not a run's final checkpoint)"
                                if listing else f"{uri}: no files (expected a checkpoint_* directory)")
    manifests = {rel for rel in listing if "/" not in rel and rel.startswith("manifest_rank")}
    wanted = {rel: sig for rel, sig in listing.items() if rel.startswith(f"{folder}/") or rel in (STATE_FILE, *manifests)}
    from .weights import download_files

    download_files(uri, wanted, dest)
    problems = verify_checkpoint(dest, only=(f"{folder}/", STATE_FILE))
    if problems:  # named by their place in the bucket, not the temporary copy
        raise CheckpointCorrupt(f"checkpoint {uri} failed verification: "
                                + "; ".join(p.replace(str(dest), uri.rstrip("/")) for p in problems))


def _write(ckpt: Path, out: Path, base: str | None, move: bool) -> Path:
    """The export of a verified local checkpoint; `move` lets model/ be renamed into place (a downloaded copy)."""
    if (ckpt / "model").is_dir():
        if move and not out.exists():
            os.replace(ckpt / "model", out)
        else:
            shutil.copytree(ckpt / "model", out, dirs_exist_ok=True)
        return out
    adapter = ckpt / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"{ckpt}: holds neither model/ nor adapter/")
    import torch
    from peft import PeftModel

    from .model import Phi3VForCausalLM
    from .weights import local_checkpoint

    if base is None:
        base = json.loads((ckpt / STATE_FILE).read_text())["config"]["checkpoint"]
    base = local_checkpoint(base)  # a base checkpoint in a bucket: this machine's cached copy
    model = Phi3VForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        for source in (adapter / name, Path(base) / name):
            if source.is_file():
                shutil.copy(source, out / name)
                break
    return out
