"""The per-worker training recipe: setup → resume → train → save, run inside Ray Train workers.

    TorchTrainer(train_loop_per_worker, train_loop_config={"config": cfg.to_dict(), "plan": asdict(plan)})

The process group is already set up by Ray Train (NCCL on GPUs, gloo on CPU). The optimizer step
itself lives in `engine.py` (one class per backend, chosen once); checkpoints in `checkpointing.py`;
rank 0's metric sinks in `tracking.py`. The loop never branches on the mode or the backend.

Every worker calls `ray.train.report` the same number of times: at each logged step, each
evaluation and each checkpoint, decided from numbers all ranks share.
"""

from __future__ import annotations

import json
import functools
import math
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from datasets_ray.schema import BadRecord

from .checkpointing import STATE_FILE, CheckpointCorrupt, TrainState, read_checkpoint, verify_checkpoint, write_checkpoint
from .collate import FirstFetched, Phi3VCollate, batch_stats, iter_train_batches
from .config import TrainConfig
from .engine import DTYPES, build_engine, load_trainable_weights, train_step
from .failures import DeterministicFailure
from .hardware import HardwareChoice, detect_gpu, log_choice, resolve_hardware
from .memory import plan_for_config
from .modes import (LoraSettings, Mode, apply_mode, cast_trainable, count_parameters, enable_gradient_checkpointing,
                    keep_plain_4bit_layout)
from .packing import use_packing
from .storage import StorageAccessDenied
from .tracking import MetricLogger, say
from .weights import local_checkpoint

if TYPE_CHECKING:
    from .kernels import KernelChoice  # kernels.py imports transformers: workers only, when they load the model


@dataclass
class Plan:
    """Numbers the driver derives once from the data and passes to every worker."""

    total_steps: int
    steps_per_epoch: int
    n_train: int
    n_val: int
    run_dir: str
    checkpoint_dir: str  # the model checkpoint to start from (resolved on the driver)


@dataclass
class Worker:
    """Where this process sits in the run."""

    rank: int
    world_size: int
    device: torch.device
    hw: HardwareChoice
    kernels: KernelChoice | None = None  # fused kernels (kernels.py); None: transformers' modules


