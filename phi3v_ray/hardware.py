"""Pick precision, attention kernel and training mode from the GPU a worker sees.

The recipe's rules, applied in one place:

- bf16 needs Ampere or newer (compute capability >= 8.0); Volta/Turing train in fp16 with dynamic
  loss scaling; a CPU-only worker runs fp32 (smoke tests) unless told otherwise.
- flash_attention_2 only when the `flash-attn` package is importable, the GPU is sm_80+ and the
  precision is half (bf16/fp16); everything else uses PyTorch SDPA.
- Data-centre GPUs (A100/A800, H100/H800/H200, B200, V100) can hold a full fine-tune under ZeRO-2;
  anything else gets LoRA, or QLoRA when it is small and Turing or newer (bitsandbytes 4-bit).

Explicit settings are respected but checked, so a wrong choice fails on the driver with the fix in
the message instead of as a NaN loss or a CUDA error on a worker.

This module imports nothing heavy at import time; `detect_gpu` imports torch when called.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp16", "fp32")
ATTENTIONS = ("flash_attention_2", "sdpa", "eager")

# Name fragments of GPUs that can run a full fine-tune of the 4.15 B model (ZeRO-2, 8 per node).
# Matched as whole model numbers, so "RTX A1000" is not an A100 and "GH200"/"GB200" still count.
DATACENTER_GPUS = ("A100", "A800", "H100", "H800", "H200", "B200", "V100")
_DATACENTER_RE = re.compile(r"(?<!\d)(" + "|".join(DATACENTER_GPUS) + r")(?!\d)", re.IGNORECASE)

# Below this much memory a full fine-tune does not fit even on a data-centre GPU (V100-16GB).
FULL_FT_MIN_GB = 30.0
# Below this much memory LoRA on a bf16/fp16 base is too tight and QLoRA (4-bit base) is suggested.
# Cards sold as "24 GB" report 22-24 GiB through torch (A10G 22.0, L4 22.5, RTX 3090 24.0), so the
# line sits at 20 GiB: 24 GB cards get LoRA, 16 GB and smaller cards get QLoRA.
QLORA_BELOW_GB = 20.0

BF16_MIN_CAPABILITY = (8, 0)  # Ampere
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 supports Ampere, Ada, Hopper
QLORA_MIN_CAPABILITY = (7, 5)  # Turing; what the recipe's QLoRA runs were tested on or newer


@dataclass(frozen=True)
class GPUInfo:
    """What the training code needs to know about one GPU."""

    name: str
    """Device name as the driver reports it, e.g. "NVIDIA A100-SXM4-80GB"."""
    capability: tuple[int, int]
    """CUDA compute capability (major, minor), e.g. (8, 0)."""
    memory_gb: float
    """Total device memory in GiB (torch's total_memory / 2**30)."""

    def __post_init__(self) -> None:
        # Accept [8, 0] (e.g. from YAML/JSON) as well as (8, 0), so comparisons work.
        object.__setattr__(self, "capability", tuple(int(x) for x in self.capability))

    def __str__(self) -> str:
        major, minor = self.capability
        return f"{self.name} (sm_{major}{minor}, {self.memory_gb:.0f} GB)"

    @property
    def is_datacenter(self) -> bool:
        """True for the GPU families the recipe fine-tunes fully (A100, H100, V100, ...)."""
        return _DATACENTER_RE.search(self.name) is not None


@dataclass(frozen=True)
class HardwareChoice:
    """The resolved numerics for one run, plus a line that says why."""

    precision: str
    """"bf16", "fp16" or "fp32": the compute dtype (fp16 implies dynamic loss scaling)."""
    attention: str
    """"flash_attention_2", "sdpa" or "eager": the attention implementation for the LM."""
    suggested_mode: str
    """"full", "lora" or "qlora": what fits this GPU; the config's mode may override it."""
    reason: str
    """One human-readable line explaining the three choices; log it at start-up."""

    @property
    def torch_dtype(self):
        """The torch dtype for `precision` (imports torch)."""
        import torch

        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        return dtypes[self.precision]


def flash_attn_installed() -> bool:
    """Whether the `flash-attn` package can be imported (without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def detect_gpu(device: int = 0) -> GPUInfo | None:
    """Describe CUDA device `device` of this process, or None without torch/CUDA (CPU run)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return GPUInfo(
        name=torch.cuda.get_device_name(device),
        capability=tuple(torch.cuda.get_device_capability(device)),
        memory_gb=props.total_memory / 2**30,
    )


def resolve_hardware(
    gpu: GPUInfo | None,
    precision: str = "auto",
    attention: str = "auto",
    flash_available: bool | None = None,
) -> HardwareChoice:
    """Resolve "auto" settings for `gpu` (None = CPU) and validate explicit ones.

    Raises ValueError naming the GPU, the bad setting and the fix when an explicit setting cannot
    work on this hardware (bf16 before Ampere, flash_attention_2 without flash-attn, ...).
    """
    if flash_available is None:
        flash_available = flash_attn_installed()
    where = "this CPU-only worker" if gpu is None else f"GPU {gpu}"

    precision, precision_why = _resolve_precision(gpu, precision, where)
    attention, attention_why = _resolve_attention(gpu, precision, attention, flash_available, where)
    mode, mode_why = _suggest_mode(gpu)

    reason = (
        f"{where}: precision {precision} ({precision_why}), attention {attention} "
        f"({attention_why}), suggested mode {mode} ({mode_why})"
    )
    return HardwareChoice(precision, attention, mode, reason)


def log_choice(choice: HardwareChoice, log: logging.Logger | None = None) -> str:
    """Log `choice.reason` once at INFO and return it (so callers can also print or report it)."""
    (log or logger).info("hardware: %s", choice.reason)
    return choice.reason


def _resolve_precision(gpu: GPUInfo | None, precision: str, where: str) -> tuple[str, str]:
    if precision not in ("auto",) + PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not one of auto, {', '.join(PRECISIONS)}; "
            "use precision=auto to let the GPU decide"
        )
    if gpu is None:
        if precision == "fp16":
            raise ValueError(
                f"precision=fp16 on {where}: fp16 training needs a CUDA GPU; "
                "use precision=fp32 (or bf16) on CPU"
            )
        if precision == "auto":
            return "fp32", "auto: no GPU"
        return precision, "set explicitly"

    has_bf16 = gpu.capability >= BF16_MIN_CAPABILITY
    if precision == "bf16" and not has_bf16:
        raise ValueError(
            f"precision=bf16 on {where}: bf16 needs compute capability 8.0 (Ampere) or newer; "
            "use precision=fp16 (dynamic loss scaling) or precision=auto"
        )
    if precision != "auto":
        return precision, "set explicitly"
    if has_bf16:
        return "bf16", f"auto: sm_{gpu.capability[0]}{gpu.capability[1]} supports bf16"
    why = f"auto: sm_{gpu.capability[0]}{gpu.capability[1]} has no bf16, fp16 with loss scaling"
    if gpu.capability < (7, 0):
        why += "; pre-Volta GPUs are untested and slow in fp16"
    return "fp16", why


def _resolve_attention(
    gpu: GPUInfo | None, precision: str, attention: str, flash_available: bool, where: str
) -> tuple[str, str]:
    if attention not in ("auto",) + ATTENTIONS:
        raise ValueError(
            f"attention={attention!r} is not one of auto, {', '.join(ATTENTIONS)}; "
            "use attention=auto to let the GPU decide"
        )
    flash_ok_gpu = gpu is not None and gpu.capability >= FLASH_MIN_CAPABILITY
    half = precision in ("bf16", "fp16")

    if attention == "flash_attention_2":
        if not flash_available:
            raise ValueError(
                f"attention=flash_attention_2 on {where}: the flash-attn package is not installed; "
                "install it (pip install 'phi3v-ray[flash]') or use attention=sdpa"
            )
        if not flash_ok_gpu:
            raise ValueError(
                f"attention=flash_attention_2 on {where}: flash-attn 2 needs a GPU with compute "
                "capability 8.0 (Ampere) or newer; use attention=sdpa"
            )
        if not half:
            raise ValueError(
                f"attention=flash_attention_2 with precision={precision} on {where}: flash-attn "
                "runs only in bf16/fp16; use precision=bf16 or attention=sdpa"
            )
        return attention, "set explicitly"
    if attention != "auto":
        return attention, "set explicitly"

    if flash_available and flash_ok_gpu and half:
        return "flash_attention_2", "auto: flash-attn installed and GPU is sm_80+"
    if gpu is None:
        return "sdpa", "auto: no GPU"
    if not flash_ok_gpu:
        return "sdpa", "auto: flash-attn 2 needs sm_80+"
    if not half:
        return "sdpa", "auto: flash-attn needs bf16/fp16"
    return "sdpa", "auto: flash-attn not installed"


def _suggest_mode(gpu: GPUInfo | None) -> tuple[str, str]:
    if gpu is None:
        return "lora", "no GPU: CPU runs are smoke tests"
    if gpu.is_datacenter and gpu.memory_gb >= FULL_FT_MIN_GB:
        return "full", "data-centre GPU, full fine-tuning under ZeRO-2"
    if gpu.memory_gb < QLORA_BELOW_GB and gpu.capability >= QLORA_MIN_CAPABILITY:
        return "qlora", f"{gpu.memory_gb:.0f} GB is too small for a 16-bit base, 4-bit QLoRA"
    if gpu.is_datacenter:
        return "lora", f"data-centre GPU, but {gpu.memory_gb:.0f} GB is too small for full FT"
    if gpu.capability < QLORA_MIN_CAPABILITY:
        return "lora", "not a data-centre GPU, pre-Turing so no QLoRA"
    return "lora", "not a data-centre GPU"
