"""The per-worker training loop: build → resume → loop → report.

Runs inside Ray Train workers (`TorchTrainer(train_loop_per_worker, ...)`): the process group is
already set up (NCCL on GPUs, gloo on CPU). Full fine-tuning runs under DeepSpeed ZeRO-2, the other
modes under DDP (ZeRO-2 optional); the loop itself never branches on the mode.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .collate import batch_stats
from .config import TrainConfig
from .evaluate import evaluate
from .hardware import HardwareChoice, detect_gpu, log_choice, resolve_hardware
from .modes import LoraSettings, Mode, apply_mode, cast_trainable_to_fp32, count_parameters, enable_gradient_checkpointing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "preprocessor_config.json", "generation_config.json", "added_tokens.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro batches of the current epoch already consumed


@dataclass
class Plan:
    """Numbers the driver derives once from the data and passes to every worker."""

    total_steps: int
    steps_per_epoch: int
    n_train: int
    n_val: int
    run_dir: str
    checkpoint_dir: str  # the model checkpoint to start from (resolved on the driver)


# ----------------------------------------------------------------------------- build
def load_model(cfg: TrainConfig, hw: HardwareChoice, device: torch.device, checkpoint_dir: str):
    """Load the checkpoint and apply the training mode (QLoRA quantizes the base while loading)."""
    from .model import Phi3VForCausalLM

    mode = cfg.mode_enum
    kwargs = {"attn_implementation": hw.attention}
    if mode is Mode.QLORA:
        from transformers import BitsAndBytesConfig

        compute = DTYPES[hw.precision] if hw.precision != "fp32" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=False, llm_int8_skip_modules=["lm_head"],
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": device}
    elif mode.uses_lora and hw.precision != "fp32":
        kwargs["dtype"] = DTYPES[hw.precision]  # frozen base in half precision; adapters are cast to fp32 below
    else:
        kwargs["dtype"] = torch.float32  # fp32 master weights; compute is autocast or DeepSpeed's half copy
    model = Phi3VForCausalLM.from_pretrained(checkpoint_dir, **kwargs)
    model = apply_mode(
        model, mode, LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_vision), cfg.freeze_text_embedding
    )
    if mode.uses_lora:
        cast_trainable_to_fp32(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.to(device) if mode is not Mode.QLORA else model


def parameter_groups(model, weight_decay: float):
    """Decay matrices only: biases, norms and the 1-D/separator parameters get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "GN" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deepspeed_config(cfg: TrainConfig, hw: HardwareChoice, world_size: int) -> dict:
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
        "bf16": {"enabled": hw.precision == "bf16"},
        "fp16": {"enabled": hw.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Engine:
    """One interface over DeepSpeed and DDP: forward, backward, step, state, unwrap."""

    def __init__(self, cfg: TrainConfig, model, hw: HardwareChoice, plan: Plan, device: torch.device, world_size: int):
        self.cfg, self.hw, self.device = cfg, hw, device
        self.deepspeed = cfg.resolved_zero_stage == 2
        optimizer = torch.optim.AdamW(
            parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
        )
        scheduler = linear_schedule(optimizer, cfg.warmup_steps, plan.total_steps)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if self.deepspeed:
            import deepspeed

            self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, hw, world_size)
            )
            self.model = self.module.module
            self.autocast = False
        else:
            import ray.train.torch

            self.model = model
            self.optimizer, self.scheduler = optimizer, scheduler
            self.module = ray.train.torch.prepare_model(model, move_to_device=False) if world_size > 1 else model
            self.autocast = hw.precision in ("bf16", "fp16") and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(init_scale=2.0**16, enabled=not self.deepspeed and hw.precision == "fp16"
                                           and device.type == "cuda")

    def forward_backward(self, batch: dict, boundary: bool) -> torch.Tensor:
        """Returns the detached loss on the device: reading it here would sync the GPU every micro batch."""
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if self.deepspeed:
            self.module.set_gradient_accumulation_boundary(boundary)
            loss = self.module(**batch, loss_only=True).loss
            self.module.backward(loss)
            return loss.detach()
        sync = boundary or not hasattr(self.module, "no_sync")
        ctx = self.module.no_sync() if not sync else _nullcontext()
        with ctx, torch.autocast(self.device.type, dtype=DTYPES[self.hw.precision], enabled=self.autocast):
            loss = self.module(**batch, loss_only=True).loss
            self.scaler.scale(loss / self.cfg.accumulation).backward()
        return loss.detach()

    def step(self) -> float:
        """Clip, step, schedule; returns the gradient norm before clipping."""
        if self.deepspeed:
            self.module.step()
            norm = self.module.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoint state
    def save(self, directory: Path, rank: int) -> None:
        if self.deepspeed:
            self.module.save_checkpoint(str(directory), tag="deepspeed")  # every rank writes its optimizer shard
            return
        if rank == 0:
            if self.cfg.mode_enum.uses_lora:
                self.model.save_pretrained(directory / "adapter", safe_serialization=True)  # PEFT format, adapters only
            else:
                from safetensors.torch import save_file

                trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
                save_file(trainable, str(directory / "trainable.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict()}, directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        if self.deepspeed:
            self.module.load_checkpoint(str(directory), tag="deepspeed")
            return
        from safetensors.torch import load_file

        if (directory / "adapter").is_dir():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(str(directory / "adapter" / "adapter_model.safetensors")))
        else:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in load_file(str(directory / "trainable.safetensors")).items():
                    params[name].copy_(value)
        # Optimizer state is written by this code (tensors and plain containers), so weights_only loading suffices.
        state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- storage
def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)


