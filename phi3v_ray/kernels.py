"""Fused kernels: liger-kernel's Triton ops swapped into our model at named points, on CUDA.

    fused_kernels=auto    liger on a CUDA worker when liger-kernel is installed (pip install -e '.[gpu]'), else none
    fused_kernels=liger   the same, but a worker without CUDA or without the package stops at start-up
    fused_kernels=none    transformers' own modules everywhere

What changes, module by module (`apply_fused_kernels`):

- rms_norm    every Phi3RMSNorm (the decoder's two per layer and the final norm) runs liger's RMSNorm in
              its "llama" casting mode, which is Phi-3's: the inverse RMS in fp32, the weight multiplied in
              the input's dtype. Same weight, same eps.
- swiglu      every Phi3MLP computes down_proj(silu(gate) * up) with liger's fused SiLU-and-multiply, which
              recomputes silu(gate) in the backward instead of keeping that (tokens × intermediate) tensor.
              gate_up_proj and down_proj stay the nn.Linear submodules they were, under their names.
- rope        every Phi3Attention rotates q and k with liger's rope kernel (our cos/sin layout is the one it
              reads: (B, T, head_dim), the two halves repeated, as Phi3RotaryEmbedding returns them, LongRoPE
              scaling included).
- layer_norm  the CLIP tower's nn.LayerNorms run liger's LayerNorm.

Each swap changes the module's class to a subclass that overrides `forward` and nothing else: the module
object, its parameters, buffers, hooks and names stay, so `state_dict()` keys, checkpoints, PEFT's LoRA
targets (qkv_proj, gate_up_proj, down_proj, ...) and DeepSpeed's parameter groups do not change. The swap
runs right after loading, before PEFT wraps the Linear layers, and works on the 4-bit base of QLoRA too.
Transformers itself is not patched (liger's own `apply_liger_kernel_to_phi3` replaces classes and
functions in transformers' modules for the whole process): other models in the process keep torch's ops.

A fused op runs only where it computes what the module it replaces computes. When its inputs differ in
dtype (fp32 norm weights over a bf16 stream, as PEFT's k-bit preparation leaves them; rope's fp32 cos/sin
with bf16 q/k under autocast over fp32 weights) transformers' forward runs instead, because its type
promotion is not what the kernels do; so does CLIP's LayerNorm under autocast, which runs layer_norm in fp32.

`resolve_kernels` never picks liger without CUDA, but `apply_fused_kernels` does what it is told: the tests
run the fused model on the CPU under Triton's interpreter (tests/test_kernels.py says how).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import types
from dataclasses import dataclass
from typing import get_args

import torch
from torch import nn
from transformers.models.phi3 import modeling_phi3
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3MLP, Phi3RMSNorm

from .config import FusedKernels

KERNELS = get_args(FusedKernels)  # auto, liger, none
INSTALL = "pip install -e '.[gpu]'"


@dataclass(frozen=True)
class KernelChoice:
    """Which fused kernels a worker uses, and why."""

    name: str
    """"liger" or "none"."""
    reason: str
    """Why: "auto", "set explicitly", "no CUDA", "liger-kernel not installed: ..."."""

    def line(self, ops: tuple[str, ...] = ()) -> str:
        """The start-up line: `fused kernels: liger 0.8.5 (rms_norm, swiglu, rope, layer_norm)`, or
        `fused kernels: none (no CUDA)`; `ops` are those `apply_fused_kernels` swapped in."""
        if self.name == "none":
            return f"fused kernels: none ({self.reason})"
        from importlib.metadata import version

        return f"fused kernels: liger {version('liger-kernel')} ({', '.join(ops) or 'no module of this model matched'})"


def liger_installed() -> bool:
    """Whether liger-kernel and triton can be imported (without importing them)."""
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def resolve_kernels(setting: str, device: torch.device | str, installed: bool | None = None) -> KernelChoice:
    """The `fused_kernels` setting on a worker whose model lives on `device`.

    Raises ValueError naming the fix when `liger` cannot run there (no CUDA device, or liger-kernel not
    installed); auto then falls back to none and says why.
    """
    if setting not in KERNELS:
        raise ValueError(f"fused_kernels={setting!r} is not one of {', '.join(KERNELS)}; use fused_kernels=auto")
    if setting == "none":
        return KernelChoice("none", "set explicitly")
    cuda = torch.device(device).type == "cuda"
    installed = liger_installed() if installed is None else installed
    if setting == "liger":
        if not cuda:
            raise ValueError(f"fused_kernels=liger on a worker without CUDA ({torch.device(device)}): liger's Triton "
                             "kernels run on CUDA GPUs; use fused_kernels=auto or none, or train with use_gpu=true")
        if not installed:
            raise ValueError(f"fused_kernels=liger: liger-kernel is not installed on this worker; {INSTALL} "
                             "(liger-kernel and triton), or use fused_kernels=auto or none")
        return KernelChoice("liger", "set explicitly")
    if not cuda:
        return KernelChoice("none", "no CUDA")
    if not installed:
        return KernelChoice("none", f"liger-kernel not installed: {INSTALL}")
    return KernelChoice("liger", "auto")


# ----------------------------------------------------------------------------- liger, imported on first use
@functools.cache
def _liger():
    """liger-kernel's functional ops (imported once, at the first fused call or swap)."""
    from liger_kernel.transformers import functional

    return functional


