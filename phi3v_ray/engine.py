"""The optimizer step: one engine class per backend, and the step that drives either.

    engine = build_engine(cfg, model, total_steps, precision, device, world_size)
    out = train_step(engine, micro_batches)        # forward/backward every micro-batch, then one update

`DDPEngine` runs plain PyTorch (DistributedDataParallel when there is more than one process, autocast
and a GradScaler on GPUs); `DeepSpeedEngine` runs DeepSpeed ZeRO-2. Both need only an initialised
`torch.distributed` process group (or none, for one process under DDPEngine): nothing here imports
Ray, so the step can be measured and tested on a bare machine.

Loss normalisation (as transformers ≥ 4.46 and torchtune do): the loss of an optimizer step is the
sum of the token losses of every micro-batch on every rank, divided by the number of supervised
tokens of the whole step. `train_step` counts those tokens before the first forward (one small
all-reduce), so every token weighs the same however the step is cut into micro-batches and ranks:
micro 2 × accumulation 1, micro 1 × accumulation 2 and 2 workers × micro 1 give the same update.
Both backends average gradients over ranks, so each rank back-propagates world_size × its share.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .collate import to_device
from .constants import IGNORE_INDEX

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms and the 1-D/separator parameters get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "GN" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(optimizer, warmup: int, total: int):
    """Linear warmup over `warmup` steps, then linear decay to 0 at `total` (SPEC §5)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fused_adamw(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update `params`: floating-point tensors on one CPU or CUDA
    device. It updates every tensor in one kernel where the default runs about ten elementwise ops per tensor:
    on the demo model (4.3 M parameters, two thirds of them the embedding and lm_head) 7 ms a step instead of 40."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def build_optimizer(cfg, model, total_steps: int):
    groups = parameter_groups(model, cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    # None, not False, where there is no kernel: an explicit False would also turn off torch's own foreach default.
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=fused_adamw(params) or None
    )
    return optimizer, linear_schedule(optimizer, cfg.warmup_steps, total_steps)


def deepspeed_config(cfg, precision: str, world_size: int) -> dict:
    """The DeepSpeed ZeRO-2 config, generated from the training config (SPEC §5)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.accumulation,
        "train_batch_size": cfg.micro_batch * cfg.accumulation * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def supervised_tokens(batch: dict) -> int:
    """Tokens that carry a loss: labels shifted by one (the first token predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _to_device(batch: dict, device: torch.device) -> dict:
    """Non-blocking copies of the (pinned, on CUDA) host batch; uint8 crops become pixel_values there; a
    right-padded batch goes without its attention mask (causal attention alone: see `to_device`)."""
    return to_device(batch, device, training=True)


class DDPEngine:
    """Plain PyTorch: the model (DDP-wrapped across processes), AdamW, the linear schedule.

    fp16 on a GPU uses a GradScaler; bf16/fp16 compute runs under autocast over fp32 (or frozen
    half-precision) weights. Trainable weights kept in half precision (LoRA adapters in the compute
    dtype) get an fp32 master copy: AdamW updates the copy, the weight gets it rounded after each step.
    """

    kind = "ddp"

    def __init__(self, cfg, model, total_steps: int, precision: str, device: torch.device, world_size: int):
        self.cfg, self.device, self.precision = cfg, device, precision
        self.model = model
        self.optimizer, self.scheduler = build_optimizer(cfg, model, total_steps)
        self.masters = _fp32_masters(self.optimizer)  # (half weight, fp32 copy) pairs; empty in fp32 runs
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.module = model
        on_gpu = device.type == "cuda"
        self.autocast = precision in ("bf16", "fp16") and on_gpu
        self.scaler = torch.amp.GradScaler(init_scale=2.0**16, enabled=precision == "fp16" and on_gpu)

    def forward_backward(self, batch: dict, num_items: float, scale: float, boundary: bool) -> torch.Tensor:
        """Back-propagate `scale` × (token-loss sum / num_items); returns that loss detached."""
        batch = _to_device(batch, self.device)
        sync = boundary or not hasattr(self.module, "no_sync")
        with (contextlib.nullcontext() if sync else self.module.no_sync()):
            with torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.autocast):
                loss = self.module(**batch, loss_only=True, num_items_in_batch=num_items).loss
            self.scaler.scale(loss * scale).backward()
        return loss.detach()

    def step(self) -> torch.Tensor:
        """Clip, update, schedule; returns the gradient norm before clipping (on the device)."""
        for weight, master in self.masters:
            master.grad = None if weight.grad is None else weight.grad.float()
            weight.grad = None
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            for weight, master in self.masters:
                weight.copy_(master)
        return norm.detach()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoint state: weights as safetensors (PEFT format for adapters), optimizer state without pickle
    def save(self, directory: Path, rank: int, weights: bool = True) -> None:
        """weights=False: the checkpoint's final weights (model/ or adapter/) hold them, one copy is enough."""
        if rank != 0:
            return
        if weights:
            save_trainable_weights(self.model, directory)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(), "masters": [m.detach().cpu() for _, m in self.masters]},
                   directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        load_trainable_weights(self.model, directory)
        # Written by `save` above: tensors and plain containers, so weights_only loading suffices.
        state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        with torch.no_grad():  # the fp32 copies (the weights on disk are their rounding)
            saved = state.get("masters") or [w.float() for w, _ in self.masters]
            for (weight, master), value in zip(self.masters, saved, strict=True):
                master.copy_(value)
                weight.copy_(master)


