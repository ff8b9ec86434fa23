"""The config of one run: a typed tree, loaded from a preset or YAML plus `key=value` overrides.

    TrainConfig               run, model, optimisation, cluster, checkpoints, evaluation
      └─ data: DataConfig     files, crops, lengths, bad records, Ray Data preprocessing

Every field's help text doubles as CLI help (`phi3v-ray train --help-config`). A key is a field's
name; a data setting takes its short or its dotted name (`num_crops=4` is `data.num_crops=4`:
names are unique across the tree), and YAML may nest them under `data:` or not. Choices are
`Literal` types and validation reads the allowed values from them. `validate()` runs on the driver
before any worker starts and raises one `ConfigError` holding every `Problem` (field, value, fix).
Dicts exist only at Ray's boundaries (`train_loop_config`, Tune's `param_space`); workers rebuild
the dataclass first thing (`TrainConfig.from_dict`).

Torch-free on purpose: the driver, Ray Data actors and Tune trials all import this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .constants import MAX_NUM_CROPS

ModeName = Literal["full", "frozen_vision", "lora", "qlora"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Attention = Literal["auto", "flash_attention_2", "sdpa", "eager"]
ZeroStage = Literal[-1, 0, 2]
Overflow = Literal["reject", "truncate"]
PixelFormat = Literal["uint8", "float32"]

# preprocess_actors=0 (auto): the training split's pool starts at one actor per training worker and
# grows to this many per worker while CPUs are free; other splits (evaluation) start at one actor.
AUTO_ACTORS_PER_WORKER = 2
OnBadRecord = Literal["fail", "skip"]
Packing = Literal["auto", "always", "never"]  # not on/off: YAML reads those as booleans
Checkpointing = Literal["auto", "all", "lm", "every_n", "none"]
FusedKernels = Literal["auto", "liger", "none"]


class Mode(str, enum.Enum):
    """The training mode; `phi3v_ray.modes.apply_mode` decides from it what trains."""

    FULL = "full"
    FROZEN_VISION = "frozen_vision"
    LORA = "lora"
    QLORA = "qlora"

    @property
    def uses_lora(self) -> bool:
        return self in (Mode.LORA, Mode.QLORA)


assert tuple(m.value for m in Mode) == get_args(ModeName), "Mode and ModeName must list the same modes"


def _f(default, help: str, *, ge=None, gt=None, le=None, lt=None):
    """A field with its help text and the bounds `validate` checks (ge ≤ value, gt < value, ...)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"help": help, "bounds": bounds})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: the field, the bad value and how to fix it."""

    field: str
    value: Any
    fix: str

    def __str__(self) -> str:
        return f"{self.field}={self.value!r}: {self.fix}"


class ConfigError(ValueError):
    """Every problem of a config at once; `problems` holds the `Problem`s, str() lists them."""

    def __init__(self, problems: list[Problem], what: str = "training config"):
        self.problems = list(problems)
        super().__init__(f"invalid {what}:\n  - " + "\n  - ".join(map(str, self.problems)))


# ----------------------------------------------------------------- the data settings
@dataclass
class DataConfig:
    """What the Ray Data pipeline reads and how it turns records into rows (`TrainConfig.data`)."""

    train_file: str = _f("", "training jsonl (the recipe's record format), or a directory of Parquet shards with the "
                             "images embedded (convert --format parquet); local, s3://, gs:// or abfs://")
    val_file: str = _f("", "validation jsonl or Parquet shards for evaluation during training (optional)")
    images_root: str = _f("", "directory (or s3://, gs://, abfs:// prefix) the records' image paths are relative to; "
                              "not needed for Parquet shards")
    system: str = _f("", "system prompt put before the first turn (empty = none, as in the recipe)")
    num_crops: int = _f(16, "HD crop budget per image (recipe: 16 for documents, 4 for video frames)",
                        ge=1, le=MAX_NUM_CROPS)
    max_length: int = _f(8192, "longest tokenized example (8 frames at 4 crops are 6056 image tokens)", ge=1)
    overflow: Overflow = _f("reject", "examples longer than max_length: bad records (reject), or their earliest "
                                      "turns are dropped (truncate)")
    on_bad_record: OnBadRecord = _f("fail", "fail raises naming the record's file and line; skip writes it with its "
                                            "reason to the run's quarantine and counts it")
    max_bad_fraction: float = _f(0.1, "skip mode: the run fails when more than this fraction of a split's records was "
                                      "dropped (validation and decode together)", ge=0, le=1)
    max_pixels: int = _f(64_000_000, "images with more pixels (width × height) are refused before decoding", ge=1)
    max_images_per_turn: int = _f(16, "turns with more images are bad records", ge=1)
    preprocess_actors: int = _f(0, "Ray Data preprocessing actors per dataset; 0 = auto: one per training worker "
                                   "(evaluation: one), growing to 2 per worker while CPUs are free", ge=0)
    preprocess_max_actors: int = _f(0, "autoscale the actor pool up to this many (0 = 2 per training worker with "
                                       "auto actors, else a fixed pool)", ge=0)
    preprocess_cpus: float = _f(0.5, "CPUs per preprocessing actor (fractions are fine)", gt=0)
    preprocess_batch_size: int = _f(4, "records per map_batches call (keep small: an 8-frame record at 16 crops "
                                       "is 180 MB)", ge=1)
    pixel_format: PixelFormat = _f("uint8", "how rows carry pixels: uint8 HD crops, normalised on the training "
                                            "device (4× smaller), or the model's float32 pixel_values (the old "
                                            "layout, for comparison)")
    data_node_resource: str = _f("", "custom resource that marks CPU nodes for preprocessing (empty = anywhere)")
    object_store_memory_limit: int = _f(0, "bytes of object store Ray Data may fill per dataset (0 = Ray's "
                                           "default)", ge=0)
    cache_data: bool = _f(False, "preprocess train and val once and keep their rows in Ray's object store for "
                                 "every epoch and evaluation (small datasets: no re-decoding and no refill wait at "
                                 "each epoch's start; needs the rows' size in object store memory)")
    collate_ahead: int = _f(2, "micro-batches each training worker fetches and collates ahead in a background "
                               "thread, overlapping the step (0 = in the training loop)", ge=0)

    def actor_pool(self, num_workers: int = 1, split: str = "train") -> tuple[int, int]:
        """(min, max) preprocessing actors of one split's dataset fed to num_workers training workers.

        Explicit numbers are taken as they are (equal for a fixed pool). Auto (preprocess_actors=0)
        sizes the training split to the trainers: one actor per worker, autoscaling up to
        AUTO_ACTORS_PER_WORKER per worker (or preprocess_max_actors); other splits start at one actor.
        """
        workers = max(1, num_workers)
        if self.preprocess_actors:
            return self.preprocess_actors, max(self.preprocess_actors, self.preprocess_max_actors)
        low = workers if split == "train" else 1
        return low, max(low, self.preprocess_max_actors or AUTO_ACTORS_PER_WORKER * workers)

    def value_problems(self) -> list[Problem]:
        """Types, choices and ranges; nothing that looks at this machine's files."""
        problems = _field_problems(self)
        typed = not {p.field for p in problems} & {"preprocess_actors", "preprocess_max_actors"}
        if typed and 0 < self.preprocess_max_actors < self.preprocess_actors:
            problems.append(Problem("preprocess_max_actors", self.preprocess_max_actors,
                                    f"use 0 (a fixed pool) or a number ≥ preprocess_actors = {self.preprocess_actors}"))
        return problems

    def path_problems(self, files: Sequence[str] | None = None) -> list[Problem]:
        """The jsonl files (default: train_file and val_file where set) and the image directory."""
        named = [(n, getattr(self, n)) for n in ("train_file", "val_file")] if files is None else \
            [("files", str(f)) for f in files]
        problems = [Problem(name, path, why or "file not found (a jsonl, or a directory of Parquet shards)")
                    for name, path in named if path for why in [_missing(path, shards=True)] if why is not None]
        if files is not None and not files:
            problems.append(Problem("files", [], "name at least one jsonl"))
        needs_images = any(path and not _is_shards(path) for _, path in named)
        why = _missing(self.images_root, directory=True) if needs_images and self.images_root else ""
        if needs_images and why is not None:
            problems.append(Problem("images_root", self.images_root,
                                    why or "set it to the directory the records' image paths are relative to"))
        return problems