# ----------------------------------------------------------------------------- build
def load_model(cfg: TrainConfig, hw: HardwareChoice, device: torch.device, checkpoint_dir: str, training: bool = True,
               kernels: KernelChoice | None = None):
    """Load the checkpoint, swap in the fused kernels and apply the training mode (QLoRA quantizes the base
    while loading). The kernels go in before PEFT wraps the model and change no parameter or name; without
    `kernels` (prediction, tests) the model keeps transformers' modules and nothing is said."""
    from .model import Phi3VForCausalLM
    from .model.packed import use_segment_sdpa

    checkpoint_dir = local_checkpoint(checkpoint_dir)  # s3://… → downloaded once per node, verified, cached
    mode = cfg.mode_enum
    kwargs = {"attn_implementation": hw.attention}
    if mode is Mode.QLORA:
        from transformers import BitsAndBytesConfig

        compute = DTYPES[hw.precision]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=False, llm_int8_skip_modules=["lm_head"],
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": device}
    elif mode.uses_lora and hw.precision != "fp32":
        kwargs["dtype"] = DTYPES[hw.precision]  # frozen base in half precision, adapters too (below)
    else:
        kwargs["dtype"] = torch.float32  # fp32 master weights; compute is autocast or DeepSpeed's half copy
    model = Phi3VForCausalLM.from_pretrained(checkpoint_dir, local_files_only=True, **kwargs)
    if mode is Mode.QLORA:
        keep_plain_4bit_layout(model)  # CPU generation would repack the 4-bit weights, see there
    if kernels is not None:
        from .kernels import apply_fused_kernels

        fused = apply_fused_kernels(model, kernels)
        if _rank() == 0:
            say(kernels.line(fused))
    if training and use_packing(cfg.packing, hw.attention) and use_segment_sdpa(model):
        if _rank() == 0:
            say("packed micro-batches under sdpa: the causal kernel runs once per example (no dense mask)")
    model = apply_mode(
        model, mode, LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_vision), cfg.freeze_text_embedding
    )
    if mode.uses_lora:
        cast_trainable(model, DTYPES[hw.precision])  # the optimizer keeps their fp32 master copy
    if training and cfg.gradient_checkpointing:
        gpu = detect_gpu(device.index or 0) if device.type == "cuda" else None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        plan = plan_for_config(cfg, model.config, hw.precision, gpu.memory_gb if gpu else None, world)
        if plan.lm or plan.clip:
            enable_gradient_checkpointing(model, plan.lm, plan.clip)
        if _rank() == 0:
            say(str(plan))
    model.train(training)  # from_pretrained returns eval mode: dropout (LoRA's too) would stay off in training
    return model.to(device) if mode is not Mode.QLORA else model


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _worker_from_ray(cfg: TrainConfig) -> Worker:
    """This worker's rank, device and precision; its fused kernels come with `_with_kernels` (an import of seconds)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    hw = resolve_hardware(detect_gpu() if device.type == "cuda" else None, cfg.precision, cfg.attention)
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), device, hw)


def _with_kernels(worker: Worker, cfg: TrainConfig) -> Worker:
    from dataclasses import replace

    from .kernels import resolve_kernels  # imports transformers' Phi-3 modules: ~5 s on a busy 2-core machine

    try:
        return replace(worker, kernels=resolve_kernels(cfg.fused_kernels, worker.device))
    except ValueError as err:  # fused_kernels=liger without CUDA or the package: every retry would fail the same way
        raise DeterministicFailure(str(err)) from None


# ----------------------------------------------------------------------------- entry point
def train_loop_per_worker(loop_config: dict) -> None:
    from .tracking import set_console

    set_console(loop_config.get("console"))
    cfg = TrainConfig.from_dict(loop_config["config"])
    plan = Plan(**loop_config["plan"])
    worker = _worker_from_ray(cfg)
    if worker.rank == 0:
        say(log_choice(worker.hw))
    if cfg.eval_only:
        evaluate_checkpoint(cfg, plan, _with_kernels(worker, cfg))
        return
    recipe = Recipe(cfg, plan, worker)
    try:
        recipe.setup()
        recipe.resume()
        recipe.train()
    except Exception as err:
        # Ray truncates worker errors on the driver, and would retry them: a failure no retry can fix
        # becomes a DeterministicFailure carrying the file, line/record and reason (see failures.py).
        if _cause_of_type(err, DeterministicFailure) is None:
            kind, bad = _deterministic_cause(err)
            if bad is not None:
                say(f"rank {worker.rank} stopped on a {kind}: {bad}")  # each rank that met it: its own line
                raise DeterministicFailure(f"{kind}: {bad}") from err
        raise
    finally:
        recipe.cleanup()


def choose_checkpoint(run_dir: str) -> str:
    """The newest checkpoint directory of the run that passes verification ("" when the run has none).

    Every `checkpoint_*` directory counts, also one finished after a driver was killed and so never
    registered with Ray. A bad or incomplete one is skipped with a line naming it and why; when some
    exist and none verifies, CheckpointCorrupt (a deterministic failure: no retry can fix it).
    """
    from .storage import checkpoint_at, list_checkpoints

    skipped = []
    for path in list_checkpoints(run_dir):
        with checkpoint_at(path).as_directory() as directory:
            problems = verify_checkpoint(Path(directory))
        if not problems:
            if skipped:
                say(f"resuming from the newest good checkpoint {path}")
            return path
        skipped.append(f"{path}: {'; '.join(problems)}")
        say(f"skipping checkpoint {path}: " + "; ".join(problems))
    if skipped:
        raise CheckpointCorrupt(f"no checkpoint of {run_dir} passes verification: " + " | ".join(skipped)
                                + ". Delete the damaged checkpoint directories to start over, or use another name.")
    return ""


def _saved_state(checkpoint: str) -> TrainState:
    """Where a checkpoint's run stood (its train_state.json alone, before the checkpoint is restored)."""
    from .storage import join, read_text

    text = read_text(join(checkpoint, STATE_FILE))
    return TrainState(**json.loads(text)["state"]) if text else TrainState()