def _fp32_masters(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Swap the optimizer's half-precision parameters for fp32 copies; returns (weight, copy) pairs."""
    pairs = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if p.dtype in (torch.float16, torch.bfloat16):
                master = p.detach().float().requires_grad_(True)
                pairs.append((p, master))
                p = master
            params.append(p)
        group["params"] = params
    return pairs


def skip_cpu_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce, which training never calls.

    On the CPU accelerator DeepSpeed builds that C++ op with g++ the first time a process starts its
    communication backend (about a minute on 2 cores, once per machine and Python environment). Only
    its inference and tensor-parallel layers use it; ZeRO's collectives go through torch.distributed
    (gloo here), and without the op DeepSpeed takes that path everywhere. Marking the op incompatible
    in DeepSpeed's own table of compatible ops skips the build.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2: optimizer state and gradients sharded across ranks, bf16/fp16 by DeepSpeed."""

    kind = "deepspeed"

    def __init__(self, cfg, model, total_steps: int, precision: str, device: torch.device, world_size: int):
        import deepspeed

        self.cfg, self.device, self.precision = cfg, device, precision
        if device.type == "cpu":
            skip_cpu_shared_memory_allreduce()
        optimizer, scheduler = build_optimizer(cfg, model, total_steps)
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, precision, world_size)
        )
        self.model = self.module.module

    def forward_backward(self, batch: dict, num_items: float, scale: float, boundary: bool) -> torch.Tensor:
        batch = _to_device(batch, self.device)
        self.module.set_gradient_accumulation_boundary(boundary)
        loss = self.module(**batch, loss_only=True, num_items_in_batch=num_items).loss
        # The step's normalisation is already in the loss: DeepSpeed must not divide by accumulation again.
        self.module.backward(loss * scale, scale_wrt_gas=False)
        return loss.detach()

    def step(self) -> torch.Tensor:
        self.module.step()
        norm = self.module.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path, rank: int, weights: bool = True) -> None:
        # Every rank writes its optimizer shard. ZeRO-2 restores the weights from its own files (the fp32
        # partitions), so `weights` changes nothing here.
        self.module.save_checkpoint(str(directory), tag="deepspeed")

    def load(self, directory: Path) -> None:
        # DeepSpeed's checkpoint engine calls torch.load(weights_only=False): a crafted file in storage would
        # run code here. Force weights-only unpickling, allowing only the plain classes DeepSpeed saves.
        with weights_only_loads():
            self.module.load_checkpoint(str(directory), tag="deepspeed")


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside is weights_only (even where the caller asks otherwise).

    Allows the few non-tensor types DeepSpeed ZeRO-2 writes into its checkpoint; anything else (a
    `__reduce__` that runs a command) is refused with an UnpicklingError.
    """
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def _deepspeed_globals() -> list:
    """What ZeRO-2 pickles besides tensors and builtins (torch.serialization.get_unsafe_globals_in_checkpoint)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, fragment_address, ZeroStageEnum]


def refused_pickles(directory: Path) -> dict[str, list[str]]:
    """The checkpoint's `.pt` files that weights-only loading refuses, each with the globals it names
    (e.g. {"optimizer.pt": ["builtins.exec"]}). The pickles' opcodes are read, nothing is unpickled."""
    found = {}
    with torch.serialization.safe_globals(_deepspeed_globals()):
        for path in sorted(Path(directory).rglob("*.pt")):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:  # not a torch.save zip (a legacy or foreign file): the load itself says so
                continue
            if unsafe:
                found[path.relative_to(directory).as_posix()] = sorted(unsafe)
    return found


def build_engine(cfg, model, total_steps: int, precision: str, device: torch.device, world_size: int):
    """The backend is chosen once, here: ZeRO-2 → DeepSpeedEngine, otherwise DDPEngine."""
    engine_cls = DeepSpeedEngine if cfg.resolved_zero_stage == 2 else DDPEngine
    return engine_cls(cfg, model, total_steps, precision, device, world_size)


@dataclass
class StepOutput:
    """One optimizer step. Tensors stay on the device: reading them is a sync, done once per report."""

    loss_sum: torch.Tensor  # this rank's token-loss sum / the step's tokens (all ranks sum to the step loss)
    grad_norm: torch.Tensor
    tokens: int  # supervised tokens of the step on all ranks
    micro_batches: int


def train_step(engine, micro_batches: list[dict]) -> StepOutput:
    """Forward and backward every micro-batch of one optimizer step, then update once.

    Every rank must call this with the same number of micro-batches (Ray Train's shards are equal).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    tokens = torch.tensor(sum(supervised_tokens(b) for b in micro_batches), dtype=torch.int64)
    if world > 1:
        tokens = tokens.to(engine.device if engine.device.type == "cuda" else "cpu")
        dist.all_reduce(tokens)
    num_items = max(int(tokens), 1)
    loss_sum = torch.zeros((), device=engine.device)
    for i, batch in enumerate(micro_batches):
        boundary = i == len(micro_batches) - 1
        loss_sum += engine.forward_backward(batch, num_items, scale=float(world), boundary=boundary).float()
    grad_norm = engine.step()
    return StepOutput(loss_sum=loss_sum, grad_norm=grad_norm, tokens=num_items, micro_batches=len(micro_batches))


# ----------------------------------------------------------------------------- weights of a checkpoint
def save_trainable_weights(model, directory: Path) -> None:
    """LoRA adapters in PEFT format (adapter/), other trainable weights as trainable.safetensors."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory / "adapter", safe_serialization=True)
        return
    from safetensors.torch import save_file

    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(directory / "trainable.safetensors"))


def load_trainable_weights(model, directory: Path) -> None:
    """Inverse of `save_trainable_weights`; no optimizer involved (evaluation and prediction use this too).

    A final checkpoint of a full or frozen-vision run holds its weights once, in model/ (the official
    layout, the same parameter names): the trainable ones are read from there.
    """
    from safetensors.torch import load_file

    if (directory / "adapter").is_dir():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(directory / "adapter" / "adapter_model.safetensors")))
        return
    params = dict(model.named_parameters())
    if (directory / "trainable.safetensors").is_file():
        saved = load_file(str(directory / "trainable.safetensors"))
    else:
        saved = _trainable_from_final_weights(directory / "model", {n for n, p in params.items() if p.requires_grad})
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def _trainable_from_final_weights(model_dir: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors called `names` from the safetensors files of model/ (one file or shards)."""
    from safetensors import safe_open

    from .checkpointing import CheckpointCorrupt

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointCorrupt(f"{model_dir.parent}: neither trainable.safetensors nor model/*.safetensors")
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in names & set(f.keys()):
                found[name] = f.get_tensor(name)
    missing = sorted(names - set(found))
    if missing:
        raise CheckpointCorrupt(f"{model_dir}: {len(missing)} trained weights missing, e.g. {missing[0]}")
    return found