# ----------------------------------------------------------------- the run
@dataclass
class TrainConfig:
    """One training run, the whole tree: its data settings are `data` (e.g. `cfg.data.num_crops`)."""

    # --- run ---
    name: str = _f("phi3v-demo", "run name; the same name + storage_path resumes the run")
    storage_path: str = _f("", "where checkpoints and results go (local path, NFS, s3://, gs://, abfs://); default "
                               "$PHI3V_STORAGE_PATH or ./runs")
    seed: int = _f(0, "seed for weights of new adapters, dropout and data order")
    # --- model ---
    checkpoint: str = _f("tiny", "checkpoint directory in the official layout, or 'tiny' to write a random tiny one")
    allow_download: bool = _f(False, "let checkpoint name a Hugging Face Hub repo id, fetched once on the driver "
                                     "(weights as safetensors, never code); false = local directories and object "
                                     "storage only, nothing is looked up")
    mode: ModeName = _f("lora", "what trains: everything, all but the vision side, LoRA adapters, or LoRA on a "
                                "4-bit base")
    precision: Precision = _f("auto", "compute precision (auto picks from the GPU the worker gets)")
    attention: Attention = _f("auto", "attention implementation (auto picks from the GPU and what is installed)")
    fused_kernels: FusedKernels = _f(
        "auto", "fused Triton kernels for RMSNorm, the SwiGLU MLP, rotary embedding and CLIP's LayerNorm "
                "(phi3v_ray/kernels.py): liger (liger-kernel, CUDA only; pip install -e '.[gpu]'), none, or auto "
                "(liger on CUDA workers where it is installed, else none); weights and checkpoints are the same")
    gradient_checkpointing: bool = _f(True, "activation checkpointing on (which layers: activation_checkpointing); "
                                            "false = none")
    activation_checkpointing: Checkpointing = _f(
        "auto", "layers that recompute their forward in the backward: all (every LM and CLIP layer), lm (decoder "
                "layers only), every_n (one in checkpoint_every_n of each tower), none, or auto (as few as the "
                "GPU's memory allows by phi3v_ray/memory.py's estimate; all on CPU)")
    checkpoint_every_n: int = _f(2, "activation_checkpointing=every_n checkpoints layers 0, n, 2n, … of each tower",
                                 ge=1)
    freeze_text_embedding: bool = _f(False, "also freeze the token embedding (the recipe did this by accident in "
                                            "frozen_vision)")
    lora_rank: int = _f(64, "LoRA rank r", ge=1)
    lora_alpha: float = _f(128.0, "LoRA alpha (the recipe uses 2·rank)", gt=0)
    lora_dropout: float = _f(0.0, "LoRA dropout", ge=0, lt=1)
    lora_vision: bool = _f(True, "LoRA adapters on CLIP and the projector too")
    zero_stage: ZeroStage = _f(-1, "DeepSpeed ZeRO stage: 2, or 0 for plain DDP; -1 = 2 for full and frozen_vision "
                                   "(fp32 master weights, gradients and Adam state sharded), 0 for LoRA/QLoRA")
    # --- data ---
    data: DataConfig = field(default_factory=DataConfig, metadata={
        "help": "the data pipeline's settings; each also takes its short name (num_crops=4 is data.num_crops=4)"})
    # --- optimisation ---
    lr: float = _f(2e-4, "peak learning rate", gt=0)
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases, norms and separators)", ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = _f(0.95, "AdamW beta2", ge=0, lt=1)
    adam_eps: float = _f(1e-7, "AdamW epsilon", gt=0)
    warmup_steps: int = _f(50, "linear warmup steps", ge=0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm", gt=0)
    epochs: int = _f(1, "passes over the training data", ge=1)
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = run all epochs)", ge=0)
    micro_batch: int = _f(1, "examples per worker per forward pass", ge=1)
    grad_accum: int = _f(0, "micro batches per optimizer step; 0 = derive from global_batch", ge=0)
    global_batch: int = _f(64, "examples per optimizer step across all workers (used when grad_accum is 0)", ge=1)
    shuffle_buffer: int = _f(64, "rows each training worker shuffles its shard in, drawn by (seed, epoch, rank); they wait "
                                 "in host memory as one copy each (0 = file order)", ge=0)
    group_by_length: bool = _f(False, "micro-batches of examples of similar length, so little padding is computed: "
                                      "sorted within length_window examples of the shuffled stream (deterministic, "
                                      "resumable); only with micro_batch > 1. Off by default: on mixed tasks whose "
                                      "lengths differ it makes single-task micro-batches (see the README)")
    length_window: int = _f(64, "examples group_by_length sorts together (rounded up to whole micro-batches; they wait "
                                "in host memory)", ge=1)
    packing: Packing = _f("auto", "lay a micro-batch's examples end to end in one row, no padding (positions restart "
                                  "per example, attention and labels never cross examples): always, never, or auto (under "
                                  "flash_attention_2's varlen kernel, and under sdpa, whose causal kernel then runs once "
                                  "per example: Σ lengthᵢ² attention instead of padding to the longest; not under eager, "
                                  "which would need a dense mask)")
    pack_tokens: int = _f(0, "packing: most tokens in one packed row (0 = a whole micro-batch in one row); at least "
                             "max_length", ge=0)
    # --- cluster ---
    num_workers: int = _f(1, "training workers (one per GPU)", ge=1)
    use_gpu: bool = _f(False, "train on GPUs")
    accelerator_type: str = _f("", "Ray accelerator type to request, e.g. H100, A100, L4 (empty = any)")
    worker_resource: str = _f("", "custom resource each training worker takes one unit of (a node pool's label; "
                                  "empty = none)")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per training worker", ge=0)
    max_failures: int = _f(2, "worker failures to recover from (restarts from the latest checkpoint); bad records, "
                              "corrupt checkpoints and config errors are never retried", ge=0)
    lease_stale_s: float = _f(300.0, "a run's lease (storage_path/name/.lease) whose heartbeat is older than this is "
                                     "taken over by a new start; younger, and a second start is refused", gt=0)
    # --- checkpoints, evaluation, logging ---
    checkpoint_every: int = _f(0, "save a checkpoint every N optimizer steps (0 = only at the end)", ge=0)
    keep_checkpoints: int = _f(2, "checkpoints to keep", ge=1)
    eval_every: int = _f(0, "evaluate every N optimizer steps (0 = only before and after training)", ge=0)
    eval_before: bool = _f(True, "evaluate before the first step")
    eval_max_samples: int = _f(0, "evaluate on at most this many validation records (0 = all)", ge=0)
    eval_batch: int = _f(4, "prompts per generation batch", ge=1)
    max_new_tokens: int = _f(64, "generation length cap (recipe: 64)", ge=1)
    log_every: int = _f(1, "log metrics (console, metrics.jsonl, TensorBoard) every N optimizer steps", ge=1)
    report_every_s: float = _f(10.0, "seconds between metric reports to Ray Train/Tune, at logged steps (0 = every "
                                     "logged step); checkpoints and evaluations always report", ge=0)
    fault_injection: str = _f("", "chaos testing: 'rank:step:marker_file' makes that worker's process exit once "
                                  "after that step; several separated by ';'")
    eval_only: bool = _f(False, "evaluate the checkpoint on val_file and stop (what `phi3v-ray eval` runs)")
    trained_checkpoint: str = _f("", "eval only: a run's checkpoint whose trained weights (adapter/ or "
                                     "trainable.safetensors) go on top of checkpoint; `phi3v-ray eval checkpoint=<run "
                                     "or checkpoint>` sets it")

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
    def length_grouping_window(self) -> int:
        """Rows sorted together by length in the training batches; 0 = no grouping."""
        return self.length_window if self.group_by_length and self.micro_batch > 1 else 0

    @property
    def effective_global_batch(self) -> int:
        return self.micro_batch * self.num_workers * self.accumulation

    @property
    def resolved_zero_stage(self) -> int:
        if self.zero_stage >= 0:
            return self.zero_stage
        return 2 if self.mode_enum in (Mode.FULL, Mode.FROZEN_VISION) else 0

    @property
    def resolved_storage_path(self) -> str:
        path = self.storage_path or os.environ.get("PHI3V_STORAGE_PATH") or "runs"
        return path if "://" in path else str(Path(path).expanduser().resolve())

    @property
    def run_dir(self) -> str:
        """storage_path/name: the run's checkpoints, results and artifacts."""
        return f"{self.resolved_storage_path.rstrip('/')}/{self.name}"

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

    # ----------------------------------------------------------------- dicts and keys
    def to_dict(self) -> dict[str, Any]:
        """Nested, as YAML and Ray's train_loop_config carry it: {..., "data": {...}, ...}."""
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """Every setting under its short name (what `key=value` and Tune's param_space use)."""
        return {name: getattr(self.data if section else self, name) for name, (section, _) in _settings().items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Nested (`data: {...}`), dotted (`data.num_crops`) or short (`num_crops`) keys → TrainConfig.

        Values are converted to the fields' types (YAML and key=value strings). Unknown keys, values
        of the wrong type and keys given twice raise one ConfigError, which also lists what the
        range checks of `validate` find in the rest (one typo must not hide the other problems).
        """
        flat, problems = _flatten(values)
        cfg = cls()._with(flat)
        if problems:
            raise ConfigError(problems + cfg.value_problems())
        return cfg

    @classmethod
    def from_flat(cls, **values) -> "TrainConfig":
        """`TrainConfig.from_flat(lr=1e-3, train_file=..., num_crops=4)`: keyword arguments, any key form."""
        return cls.from_dict(values)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with changes; data settings by short name too (`cfg.replace(num_crops=4, lr=1e-3)`)."""
        flat, problems = _flatten(changes)
        if problems:
            raise ConfigError(problems)
        return self._with(flat)

    def _with(self, flat: dict[str, Any]) -> "TrainConfig":
        sections = _settings()
        data = {k: v for k, v in flat.items() if sections[k][0] == "data"}
        top = {k: v for k, v in flat.items() if sections[k][0] is None}
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **data), **top)

    @staticmethod
    def setting_names() -> list[str]:
        """The short name of every setting, data settings included."""
        return list(_settings())

    # ----------------------------------------------------------------- validation
    def value_problems(self) -> list[Problem]:
        """Types, choices, ranges and how settings combine; nothing that looks at this machine's files."""
        problems = _field_problems(self) + self.data.value_problems()
        bad = {p.field for p in problems}
        if not bad & {"micro_batch", "num_workers", "grad_accum", "global_batch"} and self.grad_accum == 0:
            per_pass = self.micro_batch * self.num_workers
            if self.global_batch % per_pass:
                problems.append(Problem("global_batch", self.global_batch,
                                        f"must be a multiple of micro_batch × num_workers = {per_pass}, "
                                        "or set grad_accum explicitly"))
        if not bad & {"pack_tokens", "max_length"} and 0 < self.pack_tokens < self.data.max_length:
            problems.append(Problem("pack_tokens", self.pack_tokens,
                                    f"use 0 (a micro-batch in one row) or at least max_length = {self.data.max_length}: "
                                    "a packed row must hold the longest example"))
        if "mode" not in bad and "zero_stage" not in bad and self.mode_enum is Mode.QLORA:
            if self.resolved_zero_stage == 2:
                problems.append(Problem("zero_stage", self.zero_stage,
                                        "QLoRA's 4-bit base cannot be sharded by ZeRO-2 here; use zero_stage=0"))
            if self.precision == "fp32" and self.use_gpu:
                problems.append(Problem("precision", self.precision, "QLoRA computes in bf16 or fp16 on GPUs"))
        if self.fault_injection:
            from .faults import parse_faults

            try:
                parse_faults(self.fault_injection)
            except ValueError as err:
                problems.append(Problem("fault_injection", self.fault_injection, f"{err}; separate several faults with ';'"))
        if self.fused_kernels == "liger" and not self.use_gpu:
            problems.append(Problem("fused_kernels", self.fused_kernels,
                                    "liger's kernels run on CUDA GPUs only; set use_gpu=true, or use fused_kernels=auto "
                                    "(liger where a worker has CUDA and liger-kernel) or none"))
        return problems

    def path_problems(self) -> list[Problem]:
        """The checkpoint, the data files and the image directory on this machine."""
        problems = []
        why = None if self.checkpoint == "tiny" else _missing(self.checkpoint, directory=True)
        if why is not None:
            problems.append(Problem("checkpoint", self.checkpoint,
                                    why or "not a directory; point it at a Phi-3.5-vision checkpoint, or use 'tiny'"))
        if not self.data.train_file and not self.eval_only:
            problems.append(Problem("train_file", self.data.train_file,
                                    "set a training jsonl (or run the default demo: `phi3v-ray train` with no config)"))
        if self.eval_only and not self.data.val_file:
            problems.append(Problem("val_file", self.data.val_file, "evaluation needs a validation jsonl"))
        if "://" in self.resolved_storage_path:  # Ray Train opens it on every node: refuse a URI no node can open
            from .storage import unsupported

            why = unsupported(self.resolved_storage_path)
            if why:
                problems.append(Problem("storage_path", self.resolved_storage_path, why))
        return problems + self.data.path_problems()

    def validate(self, earlier: Sequence[Problem] = ()) -> "TrainConfig":
        """Check every field; raise one ConfigError listing all problems with their fixes (and `earlier`
        ones, e.g. unknown keys found while reading the command line)."""
        problems = list({str(p): p for p in [*earlier, *self.value_problems(), *self.path_problems()]}.values())
        if problems:
            raise ConfigError(problems)
        return self