def refused_pickle_message(checkpoint: str, directory: Path, err: Exception) -> str:
    """`<checkpoint>/<file>: refused to unpickle: it names builtins.exec, ...`: which file weights-only loading
    refused and for which globals (torch's message names no file, and its first line no global)."""
    from .engine import refused_pickles

    checkpoint = checkpoint.rstrip("/")
    why = "which is neither a tensor nor plain data (a crafted or foreign file; nothing in it ran)"
    found = refused_pickles(directory)
    if found:
        return "; ".join(f"{checkpoint}/{rel}: refused to unpickle: it names {', '.join(names)}, {why}"
                         for rel, names in found.items())
    # Not visible in the opcodes: torch's "Unsupported global: GLOBAL x was not an allowed global" line, if any.
    line = next((ln for ln in str(err).splitlines() if "Unsupported global:" in ln), "")
    name = line.split("Unsupported global:", 1)[1].split(" was not", 1)[0].replace("GLOBAL", "").strip() if line else ""
    return f"{checkpoint}: refused to unpickle a file of it: it names {name or 'a type it does not allow'}, {why}"


def _broadcast_text(text: str, worker: Worker) -> str:
    """Rank 0's string on every rank (bytes in a tensor: no pickling)."""
    if worker.world_size == 1 or not dist.is_initialized():
        return text
    device = worker.device if worker.device.type == "cuda" else torch.device("cpu")
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if worker.rank == 0:
        buf.copy_(data)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode()


# Errors no retry can fix; an access-denied storage error stays denied until someone changes the policy.
DETERMINISTIC_CAUSES = (("bad record", BadRecord), ("corrupt checkpoint", CheckpointCorrupt),
                        ("storage access denied", StorageAccessDenied))


def _deterministic_cause(err: BaseException) -> tuple[str, str | None]:
    """(kind from DETERMINISTIC_CAUSES, its message) when no retry can fix err, else ("", None).

    A bad record raised in a Ray Data actor reaches the worker as a RayTaskError whose cause chain
    holds only text: the remote traceback's `BadRecord: <file>:<line> (id=...): <reason>` line.
    """
    import traceback

    for kind, cls in DETERMINISTIC_CAUSES:
        found = _cause_of_type(err, cls)
        if found is not None:
            return kind, str(found)
    text = "".join(traceback.format_exception(err))
    for kind, cls in DETERMINISTIC_CAUSES:
        at = text.rfind(f"{cls.__name__}: ")
        if at >= 0:
            return kind, text[at + len(cls.__name__) + 2:].splitlines()[0].strip()
    return "", None


def _cause_of_type(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of `kind` in err's cause/context chain (Ray Data wraps a UDF's error)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def evaluate_checkpoint(cfg: TrainConfig, plan: Plan, worker: Worker) -> dict:
    """`phi3v-ray eval`: the weights in `checkpoint`, with a run's trained weights on top when the driver
    named them (`trained_checkpoint`, verified there), on val_file; no optimizer."""
    import ray.train

    from .storage import checkpoint_at

    torch.manual_seed(cfg.seed)
    model = load_model(cfg, worker.hw, worker.device, plan.checkpoint_dir, training=False, kernels=worker.kernels)
    step = 0
    if cfg.trained_checkpoint:
        with checkpoint_at(cfg.trained_checkpoint).as_directory() as directory:
            load_trainable_weights(model, Path(directory))
            step = json.loads((Path(directory) / STATE_FILE).read_text())["state"]["step"]
    elif (Path(plan.checkpoint_dir).parent / STATE_FILE).is_file():  # <checkpoint>/model of a finished run
        step = json.loads((Path(plan.checkpoint_dir).parent / STATE_FILE).read_text())["state"]["step"]
    scores = _evaluate(model, cfg, plan, worker, step=step, tag="eval")
    ray.train.report({"step": step, **scores})
    return scores


def _evaluate(model, cfg: TrainConfig, plan: Plan, worker: Worker, step: int, tag: str) -> dict:
    import ray.train

    from .evaluate import evaluate

    if not plan.n_val:
        return {}
    t = time.perf_counter()
    scores = evaluate(model, ray.train.get_dataset_shard("val"), cfg, plan, worker.device, worker.rank,
                      worker.world_size, step=step, tag=tag, hw=worker.hw)
    trim_host_heap()  # generation's batches were the largest host tensors so far
    if worker.rank == 0 and scores:
        from .metrics import score_table

        say(f"eval {tag} at step {step} ({time.perf_counter() - t:.1f} s):\n"
            + score_table({tag: {k[4:]: v for k, v in scores.items()}}))
    return scores