def write_text(path: str, text: str, append: bool = False) -> None:
    """Write into the run directory on any storage Ray supports (local, NFS, s3://, gs://)."""
    fs, p = _fs(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    if append:
        try:
            with fs.open_input_stream(p) as f:
                text = f.read().decode() + text
        except (FileNotFoundError, OSError):
            pass
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


# ----------------------------------------------------------------------------- the loop
def say(text: str) -> None:
    """Print once from a worker. Ray Train tees print() when a library has wrapped sys.stdout."""
    print(f"[phi3v-ray] {text}", file=sys.__stdout__, flush=True)


def train_loop_per_worker(loop_config: dict) -> None:
    try:
        _train_loop(loop_config)
    except Exception as err:
        # Ray truncates worker errors on the driver; a bad record's file, line and reason must not get lost.
        text = str(err)
        marker = text.rfind("BadRecord")
        if marker >= 0:
            say("stopped on a bad record: " + text[marker:marker + 1500].splitlines()[0])
        raise


def _train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["config"])
    plan = Plan(**loop_config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    hw = resolve_hardware(detect_gpu() if device.type == "cuda" else None, cfg.precision, cfg.attention)
    if rank == 0:
        say(log_choice(hw))

    # ---- build
    torch.manual_seed(cfg.seed)
    model = load_model(cfg, hw, device, plan.checkpoint_dir)
    engine = Engine(cfg, model, hw, plan, device, world)
    trainable, total = count_parameters(engine.model)
    if rank == 0:
        say(f"mode={cfg.mode} trainable {trainable:,} of {total:,} parameters; "
              f"global batch {cfg.effective_global_batch} = micro {cfg.micro_batch} × workers {world} × accumulation "
              f"{cfg.accumulation}; {plan.total_steps} optimizer steps; ZeRO-{cfg.resolved_zero_stage if engine.deepspeed else 0}")

    # ---- resume
    state = TrainState()
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            engine.load(directory)
            saved = json.loads((directory / "train_state.json").read_text())
            state = TrainState(**saved["state"])
            history = saved.get("history", [])
            rng = directory / f"rng_rank{rank}.pt"
            if rng.is_file():
                torch.set_rng_state(torch.load(rng, weights_only=True))
        if rank == 0:
            say(f"resumed at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")

    train_shard = None if cfg.eval_only else ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if plan.n_val else None

    def run_eval(tag: str) -> dict:
        if val_shard is None:
            return {}
        t = time.perf_counter()
        scores = evaluate(engine.model, val_shard, cfg, plan, device, rank, world, step=state.step, tag=tag, hw=hw)
        if rank == 0 and scores:
            say(f"eval {tag} step {state.step}: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if not k.startswith("val/n")) +
                  f" ({time.perf_counter() - t:.1f}s)")
        return scores

    if cfg.eval_only:
        metrics = {"step": state.step, **run_eval("eval")}
        _report(cfg, plan, metrics, engine, state, history, rank, with_checkpoint=False)
        return

    if state.step == 0 and state.batch_in_epoch == 0 and cfg.eval_before:
        metrics = {"step": 0, **run_eval("before")}
        history.append(metrics)
        _report(cfg, plan, metrics, engine, state, history, rank, with_checkpoint=False)

    # ---- loop
    from datasets_ray.pipeline import iter_train_batches

    kill = _fault_injection(rank, cfg.fault_injection)
    done = state.step >= plan.total_steps
    window = _Window()
    while not done and state.epoch < cfg.epochs:
        batches = iter_train_batches(train_shard, cfg.micro_batch, epoch=state.epoch, seed=cfg.seed,
                                     skip_batches=state.batch_in_epoch)
        for batch, is_last in _with_last(batches):
            state.batch_in_epoch += 1
            boundary = state.batch_in_epoch % cfg.accumulation == 0 or is_last
            tokens, images = batch_stats(batch)
            window.add(engine.forward_backward(batch, boundary), tokens, images)
            if not boundary:
                continue
            grad_norm = engine.step()
            state.step += 1
            if is_last:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            done = state.step >= plan.total_steps
            metrics = None
            if state.step % cfg.log_every == 0 or done:
                metrics = window.flush(state, engine.lr(), grad_norm, world, device)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and not done:
                metrics = {**(metrics or {"step": state.step}), **run_eval(f"step{state.step}")}
            save = done or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)
            if done:
                metrics = {**(metrics or {"step": state.step}), **run_eval("after")}
            if metrics is not None or save:
                metrics = metrics or {"step": state.step}
                history.append(metrics)
                _report(cfg, plan, metrics, engine, state, history, rank, with_checkpoint=bool(save), final=done)
            kill(state.step)
            if done:
                break
        else:
            if state.batch_in_epoch:  # the shard ended without a last marker (empty epoch)
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if state.step == 0 and state.batch_in_epoch == 0 and not done:
            raise RuntimeError("the training shard yielded no batches; check train_file and on_bad_record quarantine")