# ----------------------------------------------------------------- paths on any filesystem
def _missing(path: str, directory: bool = False, shards: bool = False) -> str | None:
    """None when `path` (local or s3://, gs://, abfs://) is there, "" when it is not, the reason when this
    process may not look; credentials come from the environment or the node's identity, never the config."""
    from .storage import StorageAccessDenied, StorageUnsupported, is_dir, is_file

    try:
        if (not directory and is_file(path)) or ((directory or shards) and is_dir(path)):
            return None
    except (StorageAccessDenied, StorageUnsupported) as err:
        return str(err)
    return ""


def _is_shards(path: str) -> bool:
    """A Parquet shard or a directory of them (images embedded: no images_root needed)."""
    path = path.rstrip("/")
    return path.endswith(".parquet") or not path.endswith((".jsonl", ".json")) and _missing(path, directory=True) is None


# ----------------------------------------------------------------- fields, types, checks
@functools.cache
def _settings() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """short name → (section, field) for every leaf setting: None for TrainConfig's own, "data" for DataConfig's."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        for section, leaf in ([("data", d) for d in dataclasses.fields(DataConfig)] if f.name == "data" else [(None, f)]):
            assert leaf.name not in out, f"two settings named {leaf.name!r}; names must be unique across the tree"
            out[leaf.name] = (section, leaf)
    return out


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _type(name: str):
    section, _ = _settings()[name]
    return _hints(DataConfig if section else TrainConfig)[name]


def _type_text(hint) -> str:
    return " | ".join(map(str, get_args(hint))) if get_origin(hint) is Literal else hint.__name__


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _field_problems(obj) -> list[Problem]:
    """Type, Literal choice and bounds of every field of one dataclass (not its nested ones)."""
    problems = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(hint):
            continue
        if get_origin(hint) is Literal:
            choices = get_args(hint)
            if not any(value == c and type(value) is type(c) for c in choices):
                problems.append(Problem(f.name, value, f"use one of {list(choices)}"))
        elif not _is(value, hint):
            problems.append(Problem(f.name, value, f"expected {hint.__name__}"))
        elif f.metadata.get("bounds") and not _within(value, f.metadata["bounds"]):
            problems.append(Problem(f.name, value, _bounds_text(f.metadata["bounds"], hint)))
    return problems


def _within(value, bounds: dict) -> bool:
    return (value >= bounds.get("ge", value) and value <= bounds.get("le", value)
            and ("gt" not in bounds or value > bounds["gt"]) and ("lt" not in bounds or value < bounds["lt"]))


def _bounds_text(bounds: dict, hint) -> str:
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        if hint is int and low[0] == "[" and high[0] == "]":
            return f"use an integer in {low[1]}..{high[1]}"
        return f"must be in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"must be {'≥' if low[0] == '[' else '>'} {low[1]}"
    return f"must be {'≤' if high[0] == ']' else '<'} {high[1]}"


def _flatten(values: Mapping[str, Any], source: str = "") -> tuple[dict[str, Any], list[Problem]]:
    """Any mix of nested, dotted and short keys → ({short name: typed value}, problems)."""
    flat, problems, given = {}, [], {}
    where = f" in {source}" if source else ""

    def put(key: str, name: str, value) -> None:
        if name in given:
            problems.append(Problem(key, value, f"given twice{where}, also as {given[name]!r}; keep one"))
            return
        given[name] = key
        try:
            flat[name] = _coerce(name, value)
        except ConfigError as err:
            problems.extend(err.problems)

    for key, value in values.items():
        if key == "data":
            if isinstance(value, DataConfig):
                value = dataclasses.asdict(value)
            if value is not None and not isinstance(value, Mapping):
                problems.append(Problem("data", value, f"expected a mapping of data settings{where}"))
                continue
            for sub, v in (value or {}).items():
                if sub in _data_names():
                    put(f"data.{sub}", sub, v)
                else:
                    problems.append(Problem(f"data.{sub}", v, f"unknown data setting{where}{_suggest(sub, _data_names())}"))
        elif resolve_key(key):
            put(key, resolve_key(key), value)
        else:
            problems.append(Problem(key, value, f"unknown key{where}{_suggest(key, _all_keys())}"))
    return flat, problems


@functools.cache
def _data_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(DataConfig))


@functools.cache
def _all_keys() -> tuple[str, ...]:
    return tuple(_settings()) + tuple(f"data.{n}" for n in _data_names())


# What people type from HF Trainer, torchtune, LLaMA-Factory and the recipe's scripts → our setting.
ALIASES = {
    "learning_rate": "lr", "lr_rate": "lr", "per_device_train_batch_size": "micro_batch", "batch_size": "micro_batch",
    "train_batch_size": "global_batch", "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "warmup": "warmup_steps", "max_grad_norm_value": "max_grad_norm",
    "model_name_or_path": "checkpoint", "model": "checkpoint", "model_path": "checkpoint", "output_dir": "storage_path",
    "run_name": "name", "lora_r": "lora_rank", "rank": "lora_rank", "r": "lora_rank",
    "max_seq_length": "max_length", "cutoff_len": "max_length", "max_seq_len": "max_length",
    "save_steps": "checkpoint_every", "eval_steps": "eval_every", "logging_steps": "log_every",
    "save_total_limit": "keep_checkpoints", "num_gpus": "num_workers", "gpus": "num_workers",
    "data_path": "train_file", "train_data": "train_file", "eval_file": "val_file", "eval_data": "val_file",
    "image_folder": "images_root", "image_dir": "images_root", "images_dir": "images_root",
    "bf16": "precision", "fp16": "precision", "deepspeed": "zero_stage", "use_lora": "mode", "use_qlora": "mode",
    "freeze_vision": "mode", "flash_attn": "attention", "attn_implementation": "attention",
    "use_liger_kernel": "fused_kernels", "use_liger": "fused_kernels", "liger": "fused_kernels",
    "liger_kernel": "fused_kernels", "kernels": "fused_kernels",
    "weight_decay_rate": "weight_decay", "seed_value": "seed", "max_new_token": "max_new_tokens",
}


def _suggest(key: str, names) -> str:
    """' (did you mean …?)' for a misspelt or foreign key: aliases first, then the closest spelling."""
    bare = key.rpartition(".")[2].lower().replace("-", "_")
    alias = ALIASES.get(bare) or next((ALIASES[a] for a in difflib.get_close_matches(bare, list(ALIASES), n=1,
                                                                                       cutoff=0.8)), None)
    if alias is not None and (alias in names or f"data.{alias}" in names):
        return f" (did you mean {alias!r}?)"
    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else "; see --help-config"


def resolve_key(key: str) -> str | None:
    """The short name a key sets (`num_crops` and `data.num_crops` both set num_crops), or None."""
    settings = _settings()
    section, dot, name = key.rpartition(".")
    if name not in settings:
        return None
    return name if not dot or section == settings[name][0] else None


def _coerce(name: str, value):
    """YAML and key=value strings → the field's type (choices and ranges are validate's job)."""
    hint = _type(name)
    kind = type(get_args(hint)[0]) if get_origin(hint) is Literal else hint
    if isinstance(value, str) and kind is not str:
        value = yaml.safe_load(value) if value.strip() != "" else value
    try:
        if kind is str:
            return "" if value is None else str(value)
        if kind is bool:
            if isinstance(value, str) or value is None:
                raise ValueError
            return bool(value)
        if kind is int:
            if isinstance(value, str):
                value = float(value)  # "2e9": YAML 1.1 reads exponents without a dot as text
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
    except (TypeError, ValueError, OverflowError):
        expected = f"one of {list(get_args(hint))}" if get_origin(hint) is Literal else kind.__name__
        raise ConfigError([Problem(name, value, f"expected {expected}")]) from None
    return value


# ----------------------------------------------------------------- presets and overrides
def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("phi3v_ray.presets").iterdir() if p.name.endswith(".yaml"))


def read_yaml_config(source: str) -> dict[str, Any]:
    """A preset name or a YAML file → its mapping; a `modes:` section holds per-mode overrides."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError([Problem("config", source, "file not found")])
        text = path.read_text()
    elif source in preset_names():
        text = resources.files("phi3v_ray.presets").joinpath(f"{source}.yaml").read_text()
    else:
        raise ConfigError([Problem("config", source, f"neither a YAML file nor a preset; presets: {', '.join(preset_names())}")])
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("config", source, "expected a mapping of key: value")])
    return data