# ----------------------------------------------------------------------------- the recipe
class Recipe:
    """One worker's run. `setup` builds, `resume` restores, `train` loops, `save` checkpoints."""

    def __init__(self, cfg: TrainConfig, plan: Plan, worker: Worker):
        self.cfg, self.plan, self.worker = cfg, plan, worker
        self.state = TrainState()
        self.history: list[dict] = []
        self.logger: MetricLogger | None = None
        self._first_report = True
        self._last_report = time.perf_counter()
        self.resume_from = ""  # the checkpoint `resume` restores, chosen in `setup`
        self._first_epoch: FirstFetched | None = None  # the first epoch's feed, started early by `setup`
        self._first_epoch_at = (0, 0)  # (epoch, batch in epoch) it starts from

    # -- setup
    def setup(self) -> None:
        import ray.train

        cfg, w = self.cfg, self.worker
        self.train_shard = ray.train.get_dataset_shard("train")
        packed = use_packing(cfg.packing, w.hw.attention)
        self.collate_fn = Phi3VCollate(packing=packed, pack_tokens=cfg.pack_tokens)
        # The checkpoint to resume from is chosen before anything loads, so the epoch the run starts in can start its
        # feed now: Ray Data brings up its coordinator and decoding actors while this worker imports its libraries
        # and loads the model, instead of after (that wait was ~12 s of every run's start on 2 CPUs).
        self.resume_from = _broadcast_text(choose_checkpoint(self.plan.run_dir) if w.rank == 0 else "", w)
        start = _saved_state(self.resume_from) if self.resume_from else TrainState()
        if start.step < self.plan.total_steps and start.epoch < cfg.epochs:
            self._first_epoch = FirstFetched(self._epoch_batches(start), name="phi3v-first-batch")
            self._first_epoch_at = (start.epoch, start.batch_in_epoch)
        self.worker = w = _with_kernels(w, cfg)
        torch.manual_seed(cfg.seed)
        model = load_model(cfg, w.hw, w.device, self.plan.checkpoint_dir, kernels=w.kernels)
        self.engine = build_engine(cfg, model, self.plan.total_steps, w.hw.precision, w.device, w.world_size)
        if w.rank == 0:
            self.logger = MetricLogger(self.plan.run_dir, self.plan.total_steps)
            trainable, total = count_parameters(self.engine.model)
            say(f"mode={cfg.mode} trainable {trainable:,} of {total:,} parameters; "
                f"global batch {cfg.effective_global_batch} = micro {cfg.micro_batch} × workers {w.world_size} × "
                f"accumulation {cfg.accumulation}; {self.plan.total_steps} optimizer steps; engine {self.engine.kind}; "
                f"micro-batches {_batch_layout(cfg.length_grouping_window, packed, cfg.pack_tokens)}")

    # -- resume
    def resume(self) -> None:
        """Restore from the newest checkpoint of the run that verifies; skipped ones are named with the reason."""
        chosen = self.resume_from
        if not chosen:
            return
        from .storage import checkpoint_at

        with checkpoint_at(chosen).as_directory() as directory:
            try:
                self.state, self.history = read_checkpoint(Path(directory), self.engine, self.worker.rank)
            except pickle.UnpicklingError as err:  # weights-only loading met a type it does not allow
                raise CheckpointCorrupt(refused_pickle_message(chosen, Path(directory), err)) from err
        self.state.resumed_at.append(self.state.step)
        if self.worker.rank == 0:
            s = self.state
            say(f"resumed at step {s.step} (epoch {s.epoch}, batch {s.batch_in_epoch}) from {chosen}")

    # -- train
    def train(self) -> None:
        cfg, state = self.cfg, self.state
        if state.step == 0 and state.batch_in_epoch == 0 and cfg.eval_before:
            row = {"step": 0, **self.evaluate("before")}
            self.log(row)
            self.report(row)

        from .faults import fault_hook

        after_step = fault_hook(self.worker.rank, cfg.fault_injection)
        window = _Window()
        done = state.step >= self.plan.total_steps
        if done:
            # Resumed from the run's final checkpoint (its driver died after writing it): nothing is left to
            # train, but Ray Train and Tune must still get the final result, once, from every rank.
            last = next((row for row in reversed(self.history) if "loss" in row), {})
            self.report({**last, "step": state.step})
            return
        while not done and state.epoch < cfg.epochs:
            stepped = False
            for micro_batches, epoch_ends in self._steps_of_epoch():
                out = train_step(self.engine, micro_batches)
                window.add(out, micro_batches)
                state.step += 1
                state.batch_in_epoch += len(micro_batches)
                if epoch_ends:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                stepped = True
                # The last epoch's last step ends the run even before the planned step count: records
                # dropped while decoding shorten the data, and the run must still end with its final
                # checkpoint, weights and evaluation.
                done = state.step >= self.plan.total_steps or state.epoch >= cfg.epochs
                if done and state.step < self.plan.total_steps and self.worker.rank == 0:
                    say(f"the training data ran out at step {state.step} of the {self.plan.total_steps} planned "
                        f"(records dropped while decoding): this is the final step")
                self._after_step(window, out, done)
                after_step(state.step)
                if done:
                    break
            if not stepped:
                if state.step == 0:
                    raise RuntimeError("the training shard yielded no batches; check train_file and the quarantine files")
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0  # an empty remainder of an epoch

    def _epoch_batches(self, state: TrainState):
        """The micro-batches of `state`'s epoch from where it stands."""
        cfg = self.cfg
        return iter_train_batches(self.train_shard, cfg.micro_batch, epoch=state.epoch, seed=cfg.seed,
                                  rank=self.worker.rank, shuffle_buffer=cfg.shuffle_buffer,
                                  skip_batches=state.batch_in_epoch, length_window=cfg.length_grouping_window,
                                  collate_fn=self.collate_fn, collate_ahead=cfg.data.collate_ahead)

    def _steps_of_epoch(self):
        """This epoch's optimizer steps from where the run stands: (micro-batches, is the epoch's last step)."""
        cfg = self.cfg
        # The run's first epoch was started in `setup`, from the state `resume` then restored.
        batches, self._first_epoch = self._first_epoch, None
        if batches is None or self._first_epoch_at != (self.state.epoch, self.state.batch_in_epoch):
            if batches is not None:
                batches.close()
            batches = self._epoch_batches(self.state)
        group: list[dict] = []
        pending = None  # one batch of lookahead tells which group ends the epoch
        for batch in batches:
            if pending is not None:
                group.append(pending)
                if len(group) == cfg.accumulation:
                    yield group, False
                    group = []
            pending = batch
        if pending is not None:
            yield group + [pending], True

    def _after_step(self, window: "_Window", out, done: bool) -> None:
        """Log, evaluate, checkpoint and report as the cadences say; every rank decides the same."""
        cfg, step = self.cfg, self.state.step
        metrics, since_report = {}, 0.0
        if step % cfg.log_every == 0 or done:
            metrics, since_report = window.flush(step, self.state.epoch, self.engine.lr(), out.grad_norm,
                                                 self.worker, time.perf_counter() - self._last_report)
        evaluated = {}
        if cfg.eval_every and step % cfg.eval_every == 0 and not done:
            evaluated = self.evaluate(f"step{step}")
        if done:
            evaluated = self.evaluate("after")
        row = {**metrics, **evaluated}
        save = done or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        due = bool(metrics) and since_report >= cfg.report_every_s
        if row:
            self.log({"step": step, **row}, show=save or bool(evaluated) or due)  # the console: a line per report
        if save or evaluated or due:
            self.report({"step": step, **row}, checkpoint=save, final=done)
        if metrics:
            window.t0 = time.perf_counter()  # throughput counts training, not logging, evaluation or reporting

    def log(self, row: dict, show: bool = True) -> None:
        """One row per logged step: the console and metrics files (rank 0), and the checkpointed history."""
        row["wall_time"] = round(time.time(), 3)
        self.history.append(row)
        if self.logger is not None:
            self.logger.log(row, show)

    def evaluate(self, tag: str) -> dict:
        return _evaluate(self.engine.model, self.cfg, self.plan, self.worker, step=self.state.step, tag=tag)

    # -- report and save
    def report(self, metrics: dict, checkpoint: bool = False, final: bool = False) -> None:
        """Report to Ray on every rank (with this rank's checkpoint pieces when saving).

        Ray Train V2 drains a worker's one-entry result queue about every 2 s, so a report blocks until
        the previous one was taken: reports come on a cadence (report_every_s), never every fast step.
        """
        import ray.train

        self._last_report = time.perf_counter()
        if self._first_report:  # a worker's first report says where it runs (Tune sweeps check and release it)
            where = ray.get_runtime_context()
            metrics = {**metrics, "node_id": where.get_node_id(), "placement_group_id": where.get_placement_group_id()}
            self._first_report = False
        if not checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="phi3v-ckpt-") as tmp:
            self.save(Path(tmp), final)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def save(self, directory: Path, final: bool) -> None:
        write_checkpoint(directory, self.engine, self.state, self.history, self.cfg.to_dict(), self.worker.rank,
                         final_weights_from=local_checkpoint(self.plan.checkpoint_dir, processor_only=True) if final else None)

    def cleanup(self) -> None:
        if self._first_epoch is not None:  # the run failed before it trained
            self._first_epoch.close()
        if self.logger is not None:
            self.logger.close()