# ----------------------------------------------------------------------------- the fused modules
class Phi3VFusedRMSNorm(Phi3RMSNorm):
    """Phi3RMSNorm through liger's kernel ("llama" casting: rstd in fp32, weight product in the input dtype)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != self.weight.dtype:
            return super().forward(hidden_states)  # promotes to the wider dtype, which the kernel does not
        # in_place: the backward writes dX over dY, as liger's own Phi-3 patch does; the norm's output feeds only
        # qkv_proj / gate_up_proj / lm_head (plus LoRA's A beside them), whose gradients autograd sums into dY.
        return _liger().liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, offset=0.0,
                                       casting_mode="llama", in_place=True)


class Phi3VFusedMLP(Phi3MLP):
    """Phi3MLP with silu(gate) * up fused; gate_up_proj and down_proj are the same Linear modules."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)  # (B, T, intermediate) each
        return self.down_proj(_liger().liger_swiglu(gate, up))


def _fused_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """apply_rotary_pos_emb's signature, liger's rope kernel; transformers' function when dtypes differ."""
    if not (q.dtype == k.dtype == cos.dtype == sin.dtype) or unsqueeze_dim != 1:
        return modeling_phi3.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    return _liger().liger_rope(q, k, cos, sin)


@functools.cache
def _attention_forward_with_fused_rope():
    """transformers' own Phi3Attention.forward with its one global `apply_rotary_pos_emb` bound to `_fused_rope`.

    The attention code stays transformers' (projections, KV cache, the attention interface, packing
    arguments); only the function it looks up by name for the rotation differs, in a copy of the function
    with its own globals. None when the forward does not look that name up (a transformers version that
    moved the rotation elsewhere): rope then stays unfused.
    """
    raw = inspect.unwrap(Phi3Attention.forward)  # below deprecate_kwarg's argument renaming
    if "apply_rotary_pos_emb" not in raw.__code__.co_names:
        return None
    namespace = dict(raw.__globals__, apply_rotary_pos_emb=_fused_rope)
    forward = types.FunctionType(raw.__code__, namespace, raw.__name__, raw.__defaults__, raw.__closure__)
    forward.__kwdefaults__ = raw.__kwdefaults__
    return forward


class Phi3VFusedRopeAttention(Phi3Attention):
    """Phi3Attention rotating q and k with liger's rope kernel."""

    def forward(self, *args, **kwargs):
        return _attention_forward_with_fused_rope()(self, *args, **kwargs)


class Phi3VFusedLayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm through liger's kernel (statistics in fp32, output in the input dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)  # autocast runs layer_norm in fp32; the kernel would keep x's dtype
        return _liger().liger_layer_norm(x, self.weight, self.bias, self.eps)


FUSED = {"rms_norm": Phi3VFusedRMSNorm, "swiglu": Phi3VFusedMLP, "rope": Phi3VFusedRopeAttention,
         "layer_norm": Phi3VFusedLayerNorm}


# ----------------------------------------------------------------------------- applying them
def apply_fused_kernels(model: nn.Module, choice: KernelChoice) -> tuple[str, ...]:
    """Swap the fused modules into `model` (before PEFT wraps it) and return the ops now fused.

    A no-op for choice "none". Only exact transformers classes are swapped (a module someone else already
    replaced is left alone), and only where the kernel computes the same function: the MLP when its
    activation is SiLU, rope when transformers' attention looks it up by name, LayerNorms over the last
    dimension with weight and bias.
    """
    if choice.name != "liger":
        return ()
    _liger()  # fail here, with liger's own ImportError, rather than at the first forward
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in base.modules():
        kind = type(module)
        if kind is Phi3RMSNorm:
            module.__class__ = Phi3VFusedRMSNorm
        elif kind is Phi3MLP and module.config.hidden_act in ("silu", "swish"):
            module.__class__ = Phi3VFusedMLP
        elif kind is Phi3Attention and _attention_forward_with_fused_rope() is not None:
            module.__class__ = Phi3VFusedRopeAttention
    vision = base.model.vision_embed_tokens.img_processor
    for module in vision.modules():
        if (type(module) is nn.LayerNorm and len(module.normalized_shape) == 1 and module.weight is not None
                and module.bias is not None):
            module.__class__ = Phi3VFusedLayerNorm
    return fused_ops(model)


def fused_ops(model: nn.Module) -> tuple[str, ...]:
    """The fused ops present in `model` (a PEFT model too), in FUSED's order: what actually runs."""
    kinds = {type(m) for m in model.modules()}
    return tuple(op for op, cls in FUSED.items() if cls in kinds)