class _Window:
    """Loss and throughput accumulated between two reports."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.losses, self.tokens, self.images, self.t0 = [], 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int, images: int):
        self.losses.append(loss)
        self.tokens += tokens
        self.images += images

    def flush(self, state: TrainState, lr: float, grad_norm: float, world: int, device) -> dict:
        elapsed = time.perf_counter() - self.t0
        loss_sum = float(torch.stack(self.losses).double().sum()) if self.losses else 0.0  # the one sync per report
        sums = torch.tensor([loss_sum, len(self.losses), self.tokens, self.images], dtype=torch.float64)
        if world > 1:
            sums = sums.to(device if device.type == "cuda" else "cpu")
            dist.all_reduce(sums)
            sums = sums.cpu()
        loss_sum, n, tokens, images = sums.tolist()
        metrics = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss_sum / max(n, 1),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed,
            "images_per_s": images / elapsed,
            "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else _rss_gb(),
        }
        self.reset()
        return metrics


_START = time.time()


def _progress(step: int, total: int, width: int = 20) -> str:
    """A text progress bar with an ETA: `[#####---------------] 5/20 eta 1m40s`."""
    if total <= 0:
        return ""
    done = min(step / total, 1.0)
    elapsed = time.time() - _START
    eta = elapsed / done * (1 - done) if done > 0 else float("nan")
    eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
    return f"[{'#' * round(done * width)}{'-' * (width - round(done * width))}] {step}/{total} eta {eta_text}"


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _with_last(iterable):
    """Yield (item, is_last) with one item of lookahead."""
    iterator = iter(iterable)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


_PLACEMENT_REPORTED = False


def _report(cfg, plan, metrics, engine, state, history, rank, with_checkpoint: bool, final: bool = False) -> None:
    """Every worker calls this the same number of times; checkpoints merge the pieces each rank writes."""
    import ray.train

    if rank == 0:
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        say(f"{_progress(state.step, plan.total_steps)} {line}")
        write_text(f"{plan.run_dir}/artifacts/metrics.jsonl", json.dumps(metrics) + "\n", append=True)
        _tensorboard(plan, metrics)
        _mlflow(plan, metrics)
    global _PLACEMENT_REPORTED
    if not _PLACEMENT_REPORTED:  # a worker's first report says where it runs (Tune sweeps check and release it)
        where = ray.get_runtime_context()
        metrics = {**metrics, "node_id": where.get_node_id(), "placement_group_id": where.get_placement_group_id()}
        _PLACEMENT_REPORTED = True
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="phi3v-ckpt-") as tmp:
        directory = Path(tmp)
        engine.save(directory, rank)
        torch.save(torch.get_rng_state(), directory / f"rng_rank{rank}.pt")
        if rank == 0:
            (directory / "train_state.json").write_text(
                json.dumps({"state": asdict(state), "history": history, "config": cfg.to_dict()}, indent=1)
            )
            if final:
                export_weights(engine.model, cfg, plan, directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


def export_weights(model, cfg: TrainConfig, plan: Plan, directory: Path) -> None:
    """Final weights: official safetensors layout for full runs, PEFT adapter for LoRA/QLoRA."""
    if cfg.mode_enum.uses_lora:
        target = directory / "adapter"
        if not target.is_dir():  # DDP checkpoints already hold it
            model.save_pretrained(target, safe_serialization=True)
    else:
        target = directory / "model"
        model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        source = Path(plan.checkpoint_dir) / name
        if source.is_file():
            shutil.copy(source, target / name)


_TB = {}


def _tensorboard(plan: Plan, metrics: dict) -> None:
    if "://" in plan.run_dir:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    writer = _TB.get(plan.run_dir)
    if writer is None:
        writer = _TB[plan.run_dir] = SummaryWriter(f"{plan.run_dir}/artifacts/tensorboard")
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
            writer.add_scalar(key, value, metrics["step"])
    writer.flush()


_MLFLOW = {}


def _mlflow(plan: Plan, metrics: dict) -> None:
    """Log to MLflow when it is installed; tracking goes to $MLFLOW_TRACKING_URI or the run's artifacts."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        return
    import mlflow

    if plan.run_dir not in _MLFLOW:
        if not os.environ.get("MLFLOW_TRACKING_URI") and "://" not in plan.run_dir:
            mlflow.set_tracking_uri(f"file://{plan.run_dir}/artifacts/mlruns")
        mlflow.set_experiment(Path(plan.run_dir).name)
        _MLFLOW[plan.run_dir] = mlflow.start_run()
    mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}, step=int(metrics["step"]))


def _fault_injection(rank: int, spec: str):
    """Chaos hook: "rank:step:marker" ends that rank's process once, after that step (the marker file records it)."""
    if not spec:
        return lambda step: None
    fault_rank, fault_step, marker = spec.split(":", 2)

    def maybe_die(step: int) -> None:
        if rank == int(fault_rank) and step == int(fault_step) and not os.path.exists(marker):
            Path(marker).write_text(f"killed rank {rank} after step {step}\n")
            os._exit(1)

    return maybe_die