def _batch_layout(window: int, packed: bool, pack_tokens: int) -> str:
    """How this run's micro-batches are laid out, for the start line."""
    grouping = f"grouped by length within {window} examples" if window else "in stream order"
    if not packed:
        return f"{grouping}, right-padded"
    return f"{grouping}, packed ({f'rows of ≤ {pack_tokens} tokens' if pack_tokens else 'one row each'})"


class _Window:
    """Loss and throughput of the optimizer steps since the last logged step."""

    def __init__(self):
        self.memory = _HostMemory()
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.tokens, self.images = None, 0, 0, 0
        self.t0 = time.perf_counter()

    def add(self, out, micro_batches: list[dict]) -> None:
        self.loss_sum = out.loss_sum if self.loss_sum is None else self.loss_sum + out.loss_sum
        self.steps += 1
        for batch in micro_batches:
            tokens, images = batch_stats(batch)
            self.tokens += tokens
            self.images += images

    def flush(self, step: int, epoch: int, lr: float, grad_norm, worker: Worker, since_report: float) -> tuple[dict, float]:
        """Every rank calls this at the same step: sums across ranks in one all-reduce (the one sync per log).

        Returns the metrics and rank 0's seconds since its last report, the same number on every rank,
        so all ranks agree whether to report now.
        """
        elapsed = time.perf_counter() - self.t0
        device = worker.device
        sums = torch.stack([
            (self.loss_sum if self.loss_sum is not None else torch.zeros((), device=device)).double().to(device),
            torch.tensor(float(self.tokens), dtype=torch.float64, device=device),
            torch.tensor(float(self.images), dtype=torch.float64, device=device),
            torch.tensor(since_report if worker.rank == 0 else 0.0, dtype=torch.float64, device=device),
        ])
        if worker.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, tokens, images, since_report = sums.tolist()
        metrics = {
            "step": step,
            "epoch": epoch,
            "loss": loss_sum / max(self.steps, 1),  # the mean of the steps' token-normalised losses
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / elapsed,
            "images_per_s": images / elapsed,
            "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else _rss_gb(),
            **self.memory.sample(),
        }
        self.reset()
        return metrics, since_report