def _parse_overrides(items: list[str]) -> tuple[dict[str, str], list[Problem]]:
    out, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem("override", item, "write key=value"))
        else:
            out[key.strip()] = value
    return out, problems


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["lr=1e-3", "data.num_crops=4"]` → {"lr": "1e-3", "data.num_crops": "4"} (typed later)."""
    out, problems = _parse_overrides(items)
    if problems:
        raise ConfigError(problems)
    return out


def load_config(source: str | None, overrides: list[str] | Mapping[str, Any] | None = None,
                base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Preset/YAML (or the defaults) + overrides → TrainConfig (not yet validated: see run_training).

    Layers, later wins: `base` (e.g. the settings stored with a checkpoint), the file, its `modes:`
    section for the chosen mode, the overrides. Every problem of every layer is collected and
    raised once.
    """
    cfg, problems = read_config(source, overrides, base)
    if problems:
        raise ConfigError(problems)
    return cfg


def read_config(source: str | None, overrides: list[str] | Mapping[str, Any] | None = None,
                base: Mapping[str, Any] | None = None) -> tuple[TrainConfig, list[Problem]]:
    """`load_config` without raising: (the config, every problem found so far, value checks included).

    The CLI passes the problems on to `validate`, so an unknown key and a missing file are reported
    together instead of one hiding the other.
    """
    problems: list[Problem] = []
    data: dict[str, Any] = {}
    if source:
        try:
            data = read_yaml_config(source)
        except ConfigError as err:
            problems += err.problems
    if isinstance(overrides, list):
        over, bad = _parse_overrides(overrides)
        problems += bad
    else:
        over = dict(overrides or {})
    modes = data.pop("modes", {}) or {}
    mode = str(over.get("mode", data.get("mode", (base or {}).get("mode", TrainConfig.mode))))
    if modes and mode not in modes:
        problems.append(Problem("mode", mode, f"this preset publishes {sorted(modes)}"))
    merged: dict[str, Any] = {}
    for layer, where in ((data, source), (modes.get(mode) or {}, f"{source} modes.{mode}"), (over, "")):
        flat, bad = _flatten(layer, where or "")
        merged.update(flat)
        problems += bad
    start = TrainConfig()
    if base:
        flat, bad = _flatten(base, "the checkpoint's stored settings")
        start, problems = start._with(flat), problems + bad
    cfg = start._with(merged)
    if problems:
        problems += cfg.value_problems()
    return cfg, problems


def config_help() -> str:
    """Every setting with its type (or choices), default and meaning, data settings by dotted name."""
    rows = []
    for name, (section, f) in _settings().items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"data.{name}" if section else name, _type_text(_type(name)), repr(default), f.metadata["help"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    head = ("Settings are key=value; data.<name> settings also take their short name (num_crops=4 is "
            "data.num_crops=4), and YAML may nest them under `data:`.")
    return head + "\n" + "\n".join(
        f"  {n:<{widths[0]}}  {t:<{widths[1]}}  default {d:<{widths[2]}}  {h}" for n, t, d, h in rows)