class _HostMemory:
    """This process's host memory: resident (shared pages such as Ray's object store included) and the
    object-store part of it at every logged step, unique (what ending the process would free) at most
    every `uss_every_s`.

    USS walks /proc/self/smaps: 20-50 ms in a training worker, which at `log_every=1` made the
    1-worker loop 1.2x the bare loop; RSS is one read of /proc/self/statm (~0.05 ms). Between USS
    readings the last one is repeated. At most every `trim_every_s`, at a logged step, the C heap
    gives its free pages back (`trim_host_heap`, ~25 ms: under 1 % of the loop at the default 5 s).
    """

    def __init__(self, uss_every_s: float = 30.0, trim_every_s: float = 5.0):
        import psutil

        self.process = psutil.Process()
        self.uss_every_s, self.trim_every_s = uss_every_s, trim_every_s
        self.uss_at, self.uss_gb, self.trim_at = -math.inf, 0.0, -math.inf

    def sample(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self.trim_at >= self.trim_every_s:
            trim_host_heap()
            self.trim_at = now
        if now - self.uss_at >= self.uss_every_s:
            self.uss_at, self.uss_gb = now, self.process.memory_full_info().uss / 2**30
        return {"host_rss_gb": self.process.memory_info().rss / 2**30, "host_uss_gb": self.uss_gb,
                "host_shm_gb": _resident_shared_memory_gb()}


def _resident_shared_memory_gb() -> float:
    """Resident shared-memory pages (Ray's object store: the rows this worker read without a copy); 0 off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return 0.0


def trim_host_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere).

    A training step allocates and frees a few hundred MB of host tensors whose sizes change with the
    batch; glibc keeps the freed pages, so resident memory creeps up (the demo's worker: 1.4 → 1.7 GB
    over 180 steps, ~25 MB a step). Trimming after an evaluation and every few seconds keeps it near
    what the loop holds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB

